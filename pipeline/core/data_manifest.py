"""The manifest of a packed data dir: which large files (archives or shards) its readers open, with each one's size
and MD5, and which small files beside it they need.

Why: the layouts ``archives`` and ``shards`` read a few large files by byte offset. Readers check each file's size
against the manifest when they open it (cheap), so a truncated, changed or foreign file fails with one clear line;
staging (``--stage-data-to``) copies exactly these files and verifies each MD5 while it copies.

Format (a contract between prep, which writes it last so that its presence marks a complete prep, and the readers
and staging): ``<data dir>/manifest.json``, UTF-8 JSON::

    {"format": "data manifest v1", "layout": "archives" | "shards",
     "files_root": "<dir of the large files: absolute, or relative to the data dir>",
     "files": [{"name": "<relative to files_root>", "size": <bytes>, "md5": "<hex>"}, ...],
     "meta": ["<small files of the data dir, relative names>", ...],
     ...any other key a layout needs (readers ignore the ones they do not know)}

Names are relative, without ``..``, empty or control characters, so nothing outside the chosen dirs is read or
written through them. Torch-free: prep writes it without importing torch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.atomic import atomic_write_text

FORMAT = "data manifest v1"
MANIFEST_FILE = "manifest.json"
LAYOUTS = ("archives", "shards")
KEYS = ("format", "layout", "files_root", "files", "meta")
MD5 = re.compile(r"[0-9a-f]{32}")


class DataManifestError(ValueError):
    """A manifest that cannot be read or trusted: the message names the file and what is wrong."""


@dataclass(frozen=True)
class ManifestFile:
    name: str  # relative to the manifest's files_root
    size: int  # bytes
    md5: str  # lowercase hex


@dataclass(frozen=True)
class Manifest:
    layout: str
    files_root: str
    files: tuple[ManifestFile, ...]
    meta: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        """Bytes of all large files (what staging copies, besides the small meta files)."""
        return sum(f.size for f in self.files)


def manifest_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / MANIFEST_FILE


def safe_name(name: object, what: str) -> str:
    """``name`` if it is a relative POSIX path that stays inside its folder, else a DataManifestError naming ``what``."""
    if not isinstance(name, str) or not name:
        raise DataManifestError(f"{what}: a name must be a non-empty string, not {name!r}")
    if "\\" in name or not name.isprintable() or any(part in ("", ".", "..") for part in name.split("/")):
        raise DataManifestError(f"{what}: unsafe name {name!r} (it must be a relative path inside its folder, "
                                "without '..', '.', empty parts, backslashes or control characters)")
    return name


def _file(entry: object, where: str) -> ManifestFile:
    if not isinstance(entry, dict) or set(entry) != {"name", "size", "md5"}:
        raise DataManifestError(f"{where}: each entry of 'files' must be an object with exactly name, size and md5, "
                                f"not {str(entry)[:80]!r}")
    name = safe_name(entry["name"], where)
    size, md5 = entry["size"], entry["md5"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise DataManifestError(f"{where}: file {name!r} has size {size!r}; it must be a whole number of bytes >= 0")
    if not isinstance(md5, str) or not MD5.fullmatch(md5):
        raise DataManifestError(f"{where}: file {name!r} has md5 {md5!r}; it must be 32 lowercase hex digits")
    return ManifestFile(name, size, md5)


def _names_once(names: list[str], what: str, where: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataManifestError(f"{where}: {what} {name!r} is listed twice")
        seen.add(name)


def from_dict(data: object, where: str) -> Manifest:
    """The manifest in ``data`` (parsed JSON) after every check; ``where`` names its file in errors."""
    if not isinstance(data, dict):
        raise DataManifestError(f"{where}: a data manifest must be a JSON object")
    if data.get("format") != FORMAT:
        raise DataManifestError(f"{where}: format {data.get('format')!r} is not {FORMAT!r} (written by another "
                                "version, or not a data manifest); prepare the data dir again")
    missing = [key for key in KEYS if key not in data]
    if missing:
        raise DataManifestError(f"{where}: missing keys {missing}")
    layout, root, files, meta = data["layout"], data["files_root"], data["files"], data["meta"]
    if layout not in LAYOUTS:
        raise DataManifestError(f"{where}: layout {layout!r} is not one of {list(LAYOUTS)}")
    if not isinstance(root, str) or not root or not root.isprintable():
        raise DataManifestError(f"{where}: files_root {root!r} must be a non-empty path")
    if not isinstance(files, list) or not isinstance(meta, list):
        raise DataManifestError(f"{where}: 'files' and 'meta' must be lists")
    entries = tuple(_file(entry, where) for entry in files)
    meta_names = tuple(safe_name(name, where) for name in meta)
    _names_once([f.name for f in entries], "file", where)
    _names_once(list(meta_names), "meta file", where)
    if MANIFEST_FILE in meta_names:
        raise DataManifestError(f"{where}: 'meta' lists {MANIFEST_FILE} itself")
    extra = {key: value for key, value in data.items() if key not in KEYS}
    return Manifest(layout, root, entries, meta_names, extra)


def to_dict(manifest: Manifest) -> dict:
    clash = sorted(set(manifest.extra) & set(KEYS))
    if clash:
        raise DataManifestError(f"a manifest's extra keys may not be {clash}: they are the format's own")
    return {"format": FORMAT, "layout": manifest.layout, "files_root": manifest.files_root,
            "files": [{"name": f.name, "size": f.size, "md5": f.md5} for f in manifest.files],
            "meta": list(manifest.meta), **manifest.extra}


def read_manifest(data_dir: str | Path) -> Manifest | None:
    """The data dir's manifest; None when it has none (a ``folders`` data dir); DataManifestError when broken."""
    path = manifest_path(data_dir)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise DataManifestError(f"cannot read the data manifest {path} ({exc}); prepare the data dir again") from None
    return from_dict(data, f"data manifest {path}")


def write_manifest(data_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest`` atomically (checked as a reader would check it); returns its path."""
    path = manifest_path(data_dir)
    data = to_dict(manifest)
    from_dict(json.loads(json.dumps(data)), f"data manifest {path}")  # never write what a reader would refuse
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return path


def files_dir(data_dir: str | Path, manifest: Manifest) -> Path:
    """The folder holding the manifest's large files: its files_root, relative to the data dir unless absolute."""
    return Path(data_dir) / manifest.files_root  # an absolute files_root replaces the data dir
