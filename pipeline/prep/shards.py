"""WebDataset-compatible tar shards from the scanned archives: ``<key>.jpg`` + ``<key>.cls`` per sample.

The samples of a split are dealt in a seeded order that mixes the classes and cut into shards of about
``--shard-size-mb``, read straight from the official archives by offset (nothing is extracted). Optionally images
whose longer side exceeds ``--shard-max-side`` are re-encoded at that side and ``--shard-quality`` (FFCV-style: a
smaller decode per epoch); smaller ones, and ones PIL cannot read (the loaders skip and name them, as from
folders), keep their original bytes. Shards are written in parallel (``workers`` threads: reads, PIL's codecs and
MD5 release the GIL), each to a hidden temporary name renamed when whole; the record of a finished shard (size, MD5,
where each sample's JPEG lies) is kept in ``.prep/shards/``, so a resumed prep verifies it and does not write it
again. Shards are deterministic (fixed member metadata): the same plan writes the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.atomic import atomic_write_text, fsync_dir
from pipeline.core.data_manifest import ManifestFile
from pipeline.core.sample_index import MAX_FILES
from pipeline.prep.archives import READ_CHUNK, ArchiveError
from pipeline.prep.datadir import STATE_DIR

log = logging.getLogger(__name__)

SHARD_DIR = "shards"
SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")
TAR_OVERHEAD = 3 * tarfile.BLOCKSIZE  # per sample: two headers and the .cls block (the shard size estimate)


@dataclass(frozen=True)
class Resize:
    max_side: int  # 0: original bytes
    quality: int

    def record(self) -> dict[str, int] | None:
        return {"max_side": self.max_side, "quality": self.quality} if self.max_side else None


def plan_shards(samples: np.ndarray, *, seed: int, shard_bytes: int) -> list[np.ndarray]:
    """Sample positions per shard: a seeded permutation cut where the running size passes each ``shard_bytes``."""
    order = np.random.default_rng(seed).permutation(len(samples))
    running = np.cumsum(samples["length"][order].astype(np.int64) + TAR_OVERHEAD)
    cuts = np.flatnonzero(np.diff(running // shard_bytes)) + 1
    return [part for part in np.split(order, cuts) if len(part)]


def check_shard_count(splits: list[np.ndarray], *, seed: int, shard_bytes: int) -> None:
    """Refuse, before any shard is written, a plan of more shards than the index can name (MAX_FILES)."""
    count = sum(len(plan_shards(samples, seed=seed, shard_bytes=shard_bytes)) for samples in splits)
    if count > MAX_FILES:
        raise ArchiveError(f"--shard-size-mb {shard_bytes // 10 ** 6} cuts the {sum(map(len, splits)):,} images into "
                           f"{count:,} shards, more than the {MAX_FILES:,} the sample index can name; pass a larger "
                           "--shard-size-mb (the archives' scans are kept: they are not read again)")


def sample_key(name: bytes) -> str:
    """WebDataset's key: the file name without its extension, no dot left (WebDataset splits at the first dot)."""
    return name.decode().rsplit(".", 1)[0].replace(".", "_")


def reencode(data: bytes, resize: Resize) -> bytes:
    """The image with its longer side at most ``resize.max_side``, as a JPEG; the original bytes when it is small
    enough already or PIL cannot read it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            scale = resize.max_side / max(width, height)
            if scale >= 1:
                return data
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            img.draft("RGB", size)  # a JPEG decodes at the smallest DCT scale still at least this size
            small = img.convert("RGB").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return data
    out = io.BytesIO()
    small.save(out, "JPEG", quality=resize.quality)
    return out.getvalue()


class _HashingFile(io.RawIOBase):
    """A write-only file that feeds the MD5 of everything written."""

    def __init__(self, fh: Any):
        self.fh, self.md5, self.position = fh, hashlib.md5(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def write(self, data: Any) -> int:
        self.md5.update(data)
        self.position += len(data)
        return self.fh.write(data)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def write_shard(path: Path, sources: list[Path], samples: np.ndarray, resize: Resize) -> dict[str, Any]:
    """Write one shard (to a temporary name, renamed when whole); its record: size, MD5, each JPEG's offset, length."""
    tmp = path.with_name(f".{path.name}.partial")
    offsets, lengths = [], []
    fds: dict[int, int] = {}
    try:
        with open(tmp, "wb") as fh:
            out = _HashingFile(fh)
            with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
                for row in samples:
                    file = int(row["file"])
                    if file not in fds:
                        fds[file] = os.open(sources[file], os.O_RDONLY)
                    fd = fds[file]
                    data = os.pread(fd, int(row["length"]), int(row["offset"]))
                    if len(data) != int(row["length"]):
                        raise ArchiveError(f"{sources[file]} is shorter than when prep read it (at byte "
                                           f"{int(row['offset']):,}); put the archive back, or remove "
                                           f"{path.parent.parent / STATE_DIR} to read it again")
                    data = reencode(data, resize) if resize.max_side else data
                    key = sample_key(row["name"])
                    tar.addfile(_member(f"{key}.jpg", len(data)), io.BytesIO(data))
                    offsets.append(tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
                    lengths.append(len(data))
                    label = str(int(row["label"])).encode()
                    tar.addfile(_member(f"{key}.cls", len(label)), io.BytesIO(label))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
        for fd in fds.values():
            os.close(fd)
    return {"size": path.stat().st_size, "md5": out.md5.hexdigest(), "offsets": offsets, "lengths": lengths}


def file_md5(path: Path) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            md5.update(chunk)
    return md5.hexdigest()


def _finished(path: Path, record_path: Path, plan_key: str) -> dict[str, Any] | None:
    """The record of a shard written by an earlier run of the same plan, when the shard still matches it."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("plan") != plan_key or not path.is_file() or path.stat().st_size != record.get("size"):
        return None
    return record if file_md5(path) == record.get("md5") else None


def _shard_task(path: Path, record_path: Path, plan_key: str, sources: list[Path], samples: np.ndarray,
                resize: Resize) -> dict[str, Any]:
    record = _finished(path, record_path, plan_key)
    if record is not None:
        log.info("%s is already written and verified; keeping it", path.name)
        return record
    record = {"plan": plan_key, **write_shard(path, sources, samples, resize)}
    atomic_write_text(record_path, json.dumps(record))
    log.info("%s: %d images, %.1f MB", path.name, len(samples), record["size"] / 1e6)
    return record


def write_split_shards(split: str, samples: np.ndarray, sources: list[Path], data_dir: Path, *, first_file: int,
                       seed: int, shard_bytes: int, resize: Resize,
                       workers: int) -> tuple[list[ManifestFile], np.ndarray]:
    """All shards of a split: their manifest entries, and the split's rows pointing into them (the same order)."""
    folder, records = data_dir / SHARD_DIR, data_dir / STATE_DIR / SHARD_DIR
    folder.mkdir(exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(samples, seed=seed, shard_bytes=shard_bytes)
    names = [f"{split}-{k:06d}.tar" for k in range(len(plan))]
    _remove_stale(folder, split, set(names))
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="prep-shard") as pool:
        futures = [pool.submit(_shard_task, folder / name, records / f"{name}.json",
                               _plan_key(part, resize, samples), sources, samples[part], resize)
                   for name, part in zip(names, plan)]
        done = [future.result() for future in futures]
    rows = samples.copy()
    for k, (part, record) in enumerate(zip(plan, done)):
        rows["file"][part] = first_file + k
        rows["offset"][part] = record["offsets"]
        rows["length"][part] = record["lengths"]
    return [ManifestFile(f"{name}", r["size"], r["md5"]) for name, r in zip(names, done)], rows


def _plan_key(part: np.ndarray, resize: Resize, samples: np.ndarray) -> str:
    """What a shard's bytes depend on: its samples (where they come from, in order) and the resize."""
    md5 = hashlib.md5(samples[part].tobytes())
    md5.update(f"{resize.max_side},{resize.quality}".encode())
    return md5.hexdigest()


def _remove_stale(folder: Path, split: str, planned: set[str]) -> None:
    """Shards of this split left by an earlier plan (another shard size) are not in the manifest: remove them."""
    for path in folder.iterdir():
        if SHARD_NAME.fullmatch(path.name) and path.name.startswith(f"{split}-") and path.name not in planned:
            log.info("removing %s, left by an earlier prep with another plan", path)
            path.unlink()
