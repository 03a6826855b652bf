"""What prep reports about an ImageNet data dir, whatever its layout: counts per split and class, the files left
out of val, the archives read (size, MD5, speed), and whether the official counts match."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.prep.archives import DEVKIT_TAR, TEST_TAR, TRAIN_TAR, VAL_TAR
from pipeline.prep.datadir import REPORT_FILE
from pipeline.prep.devkit import Devkit

log = logging.getLogger(__name__)

OFFICIAL_COUNTS = {"train": 1_281_167, "val": 50_000, "classes": 1000}
SPLIT_ARCHIVES = {"train": TRAIN_TAR, "val": VAL_TAR, "test": TEST_TAR}


def imagenet_report(archive_dir: Path, data_dir: Path, devkit: Devkit,
                     records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    archives = {DEVKIT_TAR: devkit.stats}
    splits = {}
    for split, record in records.items():
        archives[SPLIT_ARCHIVES[split]] = record.pop("archive")
        splits[split] = record
    train_classes = set(splits["train"]["per_class"])
    splits["train"]["missing_classes"] = [w for w in devkit.wnids if w not in train_classes]
    counts = {"train": splits["train"]["images"], "val": splits["val"]["images"], "classes": len(devkit.wnids)}
    return {"dataset": "imagenet", "archive_dir": str(archive_dir.absolute()), "data_dir": str(data_dir.absolute()),
            "classes": len(devkit.wnids), "archives": archives, "splits": splits,
            "official_counts": OFFICIAL_COUNTS, "official_counts_match": counts == OFFICIAL_COUNTS}


def log_summary(report: dict[str, Any], data_dir: Path) -> None:
    val = report["splits"]["val"]
    log.info("prep done in %.1f s (%.1f MB/s): %d train images in %d classes, %d val images; official counts "
             "match: %s", report["seconds"], report["mb_per_s"], report["splits"]["train"]["images"],
             len(report["splits"]["train"]["per_class"]), val["images"], report["official_counts_match"])
    for key in ("missing", "unlabelled", "extra"):
        if val[key]:
            log.warning("val files %s (%d): %s", key, len(val[key]), ", ".join(val[key][:20]))
    if report["splits"]["train"]["missing_classes"]:
        log.warning("classes without a train tar: %s", report["splits"]["train"]["missing_classes"])
    log.info("report: %s", data_dir / REPORT_FILE)
