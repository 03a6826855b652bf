"""CIFAR-10 prep: ``cifar-10-python.tar.gz`` verified and extracted to ``D/cifar-10-batches-py/``.

That folder is what torchvision's ``CIFAR10(root=D, download=False)`` reads (pickled batches
``data_batch_1..5``, ``test_batch`` and ``batches.meta``). The batches are pickles, which can run code
when loaded, so the prep stage reads them for its counts with an unpickler that allows only the numpy
array globals a batch needs.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.prep.archives import CIFAR10_TAR, ArchiveError, check_member, read_archive, safe_name, write_member
from pipeline.prep.classes import write_classes
from pipeline.prep.datadir import (CIFAR_FOLDER, REPORT_FILE, DataDirError, check_dataset, check_same_archive,
                                   delete_archive, disk_full_guard, make_data_dir, read_report, staging_dir, write_report)

log = logging.getLogger(__name__)

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
OFFICIAL_COUNTS = {"train": 50_000, "test": 10_000, "classes": 10}
_NUMPY_CORE = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): (_NUMPY_CORE, "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): (_NUMPY_CORE, "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Loads a CIFAR batch and nothing else: any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(*_ALLOWED_GLOBALS[(module, name)])


def load_batch(path: Path) -> dict[str, Any]:
    """One pickled batch with ``str`` keys (as torchvision loads it), read with the restricted unpickler."""
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ArchiveError(f"{path.name} in the CIFAR-10 archive is not a readable batch ({exc}); "
                           "download cifar-10-python.tar.gz again") from None
    if not isinstance(batch, dict):
        raise ArchiveError(f"{path.name} in the CIFAR-10 archive holds a {type(batch).__name__}, not a batch dict")
    return batch


def count_labels(folder: Path, names: tuple[str, ...], label_names: list[str]) -> dict[str, int]:
    """Images per class over the given batches, checking each batch's data against its labels."""
    counts = dict.fromkeys(label_names, 0)
    for name in names:
        batch = load_batch(folder / name)
        labels, data = batch.get("labels"), batch.get("data")
        if labels is None or not isinstance(data, np.ndarray) or data.shape != (len(labels), 3072):
            raise ArchiveError(f"{name} in the CIFAR-10 archive lacks 'labels' or an N x 3072 'data' array")
        bad = [label for label in labels if not (isinstance(label, (int, np.integer)) and 0 <= label < len(counts))]
        if bad:
            raise ArchiveError(f"{name} in the CIFAR-10 archive has {len(bad)} label(s) outside 0..{len(counts) - 1} "
                               f"(first: {bad[0]!r}); the archive is damaged, download cifar-10-python.tar.gz again")
        for label in labels:
            counts[label_names[label]] += 1
    return counts


def prepare_cifar10(archive_dir: Path, data_dir: Path, *, expected_md5: str | None = None,
                    delete_archives: bool = False) -> dict[str, Any]:
    """Verify and extract the CIFAR-10 archive into ``data_dir/cifar-10-batches-py``; write classes and report."""
    start = time.monotonic()
    archive_dir, data_dir = Path(archive_dir), Path(data_dir)
    make_data_dir(data_dir)
    check_dataset(data_dir, "cifar10")
    report = read_report(data_dir)
    if report is not None:
        check_same_archive(archive_dir / CIFAR10_TAR, report["archives"][CIFAR10_TAR], data_dir,
                           f"remove {data_dir / CIFAR_FOLDER} and {REPORT_FILE}")
        return reverify_cifar10(data_dir, report)
    final = data_dir / CIFAR_FOLDER
    if final.exists():
        raise DataDirError(f"{final} exists but has no {REPORT_FILE} beside it: it was not made "
                           "by this prep stage; move it away or choose an empty --data-dir")
    archive, staging = archive_dir / CIFAR10_TAR, staging_dir(data_dir, "cifar10")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    extra: list[str] = []
    with disk_full_guard(data_dir, needs="about 180 MB"):
        try:
            with read_archive(archive, expected_md5=expected_md5) as read:
                assert read.tar is not None
                for member in read.tar:
                    path = check_member(member, archive.name)
                    if member.isfile() and path.parts[:1] == (CIFAR_FOLDER,) and len(path.parts) == 2:
                        write_member(read.tar, member, staging / safe_name(path.name, f"{archive.name}: member"))
                    elif member.isfile():
                        extra.append(member.name)
            report = _cifar_report(archive_dir, data_dir, staging, read.stats, extra)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.rename(staging, final)
        report = write_report(data_dir, report, start=start)
    if delete_archives:
        delete_archive(archive)
    log.info("CIFAR-10 ready in %s: %d train, %d test images (official counts match: %s); report: %s", final,
             report["splits"]["train"]["images"], report["splits"]["test"]["images"],
             report["official_counts_match"], data_dir / REPORT_FILE)
    return report


def _cifar_report(archive_dir: Path, data_dir: Path, staging: Path, stats: dict[str, Any],
                  extra: list[str]) -> dict[str, Any]:
    """Counts from the extracted batches; the class list is written from batches.meta."""
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH, META_FILE) if not (staging / n).is_file()]
    if missing:
        raise ArchiveError(f"{archive_dir / CIFAR10_TAR} has no {CIFAR_FOLDER}/{missing[0]} (missing: {missing}); "
                           "is it the CIFAR-10 python version, cifar-10-python.tar.gz?")
    label_names = load_batch(staging / META_FILE).get("label_names")
    if not isinstance(label_names, list) or not label_names or not all(isinstance(n, str) for n in label_names):
        raise ArchiveError(f"{META_FILE} in {archive_dir / CIFAR10_TAR} has no 'label_names' list of texts")
    for name in label_names:  # they become the class list's names
        safe_name(name, f"{archive_dir / CIFAR10_TAR}: {META_FILE}: label name")
    splits = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
        per_class = count_labels(staging, names, label_names)
        splits[split] = {"images": sum(per_class.values()), "per_class": per_class}
    write_classes(data_dir, [(name, name) for name in label_names])  # index = the label stored in the batches
    counts = {"train": splits["train"]["images"], "test": splits["test"]["images"], "classes": len(label_names)}
    return {"dataset": "cifar10", "archive_dir": str(archive_dir.absolute()), "data_dir": str(data_dir.absolute()),
            "classes": len(label_names), "archives": {CIFAR10_TAR: stats}, "splits": splits, "extra": extra,
            "files": {n.name: n.stat().st_size for n in sorted(staging.iterdir())},
            "official_counts": OFFICIAL_COUNTS, "official_counts_match": counts == OFFICIAL_COUNTS}


def reverify_cifar10(data_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """A finished data dir: every extracted file must still be there with the size the report states."""
    folder = data_dir / CIFAR_FOLDER
    for name, size in report["files"].items():
        path = folder / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            raise DataDirError(f"{path} is {'missing' if found is None else f'{found} bytes'}, the prep report "
                               f"says {size} bytes: the data dir changed since prep; remove {folder} and "
                               f"{REPORT_FILE}, then run prep again")
    log.info("%s is already prepared: its %d files re-verified", folder, len(report["files"]))
    return report
