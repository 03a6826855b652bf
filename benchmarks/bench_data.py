"""The data layouts in one run: prep wall time, start-up from a 1,281,167-entry index, loader img/s on the CPU.

    python -m benchmarks.bench_data [--out bench-out/data] [--classes 40 --train-per-class 50 --val-per-class 10]
                                    [--size 500 375] [--workers 2] [--batches 40] [--repeats 3]

On synthetic archives in the official shapes (ImageNet-sized JPEGs, 500 x 375 by default), written once and reused:

- prep: the reference recipe of benchmarks/bench_prep.py (GNU ``tar -xf`` of the train tar, one ``tar -xf`` per
  class tar, ``tar -xf`` of val and the val sort), alone (no checksum) and after ``md5sum``, against ``prepare``
  with each layout, every one with the MD5s verified in the same pass; ``shards`` without and with
  ``--shard-max-side 320``;
- start-up: a fresh process builds the train loader of an ``archives`` data dir whose index has 1,281,167 rows
  (all pointing at one real JPEG of a sparse archive) and draws its first batch;
- loader: train img/s of each layout (``--workers`` loader processes, batch 32, 224-pixel RandomResizedCrop, the
  CPU decode path), over the first ``--batches`` batches of an epoch, the workers' start included; best of
  ``--repeats``, the layouts interleaved.
The page cache is warm for every run alike; ``sync`` runs before each prep timing.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from benchmarks.bench_prep import add_archive_arguments, make_archives, reference_recipe, timed
from pipeline.core.config import Config
from pipeline.core.data_manifest import Manifest, ManifestFile, write_manifest
from pipeline.core.sample_index import make_samples, write_samples
from pipeline.prep.classes import write_classes
from pipeline.prep.packed import prepare_packed
from pipeline.prep.prepare import prepare_imagenet
from pipeline.prep.synthetic import DEVKIT_TAR, TRAIN_TAR, VAL_TAR

TRAIN_ROWS = 1_281_167
STARTUP = ("import sys, time; start = time.perf_counter(); from pipeline.core.config import Config; "
           "from pipeline.core.distributed import DistEnv; from pipeline.data.loaders import build_train_loader; "
           "import torch; cfg = Config(); cfg.data.data_dir, cfg.data.layout, cfg.data.workers = sys.argv[1], "
           "'archives', 0; cfg.train.batch_size = 32; imported = time.perf_counter(); "
           "loader, _ = build_train_loader(cfg, DistEnv(), torch.device('cpu'), seed=0); "
           "images, _ = next(iter(loader)); print(time.perf_counter() - imported, imported - start, len(images))")


def config(data_dir: Path, layout: str, workers: int, *, max_side: int = 0) -> Config:
    cfg = Config()
    cfg.data.data_dir, cfg.data.layout, cfg.data.workers = str(data_dir), layout, workers
    cfg.prep.shard_max_side, cfg.prep.shard_size_mb = max_side, 64
    return cfg


def big_index(root: Path, jpeg: bytes) -> None:
    """An archives data dir of TRAIN_ROWS train rows (1,000 classes), all reading one JPEG of a sparse archive."""
    archive = root / "archive.tar"
    with open(archive, "wb") as fh:
        fh.write(jpeg)
        fh.truncate(1 << 30)  # sparse: 1 GiB on paper
    write_classes(root, [(f"n{c:08d}", f"class {c}") for c in range(1000)])
    rows = make_samples([(0, 0, len(jpeg), i % 1000, f"n{i % 1000:08d}_{i}.JPEG") for i in range(TRAIN_ROWS)])
    samples = {"train": write_samples(root, "train", rows), "val": write_samples(root, "val", rows[:1000])}
    write_manifest(root, Manifest("archives", str(root), (ManifestFile("archive.tar", 1 << 30, "0" * 32),),
                                  ("classes.tsv", "train.samples.npy", "val.samples.npy"), {"samples": samples}))


def startup(root: Path) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", STARTUP, str(root)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds, imports, _ = out.stdout.split()
    return float(seconds), float(imports)


def loader_speed(cfg: Config, batches: int) -> float:
    """Train img/s of cfg's layout over its first ``batches`` batches, workers' start included."""
    import torch

    from pipeline.core.distributed import DistEnv
    from pipeline.data.loaders import build_train_loader

    cfg.train.batch_size = 32
    loader, sampler = build_train_loader(cfg, DistEnv(), torch.device("cpu"), seed=0)
    sampler.set_epoch(0)
    seen, start = 0, time.perf_counter()
    for step, (images, _) in enumerate(loader, 1):
        seen += len(images)
        if step == batches:
            break
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_archive_arguments(parser, out="bench-out/data", classes=40, train_per_class=50, size=(500, 375))
    parser.add_argument("--workers", type=int, default=2, help="prep threads and loader processes")
    parser.add_argument("--batches", type=int, default=40, help="timed loader batches of 32 per layout")
    parser.add_argument("--repeats", type=int, default=3, help="loader timings per layout (interleaved, best kept)")
    args = parser.parse_args(argv)
    out = args.out.absolute()
    logging.basicConfig(level=logging.WARNING)
    info = make_archives(args, out / "archives", seed=0)
    nbytes = sum((info.archive_dir / n).stat().st_size for n in (TRAIN_TAR, VAL_TAR, DEVKIT_TAR))
    print(f"archives: {nbytes / 1e6:.0f} MB, {args.classes * (args.train_per_class + args.val_per_class)} images of "
          f"{args.size[0]} x {args.size[1]}; {os.cpu_count()} CPUs")
    layouts = {"folders": 0, "archives": 0, "shards": 0, "shards-320": 320}
    archives = [str(info.archive_dir / n) for n in (TRAIN_TAR, VAL_TAR, DEVKIT_TAR)]
    prep = {"tar -x recipe": timed("GNU tar -x recipe (no MD5)", lambda d: reference_recipe(info.archive_dir, d),
                                   out / "recipe", nbytes)["seconds"],
            "md5sum + tar -x": timed("md5sum, then the tar -x recipe", lambda d: (
                subprocess.run(["md5sum", *archives], check=True, capture_output=True),
                reference_recipe(info.archive_dir, d)), out / "recipe", nbytes)["seconds"]}
    for name, side in layouts.items():
        layout = name.split("-")[0]
        cfg = config(out / f"data-{name}", layout, args.workers, max_side=side)
        run = ((lambda d: prepare_imagenet(info.archive_dir, d, workers=args.workers, expected_md5=info.md5))
               if layout == "folders" else
               (lambda d, cfg=cfg: (setattr(cfg.prep, "archive_dir", str(info.archive_dir)),
                                    prepare_packed(cfg, expected_md5=info.md5))))
        prep[name] = timed(f"prep --layout {name}", run, out / f"data-{name}", nbytes)["seconds"]
    speeds = {name: 0.0 for name in layouts}
    for _ in range(args.repeats):  # interleaved, best of: the box's other load varies
        for name in layouts:
            speed = loader_speed(config(out / f"data-{name}", name.split("-")[0], args.workers), args.batches)
            speeds[name] = max(speeds[name], speed)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        jpeg = next((out / "data-folders" / "train").rglob("*.JPEG")).read_bytes()
        start = time.perf_counter()
        big_index(Path(tmp), jpeg)
        print(f"index of {TRAIN_ROWS:,} rows written in {time.perf_counter() - start:.1f} s")
        first = min(startup(Path(tmp)) for _ in range(3))
    print(f"\n| step | {' | '.join(prep)} |\n|---|{'---|' * len(prep)}")
    print(f"| prep wall time, s | {' | '.join(f'{s:.2f}' for s in prep.values())} |")
    print(f"| vs tar -x | {' | '.join(f'{prep[next(iter(prep))] / s:.1f}x' for s in prep.values())} |")
    print(f"\n| loader, {args.workers} workers | {' | '.join(speeds)} |\n|---|{'---|' * len(speeds)}")
    print(f"| train img/s | {' | '.join(f'{v:.0f}' for v in speeds.values())} |")
    base = speeds["folders"]
    print(f"| vs folders | {' | '.join(f'{v / base:.2f}x' for v in speeds.values())} |")
    print(f"\nstart-up to the first batch from an index of {TRAIN_ROWS:,} rows: {first[0]:.2f} s (best of 3, after "
          f"{first[1]:.1f} s of imports)")
    for name in layouts:
        shutil.rmtree(out / f"data-{name}", ignore_errors=True)
    shutil.rmtree(out / "recipe", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
