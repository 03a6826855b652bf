"""Prep of the ``archives`` and ``shards`` layouts: an index instead of a million files.

``--layout archives`` reads the official train and val archives once (MD5 from the same pass) and writes only::

    D/train.samples.npy, D/val.samples.npy   where each JPEG lies in the archives, and its label
    D/classes.tsv, D/prep_report.json       as for folders
    D/manifest.json                         the archives (absolute dir, size, MD5); written last

``--layout shards`` reads the same way, then writes ``D/shards/{train,val}-NNNNNN.tar`` (pipeline.prep.shards)
and points the indexes and the manifest at them. Either is resumable (the scans and finished shards are kept in
``D/.prep/``); a finished data dir (its manifest present) is re-verified in seconds (each file's size, and for
shards the options they were made with: --shard-size-mb, --shard-seed, the resize). The test archive has no labels
and is not read.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.core.config import Config
from pipeline.core.data_manifest import (MANIFEST_FILE, DataManifestError, Manifest, ManifestFile, files_dir,
                                         read_manifest, write_manifest)
from pipeline.core.sample_index import samples_name, write_samples
from pipeline.prep.archives import DEVKIT_TAR, TRAIN_TAR, VAL_TAR, ArchiveError, archive_exists, missing_archive_error
from pipeline.prep.classes import CLASSES_FILE, write_classes
from pipeline.prep.datadir import (DataDirError, check_classes, check_dataset, check_layout, delete_archive, disk_full_guard,
                                   make_data_dir, read_report, write_report)
from pipeline.prep.devkit import read_devkit
from pipeline.prep.imagenet_report import SPLIT_ARCHIVES, imagenet_report, log_summary
from pipeline.prep.scan import scan_split
from pipeline.prep.shards import SHARD_DIR, Resize, check_shard_count, write_split_shards

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


def prepare_packed(cfg: Config, *, expected_md5: Mapping[str, str] | None) -> dict[str, Any]:
    """The prep stage for cfg.data.layout ``archives`` or ``shards``."""
    start = time.monotonic()
    layout, archive_dir, data_dir = cfg.data.layout, Path(cfg.prep.archive_dir), Path(cfg.data.data_dir)
    make_data_dir(data_dir)
    check_dataset(data_dir, "imagenet")
    check_layout(data_dir, layout)
    try:
        manifest = read_manifest(data_dir)
    except DataManifestError as exc:
        raise DataDirError(f"{exc} (or remove it to prepare {data_dir} again)") from None
    if manifest is not None:
        return reverify_packed(data_dir, manifest, cfg)
    archives = [archive_dir / name for name in (DEVKIT_TAR, TRAIN_TAR, VAL_TAR)]
    absent = [path for path in archives if not archive_exists(path)]
    if absent:
        raise missing_archive_error(absent[0]) if len(absent) == 1 else ArchiveError(
            f"archives {[p.name for p in absent]} are missing from {archive_dir}; put the official files there "
            "or pass --archive-dir")
    expected = dict(expected_md5 or {})
    needs = "a few hundred MB" if layout == "archives" else "about the archives' size (147 GB), less when re-encoded"
    with disk_full_guard(data_dir, needs=needs):
        devkit = read_devkit(archive_dir / DEVKIT_TAR, expected_md5=expected.get(DEVKIT_TAR))
        check_classes(data_dir, devkit)
        write_classes(data_dir, [(wnid, devkit.words[wnid]) for wnid in devkit.wnids])
        scans = {split: scan_split(split, archive_dir / SPLIT_ARCHIVES[split], data_dir, devkit, file=k,
                                   expected_md5=expected.get(SPLIT_ARCHIVES[split]))
                 for k, split in enumerate(SPLITS)}
        records = {split: record for split, (_, record) in scans.items()}
        extra: dict[str, Any] = {}
        if layout == "archives":
            files_root = str(archive_dir.absolute())
            files = [ManifestFile(SPLIT_ARCHIVES[s], r["archive"]["bytes"], r["archive"]["md5"])
                     for s, r in records.items()]
            rows = {split: samples for split, (samples, _) in scans.items()}
        else:
            files_root, files, rows = SHARD_DIR, [], {}
            extra.update(shard_options(cfg))
            sources = [archive_dir / SPLIT_ARCHIVES[split] for split in SPLITS]
            shard_bytes = cfg.prep.shard_size_mb * 10 ** 6  # MB as the flag counts them
            check_shard_count([samples for samples, _ in scans.values()], seed=cfg.prep.shard_seed,
                              shard_bytes=shard_bytes)
            for split, (samples, _) in scans.items():
                shard_files, rows[split] = write_split_shards(
                    split, samples, sources, data_dir, first_file=len(files), seed=cfg.prep.shard_seed,
                    shard_bytes=shard_bytes, resize=_resize(cfg), workers=cfg.data.workers)
                files += shard_files
        extra["samples"] = {split: write_samples(data_dir, split, rows[split]) for split in SPLITS}
        report = imagenet_report(archive_dir, data_dir, devkit, records)
        report.update(layout=layout, resize=extra.get("resize"))
        write_report(data_dir, report, start=start)
        write_manifest(data_dir, Manifest(layout, files_root, tuple(files),
                                          (CLASSES_FILE, *(samples_name(split) for split in SPLITS)), extra))
    if cfg.prep.delete_archives:  # the shards layout only (the validation refuses it for archives)
        for path in archives:
            delete_archive(path)
    log_summary(report, data_dir)
    return report


def _resize(cfg: Config) -> Resize:
    return Resize(cfg.prep.shard_max_side, cfg.prep.shard_quality)


def shard_options(cfg: Config) -> dict[str, Any]:
    """What the shards' bytes depend on besides the archives, as the manifest records it (flags in the errors)."""
    return {"resize": _resize(cfg).record(), "shard_size_mb": cfg.prep.shard_size_mb, "shard_seed": cfg.prep.shard_seed}


OPTION_FLAGS = {"resize": "--shard-max-side/--shard-quality", "shard_size_mb": "--shard-size-mb",
                "shard_seed": "--shard-seed"}


def reverify_packed(data_dir: Path, manifest: Manifest, cfg: Config) -> dict[str, Any]:
    """A finished packed data dir: shards made with the options asked for now, every large file there with its size
    (MD5s are staging's and a re-prep's)."""
    if manifest.layout == "shards":
        for key, wanted in shard_options(cfg).items():
            if key in manifest.extra and manifest.extra[key] != wanted:
                raise DataDirError(f"{data_dir} holds shards made with {key} {manifest.extra[key]} "
                                   f"({OPTION_FLAGS[key]}), not {wanted}: pass the options it was prepared with, or "
                                   f"remove {data_dir / MANIFEST_FILE} and run prep again to rewrite the shards")
    root = files_dir(data_dir, manifest)
    for entry in manifest.files:
        path = root / entry.name
        size = path.stat().st_size if path.is_file() else None
        if size != entry.size:
            raise DataDirError(f"{path} is {'missing' if size is None else f'{size:,} bytes'}, the manifest of "
                               f"{data_dir} says {entry.size:,} bytes: restore it, or remove {data_dir} and run prep "
                               "again")
    report = read_report(data_dir)
    if report is None:
        raise DataDirError(f"{data_dir} has a manifest but no prep report; remove the manifest and run prep again")
    log.info("%s is already prepared (layout %s, %d files verified by size)", data_dir, manifest.layout,
             len(manifest.files))
    return report
