"""Reading the official train and val archives once into sample rows: where each JPEG's bytes lie, and its label.

Train: the outer tar holds one uncompressed tar per class; a JPEG's offset in the outer file is the class tar's data
offset plus the JPEG's data offset inside it. Val: the devkit labels each file by the number in its own name, as
extraction does (pipeline.prep.extract's ``val_members``: the same files missing, unlabelled or extra). Every member
is checked as extraction checks it (plain names, regular files, inside their tar, class tars not compressed), and the
MD5 of each archive is computed from the same pass (the manifest records it; checked when an expected one is given).

The result of each split is kept in ``<data dir>/.prep/`` (rows and record), so an interrupted prep, or shards
written after it, do not read the archive again; a kept scan is used only for an archive of the size and mtime it was
made from.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import atomic_path, atomic_write_text
from pipeline.core.file_index import IMAGE_EXTENSIONS
from pipeline.core.sample_index import make_samples
from pipeline.prep.archives import member_bytes, read_archive
from pipeline.prep.datadir import STATE_DIR, archive_stat
from pipeline.prep.devkit import Devkit
from pipeline.prep.extract import class_members, class_tars, val_members

log = logging.getLogger(__name__)

Row = tuple[int, int, int, int, str]  # file, offset, length, label, name (pipeline.core.sample_index)


def _train_rows(read: Any, archive: Path, devkit: Devkit, file: int, record: dict[str, Any]) -> list[Row]:
    label_of = {wnid: label for label, wnid in enumerate(devkit.wnids)}
    rows: list[Row] = []
    extra: list[str] = []
    per_class: dict[str, int] = {}
    for wnid, outer in class_tars(read.tar, archive, label_of, extra):
        where = f"{archive.name}:{outer.name}"
        before = len(rows)
        for _, member, name in class_members(member_bytes(read.tar, outer), where):
            if name.lower().endswith(IMAGE_EXTENSIONS):  # what the folders layout's index lists
                rows.append((file, outer.offset_data + member.offset_data, member.size, label_of[wnid], name))
            else:
                extra.append(f"{outer.name}:{name}")
        per_class[wnid] = len(rows) - before
    record.update(extra=extra, per_class=dict(sorted(per_class.items())))
    return rows


def _val_rows(read: Any, archive: Path, devkit: Devkit, file: int, record: dict[str, Any]) -> list[Row]:
    label_of = {wnid: label for label, wnid in enumerate(devkit.wnids)}
    rows = [(file, member.offset_data, member.size, label_of[wnid], name)
            for member, name, wnid in val_members(read.tar, archive, devkit, record)]
    counts = np.bincount([row[3] for row in rows], minlength=len(devkit.wnids))
    record["per_class"] = {wnid: int(n) for wnid, n in zip(devkit.wnids, counts)}
    return rows


SCANNERS = {"train": _train_rows, "val": _val_rows}


def _kept(data_dir: Path, split: str) -> tuple[Path, Path]:
    return data_dir / STATE_DIR / f"scan-{split}.npy", data_dir / STATE_DIR / f"scan-{split}.json"


def scan_split(split: str, archive: Path, data_dir: Path, devkit: Devkit, *, file: int,
               expected_md5: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    """(sample rows in the folders order, record with counts and the archive's stats) of one split's archive."""
    rows_path, record_path = _kept(data_dir, split)
    kept = _load_kept(rows_path, record_path, archive, expected_md5)
    if kept is not None:
        log.info("%s was read by an earlier prep (%s); not reading it again", archive, record_path)
        return kept
    log.info("reading %s once to index its images (nothing is extracted)", archive)
    record: dict[str, Any] = {}
    with read_archive(archive, expected_md5=expected_md5, digest=True) as read:
        rows = SCANNERS[split](read, archive, devkit, file, record)
    samples = make_samples(rows)
    record.update(archive=read.stats, images=len(samples))
    with atomic_path(rows_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, samples, allow_pickle=False)
    atomic_write_text(record_path, json.dumps(record))
    return samples, json.loads(json.dumps(record))


def _load_kept(rows_path: Path, record_path: Path, archive: Path,
               expected_md5: str | None) -> tuple[np.ndarray, dict[str, Any]] | None:
    """A kept scan of this archive (same size and mtime; the expected MD5 when one is given), else None (scan
    again). The mtime too: an archive rewritten in place at the same size (another download) has other members."""
    try:
        record = json.loads(record_path.read_text())
        samples = np.load(rows_path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    stat, stats = archive_stat(archive), record.get("archive", {})
    if (stat is None or (stat.st_size, stat.st_mtime_ns) != (stats.get("bytes"), stats.get("mtime_ns"))
            or expected_md5 not in (None, stats.get("md5"))):
        return None
    stats["read_in_this_run"] = False
    return samples, record
