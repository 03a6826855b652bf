"""One epoch end to end, as a user runs it: ``launch.py --executor local`` and ``python -m jobs.train`` against timm.

    python -m benchmarks.bench_startup [--repeats 3] [--workers 2] [--variants timm,jobs.train,launch,launch-2proc]
                                       [--data-dir DIR] [--out bench-out/startup]

Each variant is one command, timed from its start to its exit (python start-up and imports, the launcher, submitit,
torchrun, the pre-flight, loader workers, the epoch's training, validation, checkpoint writes, teardown), repeated
``--repeats`` times interleaved so a busy machine slows all alike. ResNet-18, batch 32 (all processes), bf16
autocast, channels_last, one epoch of train + val on 480 train and 160 val synthetic 500x375 JPEGs (page cache
warm). Start-up: from the command's start to its line announcing the training loop (ours: ``pipeline.train.trainer:
training ...``, after the pre-flight, the imports and the process group; timm: the same line before its loop).
Outside the loop: wall clock less the epoch's training part (epochs.csv ``epoch_time_s``; timm's own figure).
timm's side is benchmarks/timm_epoch.py (its train.py is not in the wheel): ``pip install -e '.[bench]'``.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
LOOP_LINE = re.compile(r"(pipeline\.train|timm_epoch): training ")
TRAINED = re.compile(r"epoch trained in ([0-9.]+) s")
COMMON = ["--model", "resnet18", "--amp", "bf16", "--channels-last", "--epochs", "1", "--device", "cpu",
          "--print-freq", "5"]


def commands(variant: str, data_dir: Path, run_dir: Path, workers: int) -> list[str]:
    """The command line of one variant; the same model, data, precision and global batch everywhere."""
    ours = ["--data-dir", str(data_dir), "--run-dir", str(run_dir), *COMMON]
    if variant == "timm":
        return [sys.executable, "-m", "benchmarks.timm_epoch", str(data_dir), "--batch-size", "32",
                "--workers", str(workers), "--out", str(run_dir)]
    if variant == "jobs.train":
        return [sys.executable, "-m", "jobs.train", *ours, "--batch-size", "32", "--workers", str(workers)]
    local = [sys.executable, "launch.py", "--stage", "train", "--executor", "local", *ours]
    if variant == "launch":
        return [*local, "--batch-size", "32", "--workers", str(workers)]
    if variant == "launch-2proc":  # the demo's shape: 2 processes x 16, one worker each, pre-flight on
        return [*local, "--batch-size", "16", "--procs-per-node", "2", "--workers", str(max(workers // 2, 1))]
    raise SystemExit(f"unknown variant {variant!r}")


def timed_run(cmd: list[str], run_dir: Path) -> dict[str, float]:
    """Wall clock, start-up (to the training-loop line) and the epoch's training part of one command, s."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    startup = train_s = float("nan")
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if startup != startup and LOOP_LINE.search(line):
            startup = time.monotonic() - start
        if match := TRAINED.search(line):
            train_s = float(match.group(1))
    wall = time.monotonic() - start
    if proc.wait() != 0:
        raise SystemExit(f"{cmd} failed:\n{''.join(lines[-30:])}")
    epochs = run_dir / "epochs.csv"
    if epochs.exists():
        with epochs.open() as fh:
            train_s = float(next(csv.DictReader(fh))["epoch_time_s"])
    return {"wall_s": wall, "startup_s": startup, "train_s": train_s, "outside_loop_s": wall - train_s}


def make_data(root: Path) -> Path:
    from benchmarks.bench_train import add_odd_files, warm_page_cache
    from pipeline.prep.synthetic import make_image_folder

    data_dir = make_image_folder(root, num_classes=10, train_per_class=48, val_per_class=16, size=(500, 375), seed=0)
    add_odd_files(data_dir, 50)
    warm_page_cache(data_dir)
    return data_dir


def summarize(runs: dict[str, list[dict[str, float]]]) -> tuple[list[list[str]], dict[str, dict[str, float]]]:
    stats = {v: {f"{k}_{how}": fn(r[k] for r in rs) for k in rs[0] for how, fn in
                 (("best", min), ("median", lambda xs: statistics.median(list(xs))))} for v, rs in runs.items()}
    ref = stats.get("timm")
    rows = []
    for variant, s in stats.items():
        ratio = (f"{ref['wall_s_best'] / s['wall_s_best']:.2f}x / {ref['wall_s_median'] / s['wall_s_median']:.2f}x"
                 if ref else "")
        rows.append([variant, f"{s['wall_s_best']:.1f} / {s['wall_s_median']:.1f}",
                     f"{s['startup_s_best']:.1f} / {s['startup_s_median']:.1f}",
                     f"{s['train_s_best']:.1f} / {s['train_s_median']:.1f}",
                     f"{s['outside_loop_s_best']:.1f} / {s['outside_loop_s_median']:.1f}", ratio])
    return rows, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="loader workers (per process)")
    parser.add_argument("--variants", default="timm,jobs.train,launch,launch-2proc", type=lambda t: t.split(","))
    parser.add_argument("--data-dir", type=Path, default=None, help="an ImageFolder tree; default: synthetic")
    parser.add_argument("--out", type=Path, default=Path("bench-out/startup"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        data_dir = args.data_dir or make_data(Path(tmp) / "data")
        for repeat in range(args.repeats):
            for variant in args.variants:
                run_dir = Path(tmp) / f"{variant}-{repeat}"
                runs[variant].append(timed_run(commands(variant, data_dir, run_dir, args.workers), run_dir))
                print(f"repeat {repeat} {variant}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[variant][-1].items()),
                      flush=True)
    rows, stats = summarize(runs)
    table = tabulate(rows, headers=["variant", "wall s (best / median)", "start-up s", "epoch train s",
                                    "outside the loop s", "x timm (best / median)"], tablefmt="github",
                     disable_numparse=True)
    (args.out / "bench_startup.md").write_text(table + "\n")
    (args.out / "bench_startup.json").write_text(json.dumps({"runs": runs, "stats": stats}, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
