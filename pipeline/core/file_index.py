"""The file index of a prepared split: every image's path inside the split folder, in the order readers number the
samples, written once by prep so that no rank lists the tree at start-up.

Why: ImageNet's train split is 1,281,167 files in 1,000 folders; listing them takes about 14 s per process on a
local disk with a cold cache and minutes on a parallel file system (a metadata storm, times every rank of every
node). Reading this one file takes well under a second.

Format (a contract between prep, which writes it, and the loaders, which read it): ``<data dir>/<split>.index``,
UTF-8 text; the first line ``# file index v1: N images``, then N lines ``<class folder>/<file name>``, ordered by
class folder, then by path inside it (torchvision's ImageFolder order, so sample numbers do not depend on whether
the index or a scan gave them). Torch-free: prep writes it without importing torch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.core.atomic import atomic_write_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
HEADER = re.compile(r"# file index v1: (\d+) images")


class FileIndexError(ValueError):
    """An index that does not describe the split folder beside it."""


def index_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.index"


def list_split(split_dir: str | Path) -> list[str]:
    """The images under ``split_dir``'s class folders, as ``<class>/<path>``, in ImageFolder's order (the scan)."""
    names = []
    for class_dir in sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir()):
        top = os.path.join(split_dir, class_dir)
        for root, _, files in sorted(os.walk(top, followlinks=True)):
            inside = os.path.relpath(root, split_dir)
            names += [f"{inside}/{name}" for name in sorted(files) if name.lower().endswith(IMAGE_EXTENSIONS)]
    return names


def write_index(data_dir: str | Path, split: str) -> int:
    """List ``data_dir/split`` once and write its index atomically; returns the number of images."""
    names = list_split(Path(data_dir) / split)
    atomic_write_text(index_path(data_dir, split), f"# file index v1: {len(names)} images\n" +
                      "".join(f"{name}\n" for name in names))
    return len(names)


def read_index(data_dir: str | Path, split: str) -> list[str] | None:
    """The split's entries from its index, None without one; FileIndexError when the index is broken or does not
    match the folder beside it (checked cheaply: its count, and its first and last files exist)."""
    path = index_path(data_dir, split)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise FileIndexError(f"cannot read the file index {path}: {exc}") from None
    header, _, body = text.partition("\n")
    names = body.splitlines()
    match = HEADER.fullmatch(header)
    if not match or int(match.group(1)) != len(names):
        raise FileIndexError(f"the file index {path} is cut short or not one (its first line says "
                             f"{header[:60]!r}, and it lists {len(names)} files)")
    split_dir = Path(data_dir) / split
    if names and not ((split_dir / names[0]).is_file() and (split_dir / names[-1]).is_file()):
        raise FileIndexError(f"the file index {path} lists files that are not in {split_dir} (e.g. {names[0]}): "
                             "it belongs to another data dir or the folder changed")
    return names
