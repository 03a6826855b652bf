"""Prep speed against the reference recipe, on the same synthetic archives in one run.

    python -m benchmarks.bench_prep [--out bench-out/prep] [--classes 100 --train-per-class 32 --val-per-class 10]
                                    [--size 400 350] [--workers 4] [--repeats 1]

Reference recipe (what most ImageNet READMEs do): ``tar -xf`` of the outer train tar, then one
``tar -xf`` per class tar in a shell loop (deleting the class tar), ``tar -xf`` of the val tar, then
the classic val sort: sorted file names zipped with the ground-truth lines, each file moved into its
class; it checks no checksum, so it is also timed after an ``md5sum`` pass over the archives. Ours:
``prepare_imagenet`` with the MD5 of every archive verified in the same pass (the default), and once
more with ``--skip-checksum``. Archives are written once (about
300 MB by default, images of typical ImageNet size, 74 KB on average) and reused; the page cache is warm
for every run alike, and ``sync`` runs before each timing so no run pays for another's writes.
MB/s = bytes of the three archives / wall seconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

from pipeline.prep.devkit import parse_meta_mat
from pipeline.prep.prepare import prepare_imagenet
from pipeline.prep.synthetic import DEVKIT_TAR, TRAIN_TAR, VAL_TAR, SyntheticImageNet, make_imagenet_archives

CLASS_LOOP = """set -e
cd "$1"
tar -xf "$2"
find . -name "*.tar" | while read NAME ; do mkdir -p "${NAME%.tar}"; tar -xf "${NAME}" -C "${NAME%.tar}"; \
rm -f "${NAME}"; done
"""


def reference_recipe(archive_dir: Path, data_dir: Path) -> None:
    """The usual shell + script recipe, step by step as READMEs give it."""
    train, val = data_dir / "train", data_dir / "val"
    train.mkdir(parents=True)
    subprocess.run(["bash", "-c", CLASS_LOOP, "recipe", str(train), str(archive_dir / TRAIN_TAR)], check=True)
    val.mkdir()
    subprocess.run(["tar", "-xf", str(archive_dir / VAL_TAR), "-C", str(val)], check=True)
    with tarfile.open(archive_dir / DEVKIT_TAR) as devkit:
        meta = devkit.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
        truth = devkit.extractfile("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read()
    wnid_of_id, _ = parse_meta_mat(meta, "meta.mat")  # scipy.io.loadmat, leaf synsets, as the scripts do
    files = sorted(p.name for p in val.iterdir())
    for name, line in zip(files, truth.decode().split()):  # the classic zip: right only when nothing is missing
        (val / wnid_of_id[int(line)]).mkdir(exist_ok=True)
        os.rename(val / name, val / wnid_of_id[int(line)] / name)


def add_archive_arguments(parser: argparse.ArgumentParser, *, out: str, classes: int, train_per_class: int,
                          size: tuple[int, int]) -> None:
    """The synthetic archives a benchmark makes (where, classes, images per class, image size), alike in every one."""
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--classes", type=int, default=classes)
    parser.add_argument("--train-per-class", type=int, default=train_per_class)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=list(size), metavar=("WIDTH", "HEIGHT"))


def make_archives(args: argparse.Namespace, folder: Path, **options) -> SyntheticImageNet:
    """The archives add_archive_arguments describes, made in ``folder``."""
    return make_imagenet_archives(folder, num_classes=args.classes, train_per_class=args.train_per_class,
                                  val_per_class=args.val_per_class, size=tuple(args.size), **options)


def timed(label: str, run: Callable[[Path], None], data_dir: Path, nbytes: int) -> dict[str, float]:
    shutil.rmtree(data_dir, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    run(data_dir)
    seconds = time.perf_counter() - start
    result = {"seconds": round(seconds, 2), "mb_per_s": round(nbytes / 1e6 / seconds, 1)}
    print(f"  {label:<34} {seconds:7.2f} s  {result['mb_per_s']:7.1f} MB/s", flush=True)
    return result


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.glob("*/*")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_archive_arguments(parser, out="bench-out/prep", classes=100, train_per_class=32, size=(400, 350))
    parser.add_argument("--workers", type=int, default=4, help="prep writer threads (the config default)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    args.out = args.out.absolute()  # the recipe runs in other folders
    logging.basicConfig(level=logging.WARNING)

    info = make_archives(args, args.out / "archives", seed=0)
    nbytes = sum((info.archive_dir / n).stat().st_size for n in (TRAIN_TAR, VAL_TAR, DEVKIT_TAR))
    images = args.classes * (args.train_per_class + args.val_per_class)
    print(f"archives: {nbytes / 1e6:.0f} MB, {images} images, {args.classes} classes; {os.cpu_count()} CPUs")
    runs: dict[str, list[dict[str, float]]] = {"reference": [], "reference_md5sum": [], "ours": [],
                                               "ours_skip_checksum": []}
    archives = [str(info.archive_dir / n) for n in (TRAIN_TAR, VAL_TAR, DEVKIT_TAR)]
    for _ in range(args.repeats):
        runs["reference"].append(timed("reference (tar loop + val sort)", lambda d: reference_recipe(
            info.archive_dir, d), args.out / "reference", nbytes))
        runs["reference_md5sum"].append(timed("reference after md5sum", lambda d: (
            subprocess.run(["md5sum", *archives], check=True, capture_output=True),
            reference_recipe(info.archive_dir, d)), args.out / "reference", nbytes))
        runs["ours"].append(timed(f"prepare, MD5 verified, {args.workers} threads", lambda d: prepare_imagenet(
            info.archive_dir, d, workers=args.workers, expected_md5=info.md5), args.out / "ours", nbytes))
        runs["ours_skip_checksum"].append(timed(f"prepare, --skip-checksum, {args.workers} threads",
                                                lambda d: prepare_imagenet(info.archive_dir, d, workers=args.workers),
                                                args.out / "ours_skip", nbytes))
    for split in ("train", "val"):
        if tree(args.out / "reference" / split) != tree(args.out / "ours" / split):
            print(f"the {split} trees differ between the recipe and prepare()", file=sys.stderr)
            return 1
    best = {name: min(r["seconds"] for r in results) for name, results in runs.items()}
    for name, results in runs.items():
        median = statistics.median(r["seconds"] for r in results)
        print(f"  {name:<20} best {best[name]:6.2f} s ({nbytes / 1e6 / best[name]:6.1f} MB/s), median {median:6.2f} s")
    print(f"speed-up, best of {args.repeats}: MD5 verified over the reference without checksum "
          f"{best['reference'] / best['ours']:.2f}x, over the reference after md5sum "
          f"{best['reference_md5sum'] / best['ours']:.2f}x; skip-checksum over the reference "
          f"{best['reference'] / best['ours_skip_checksum']:.2f}x")
    summary = {"archive_bytes": nbytes, "images": images, "classes": args.classes, "workers": args.workers,
               "cpus": os.cpu_count(), "runs": runs, "best_seconds": best}
    (args.out / "bench_prep.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
