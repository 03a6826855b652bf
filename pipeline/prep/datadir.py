"""The prepared data dir as a whole: its report, which dataset it holds, and a full disk.

``prep_report.json`` is written last and atomically, so its presence means the data dir is complete;
a re-run then only re-verifies the counts it states. Splits are built in hidden staging folders
(``.train.partial``) and renamed into place once extracted and verified.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import shutil
import stat as stat_lib
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.core.atomic import atomic_write_text
from pipeline.core.data_manifest import MANIFEST_FILE
from pipeline.core.logs import human_bytes
from pipeline.core.records import read_json
from pipeline.prep.archives import PrepError
from pipeline.prep.classes import CLASSES_FILE, read_classes
from pipeline.prep.devkit import Devkit
from pipeline.prep.extract import TMP_SUFFIX

log = logging.getLogger(__name__)

REPORT_FILE = "prep_report.json"
STATE_DIR = ".prep"  # what prep keeps to resume: one record per finished split, the scans of the archives
CIFAR_FOLDER = "cifar-10-batches-py"
DATASET_MARKERS = {"imagenet": ("train", "val", ".train.partial", ".val.partial"), "cifar10": (CIFAR_FOLDER,)}


class DataDirError(PrepError):
    """A data dir that is missing, holds something else, or changed since it was prepared."""


class DiskFullError(PrepError):
    """The data dir's file system ran out of space (or quota) during prep."""


def staging_dir(data_dir: Path, split: str) -> Path:
    """Where a split is built before it is renamed to ``data_dir/split``."""
    return data_dir / f".{split}.partial"


def make_data_dir(data_dir: Path) -> None:
    """Create the data dir; one that is a file or cannot be written is bad input, said in one line."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataDirError(f"--data-dir {data_dir} is a file, not a folder; pass a folder (it is created when "
                           "missing)") from None
    except OSError as exc:
        raise DataDirError(f"cannot create --data-dir {data_dir}: {exc.strerror or exc}; pass a folder this user "
                           "can write to") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise DataDirError(f"cannot write to --data-dir {data_dir}; pass a folder this user can write to")


def archive_stat(path: Path) -> os.stat_result | None:
    """The archive's stat, or None when it is gone (``--delete-archives``) or out of reach: a finished data dir
    needs no archives, so there is then nothing to compare."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat if stat_lib.S_ISREG(stat.st_mode) else None


def check_same_archive(path: Path, recorded: Mapping[str, Any], data_dir: Path, redo: str) -> None:
    """An archive of another size than the one ``data_dir`` was prepared from is an error, since that data would
    silently stay; a new modification time alone is only logged (copying the archives, e.g. to node-local disk,
    changes it)."""
    stat = archive_stat(path)
    if stat is None:
        return
    if stat.st_size != recorded["bytes"]:
        raise DataDirError(f"{data_dir} was prepared from a {path.name} of {recorded['bytes']:,} bytes, not from "
                           f"{path} ({stat.st_size:,} bytes), and still holds that data. To prepare from this "
                           f"archive, {redo} or pass an empty --data-dir; to use the data as it is, pass the "
                           "--archive-dir it was prepared from")
    if recorded.get("mtime_ns", stat.st_mtime_ns) != stat.st_mtime_ns:
        log.warning("%s was modified since %s was prepared from it (same size); if its contents changed, %s or pass "
                    "an empty --data-dir", path, data_dir, redo)


def read_report(data_dir: Path) -> dict[str, Any] | None:
    return read_json(data_dir / REPORT_FILE, DataDirError, "remove it and re-run prep to rebuild it")


def check_dataset(data_dir: Path, dataset: str) -> None:
    """Refuse a data dir that already holds (part of) another dataset: prep never mixes two."""
    report = read_report(data_dir)
    if report is not None and report.get("dataset") != dataset:
        raise DataDirError(f"{data_dir} already holds the prepared {report.get('dataset')} dataset; "
                           f"choose another --data-dir for {dataset}")
    for other, markers in DATASET_MARKERS.items():
        found = [m for m in markers if other != dataset and (data_dir / m).exists()]
        if found:
            raise DataDirError(f"{data_dir} holds {found[0]}/ of the {other} dataset; choose another --data-dir "
                               f"for {dataset}")


def check_layout(data_dir: Path, layout: str) -> None:
    """Refuse a data dir prepared (or being prepared) in another layout: one data dir holds one layout."""
    report = read_report(data_dir)
    found = report.get("layout", "folders") if report else None
    if found is None and (data_dir / MANIFEST_FILE).exists():
        found = "archives or shards"
    if found is None and layout != "folders" and any((data_dir / split).exists() for split in ("train", "val")):
        found = "folders"
    if found is not None and found != layout:
        raise DataDirError(f"{data_dir} holds the {found} layout; choose another --data-dir for --layout {layout} "
                           f"(or pass --layout {found} to use it)")


def write_report(data_dir: Path, report: dict[str, Any], *, start: float) -> dict[str, Any]:
    """Add timing and throughput of this run, then write the report atomically (the data dir is then complete)."""
    seconds = time.monotonic() - start
    read_bytes = sum(a["bytes"] for a in report["archives"].values() if a.get("read_in_this_run", True))
    report.update(seconds=round(seconds, 3), mb_per_s=round(read_bytes / 1e6 / max(seconds, 1e-9), 1),
                  finished_at=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    atomic_write_text(data_dir / REPORT_FILE, json.dumps(report, indent=1) + "\n")
    return report


def delete_archive(path: Path) -> None:
    if path.exists():
        log.info("deleting %s (asked by --delete-archives; its contents are extracted and verified)", path)
        path.unlink()


@contextlib.contextmanager
def disk_full_guard(data_dir: Path, needs: str) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT anywhere inside into a DiskFullError that says what to do; ``needs``: the space wanted."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(data_dir).free if data_dir.exists() else 0
        raise DiskFullError(f"no space left in {data_dir} ({human_bytes(free)} free) while writing "
                            f"{exc.filename or 'a file'}: the half-written part was removed. Free space (the dataset "
                            f"needs {needs}) or pass another --data-dir, then run prep again: what is finished is "
                            "kept and it resumes") from None


def check_classes(data_dir: Path, devkit: Devkit) -> None:
    """A class list or class folders that are not the devkit's mean the data dir holds another dataset."""
    known = set(devkit.wnids)
    if (data_dir / CLASSES_FILE).exists():
        try:
            listed = [entry.wnid for entry in read_classes(data_dir)]
        except ValueError as exc:
            raise DataDirError(f"{exc}; remove it, or choose an empty --data-dir") from None
        if listed != devkit.wnids:
            raise DataDirError(f"{data_dir / CLASSES_FILE} lists {len(listed)} classes that are not the devkit's "
                               f"{len(known)} (e.g. {sorted(set(listed) ^ known)[:3]}): the data dir holds another "
                               "dataset; choose an empty --data-dir")
    for split in ("train", "val"):
        for folder in (data_dir / split, staging_dir(data_dir, split)):
            strangers = sorted(p.name for p in folder.iterdir() if p.is_dir() and
                               p.name.removesuffix(TMP_SUFFIX) not in known) if folder.is_dir() else []
            if strangers:
                raise DataDirError(f"{folder} holds folders that are not classes of the devkit ({strangers[:3]}): "
                                   "the data dir holds another dataset; choose an empty --data-dir")
