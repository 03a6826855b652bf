"""The prep stage: official archives in, a verified ImageFolder tree with its class list and report out.

Door: ``prepare(cfg)``, run by ``python launch.py --stage prep --archive-dir A --data-dir D`` (through
submitit) or ``python -m jobs.prep --archive-dir A --data-dir D``. Produces, for ImageNet::

    D/train/<wnid>/<wnid>_<n>.JPEG        from ILSVRC2012_img_train.tar (one tar per class inside)
    D/val/<wnid>/ILSVRC2012_val_<k>.JPEG  from ILSVRC2012_img_val.tar, placed by k via the devkit
    D/test/ILSVRC2012_test_<k>.JPEG       from ILSVRC2012_img_test.tar, only if that archive is there
    D/classes.tsv                         index, wnid, words (index = label, sorted wnid order)
    D/prep_report.json                    counts, missing and extra files, checksums, time, MB/s

With ``--layout archives`` or ``--layout shards`` nothing is extracted: see pipeline.prep.packed. And for CIFAR-10
(``--dataset cifar10``) ``D/cifar-10-batches-py/`` (see pipeline.prep.cifar). Each archive is
read once, its MD5 checked from the same bytes (``--skip-checksum`` for mirrors and subsets). An interrupted
run resumes class by class; a finished data dir is re-verified (counts, and the archives' sizes against those it
was prepared from) in seconds.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.prep.archives import (CIFAR10_TAR, DEVKIT_TAR, OFFICIAL_MD5, TEST_TAR, ArchiveError, ChecksumError,
                                    archive_exists, missing_archive_error)
from pipeline.core.atomic import atomic_write_text
from pipeline.core.config import Config
from pipeline.core.file_index import index_path, write_index
from pipeline.prep.classes import write_classes
from pipeline.prep.datadir import (REPORT_FILE, STATE_DIR, DataDirError, archive_stat, check_classes, check_dataset,
                                   check_layout, check_same_archive, delete_archive, disk_full_guard, make_data_dir,
                                   read_report, staging_dir, write_report)
from pipeline.core.records import read_json
from pipeline.prep.devkit import Devkit, read_devkit
from pipeline.prep.imagenet_report import SPLIT_ARCHIVES, imagenet_report, log_summary
from pipeline.prep.extract import count_files, extract_flat, extract_train, extract_val

log = logging.getLogger(__name__)

INDEXED_SPLITS = ("train", "val")  # the splits training reads: each gets a file index
REDO_HINT = f"remove the changed split folder and {REPORT_FILE}, then run prep again to redo that split"


def prepare(cfg: Config) -> dict[str, Any]:
    """The stage's door: prepare cfg.data.dataset from cfg.prep.archive_dir into cfg.data.data_dir."""
    archive_dir, data_dir = Path(cfg.prep.archive_dir), Path(cfg.data.data_dir)
    expected = None if cfg.prep.skip_checksum else OFFICIAL_MD5
    if cfg.data.dataset == "cifar10":
        from pipeline.prep.cifar import prepare_cifar10

        return prepare_cifar10(archive_dir, data_dir, expected_md5=expected and expected[CIFAR10_TAR],
                               delete_archives=cfg.prep.delete_archives)
    if cfg.data.layout != "folders":
        from pipeline.prep.packed import prepare_packed

        return prepare_packed(cfg, expected_md5=expected)
    return prepare_imagenet(archive_dir, data_dir, workers=cfg.data.workers, expected_md5=expected,
                            delete_archives=cfg.prep.delete_archives)


def prepare_imagenet(archive_dir: Path, data_dir: Path, *, workers: int = 4,
                     expected_md5: Mapping[str, str] | None = None, delete_archives: bool = False) -> dict[str, Any]:
    """ImageNet from the three (or four) archives; ``expected_md5`` maps archive names to MD5s, None skips checks."""
    start = time.monotonic()
    archive_dir, data_dir = Path(archive_dir), Path(data_dir)
    make_data_dir(data_dir)
    check_dataset(data_dir, "imagenet")
    check_layout(data_dir, "folders")
    if read_report(data_dir) is not None:
        report = reverify_imagenet(data_dir, archive_dir)
        write_missing_indexes(data_dir)  # a data dir prepared before indexes existed gets them now
        return report
    splits = [s for s in SPLIT_ARCHIVES
              if s != "test" or archive_exists(archive_dir / TEST_TAR) or _split_done(data_dir, s)]
    needed = [DEVKIT_TAR] + [SPLIT_ARCHIVES[s] for s in splits if not _split_done(data_dir, s)]
    absent = [archive_dir / name for name in needed if not archive_exists(archive_dir / name)]
    if absent:
        raise missing_archive_error(absent[0]) if len(absent) == 1 else ArchiveError(
            f"archives {[p.name for p in absent]} are missing from {archive_dir}; put the official files there "
            "or pass --archive-dir")
    expected = dict(expected_md5 or {})
    with disk_full_guard(data_dir, needs="about 160 GB: train 140 GB, val 6.4 GB, test 13 GB"):
        devkit = read_devkit(archive_dir / DEVKIT_TAR, expected_md5=expected.get(DEVKIT_TAR))
        check_classes(data_dir, devkit)
        write_classes(data_dir, [(wnid, devkit.words[wnid]) for wnid in devkit.wnids])
        records = {}
        for split in splits:
            archive = archive_dir / SPLIT_ARCHIVES[split]
            records[split] = _load_record(archive_dir, data_dir, split) or _run_split(
                split, archive, data_dir, devkit, expected_md5=expected.get(archive.name), workers=workers)
            if delete_archives:
                delete_archive(archive)
        report = imagenet_report(archive_dir, data_dir, devkit, records)
        write_report(data_dir, report, start=start)
    if delete_archives:
        delete_archive(archive_dir / DEVKIT_TAR)
    log_summary(report, data_dir)
    return report


def _split_done(data_dir: Path, split: str) -> bool:
    """A split is done when its folder and its record exist; a folder without a record was not made by prep."""
    has_record = (data_dir / STATE_DIR / f"{split}.json").is_file()
    if (data_dir / split).exists() and not has_record:
        raise DataDirError(f"{data_dir / split} exists but was not made by this prep stage (no record in "
                           f"{data_dir / STATE_DIR}); move it away or choose an empty --data-dir")
    return has_record and (data_dir / split).is_dir()


def _load_record(archive_dir: Path, data_dir: Path, split: str) -> dict[str, Any] | None:
    if not _split_done(data_dir, split):
        return None
    record = read_json(data_dir / STATE_DIR / f"{split}.json", DataDirError, f"remove it and {data_dir / split} to "
                       "redo that split")
    assert record is not None
    _check_same_archives(archive_dir, data_dir, {SPLIT_ARCHIVES[split]: record["archive"]})
    record["archive"]["read_in_this_run"] = False
    log.info("%s is already extracted and verified; skipping it", data_dir / split)
    return record


def _run_split(split: str, archive: Path, data_dir: Path, devkit: Devkit, *, expected_md5: str | None,
               workers: int) -> dict[str, Any]:
    """Extract one split into its staging folder, record it, then rename it into place."""
    staging = staging_dir(data_dir, split)
    log.info("extracting %s into %s with %d writer threads", archive, data_dir / split, workers)
    try:
        if split == "train":
            record = extract_train(archive, staging, classes=devkit.wnids, expected_md5=expected_md5,
                                   workers=workers)
        elif split == "val":
            record = extract_val(archive, staging, devkit=devkit, expected_md5=expected_md5, workers=workers)
        else:
            record = extract_flat(archive, staging, expected_md5=expected_md5, workers=workers)
    except BaseException as exc:
        # train keeps its finished classes to resume; val and test start afresh anyway; files from an
        # archive with the wrong checksum are never kept
        if split != "train" or isinstance(exc, ChecksumError):
            log.error("removing %s after the error", staging)
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if split == "test":
        record["images"] = sum(1 for entry in os.scandir(staging) if entry.is_file())
    else:
        record["per_class"] = count_files(staging)
        record["images"] = sum(record["per_class"].values())
    atomic_write_text(data_dir / STATE_DIR / f"{split}.json", json.dumps(record))
    os.rename(staging, data_dir / split)
    if split in INDEXED_SPLITS:
        write_index(data_dir, split)
    log.info("%s: %d images", data_dir / split, record["images"])
    return record


def write_missing_indexes(data_dir: Path) -> None:
    """The file index of each split that has none (pipeline.core.file_index)."""
    for split in INDEXED_SPLITS:
        if not index_path(data_dir, split).is_file():
            log.info("writing the file index of %s (%d images)", data_dir / split, write_index(data_dir, split))


def _check_same_archives(archive_dir: Path, data_dir: Path, recorded: Mapping[str, Mapping[str, Any]]) -> None:
    """The archives in archive_dir must be those the finished splits were made from (see check_same_archive)."""
    split_of = {name: split for split, name in SPLIT_ARCHIVES.items()}
    for name, stats in recorded.items():
        split = split_of.get(name)
        redo = (f"remove {data_dir / split} and {REPORT_FILE} (that split alone is redone)" if split else
                f"remove {data_dir} (the classes come from it)")
        check_same_archive(archive_dir / name, stats, data_dir, redo)


def reverify_imagenet(data_dir: Path, archive_dir: Path) -> dict[str, Any]:
    """A finished data dir: count the files again and compare with the report; a difference is an error, and so
    are archives other than those it was prepared from, or a test archive it was prepared without."""
    start = time.monotonic()
    report = read_report(data_dir)
    assert report is not None
    _check_same_archives(archive_dir, data_dir, report["archives"])
    if "test" not in report["splits"] and archive_stat(archive_dir / TEST_TAR) is not None:
        raise DataDirError(f"{data_dir} was prepared without the {TEST_TAR} now in {archive_dir}; to add the test "
                           f"split, remove {data_dir / REPORT_FILE} and run prep again (train and val are kept)")
    for split, record in report["splits"].items():
        folder = data_dir / split
        if not folder.is_dir():
            raise DataDirError(f"{folder} is gone since prep ({REDO_HINT})")
        if "per_class" in record:
            found = count_files(folder)
            changed = sorted(w for w in set(found) | set(record["per_class"])
                             if found.get(w, 0) != record["per_class"].get(w, 0))
            if changed:
                w = changed[0]
                raise DataDirError(f"{folder}/{w} holds {found.get(w, 0)} files, the prep report says "
                                   f"{record['per_class'].get(w, 0)} ({len(changed)} classes differ): the data dir "
                                   f"changed since prep ({REDO_HINT})")
    log.info("%s is already prepared: counts re-verified in %.1f s (%s)", data_dir, time.monotonic() - start,
             ", ".join(f"{s} {r['images']:,}" for s, r in report["splits"].items()))
    return report
