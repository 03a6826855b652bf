"""Training and eval img/s against the torchvision reference script's approach, same model, data and machine.

    python -m benchmarks.bench_train [--device cpu|cuda] [--model resnet18] [--steps 20] [--eval-steps 10]
                                     [--batch-size 32] [--workers 2] [--data-dir DIR] [--out bench-out/train]

Reference (torchvision ``references/classification/train.py``): ``ImageFolder`` with its preset
transforms (RandomResizedCrop 224 + flip; eval resize 256 + center crop 224), a plain loop in fp32,
NCHW, no channels_last, SGD, float32 images normalized per sample in the loader workers. Ours:
``train(cfg)`` in performance mode (``--max-steps``) with the device's fast path (uint8 batches from
the workers, normalized on the device; channels_last and bf16 autocast, fp16 on GPUs without bf16),
and our val loader with the same precision and device-side normalization for eval. Both are timed alike
(pipeline.metrics.ThroughputTimer): wall clock including the wait for data, after device synchronization,
the first steps left out. The data is a synthetic ImageFolder of ImageNet-sized JPEGs (``--data-dir`` takes
a prepared one instead), read once before the timings so both runs find the page cache warm. Results go to
``<out>/bench_train.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torchvision
from tabulate import tabulate
from torchvision.transforms import v2

from pipeline.config import Config
from pipeline.data import build_val_loader, device_batcher
from pipeline.distributed import DistEnv
from pipeline.metrics import Throughput, ThroughputTimer, warmup_steps_for
from pipeline.models import build_model
from pipeline.precision import Precision, setup_precision
from pipeline.records import PERF_FILE
from pipeline.synthetic import make_image_folder
from pipeline.train import train
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("bench_train")
CROP, RESIZE = 224, 256  # the reference's train crop, eval resize and center crop (pixels)


def fast_amp(device: torch.device) -> str:
    """Our default for the device: bf16 where it runs natively, else fp16 (GPUs before Ampere)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def reference_transforms(train: bool) -> v2.Compose:
    """torchvision reference presets (ClassificationPresetTrain/Eval) with their defaults."""
    head = ([v2.RandomResizedCrop(CROP, antialias=True), v2.RandomHorizontalFlip()] if train
            else [v2.Resize(RESIZE, antialias=True), v2.CenterCrop(CROP)])
    return v2.Compose(head + [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                              v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def reference_loader(data_dir: Path, split: str, args: argparse.Namespace, device: torch.device):
    folder = torchvision.datasets.ImageFolder(str(data_dir / split), transform=reference_transforms(split == "train"))
    return folder, torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=split == "train",
                                               num_workers=args.workers, pin_memory=device.type == "cuda",
                                               drop_last=split == "train")


def cycle(loader: Iterable, steps: int) -> Iterable:
    done = 0
    while True:
        for batch in loader:
            if done == steps:
                return
            yield batch
            done += 1


def reference_train(data_dir: Path, args: argparse.Namespace, device: torch.device) -> Throughput:
    """Throughput of the reference's plain fp32 NCHW loop (one process)."""
    folder, loader = reference_loader(data_dir, "train", args, device)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=len(folder.classes)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    timer = ThroughputTimer(device, warmup_steps_for(args.steps))
    for images, targets in cycle(loader, args.steps):
        timer.data_ready()
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = criterion(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timer.step_done(len(images))
    return timer.result()


def ours_train(data_dir: Path, args: argparse.Namespace, amp: str, work_dir: Path) -> dict[str, Any]:
    """The perf.csv row of train(cfg) in performance mode."""
    cfg = Config()
    cfg.data.data_dir, cfg.data.workers = str(data_dir), args.workers
    cfg.model.model, cfg.model.channels_last = args.model, True
    cfg.train.run_dir, cfg.train.device, cfg.train.amp = str(work_dir / "ours"), args.device, amp
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.print_freq = args.batch_size, args.steps, 5
    result = train(cfg)
    assert (Path(cfg.train.run_dir) / PERF_FILE).exists()
    return result["perf"]


@torch.inference_mode()
def timed_eval(model: nn.Module, loader: Iterable, steps: int, precision: Precision,
               to_device: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> Throughput:
    """img/s of forward passes over ``steps`` val batches (warm-up steps left out); ``to_device`` makes a
    loader batch the model's input."""
    model.eval()
    timer = ThroughputTimer(precision.device, warmup_steps_for(steps))
    for images, targets in cycle(loader, steps):
        timer.data_ready()
        images, _ = to_device(images, targets)
        with precision.autocast():
            model(images)
        timer.step_done(len(images))
    return timer.result()


def eval_pair(data_dir: Path, args: argparse.Namespace, device: torch.device,
              amp: str) -> tuple[Throughput, Throughput]:
    """(reference, ours) eval img/s on the val split, the same weights."""
    folder, loader = reference_loader(data_dir, "val", args, device)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=len(folder.classes))
    plain = setup_precision(device, "none", channels_last=False)
    reference = timed_eval(plain.prepare_model(model), loader, args.eval_steps, plain,
                           lambda images, targets: (images.to(device, non_blocking=True), targets))
    cfg = Config()
    cfg.data.data_dir, cfg.data.workers, cfg.train.batch_size = str(data_dir), args.workers, args.batch_size
    fast = setup_precision(device, amp, channels_last=True)
    ours = timed_eval(fast.prepare_model(model), build_val_loader(cfg, DistEnv(), device), args.eval_steps, fast,
                      device_batcher(cfg, fast))
    return reference, ours


def warm_page_cache(data_dir: Path) -> int:
    """Read every file once, so neither run pays for the first read from disk."""
    total = 0
    for path in data_dir.rglob("*"):
        if path.is_file():
            total += len(path.read_bytes())
    return total


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu"])
    parser.add_argument("--model", default="resnet18", help="registered model name (both runs)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (first 5 left out)")
    parser.add_argument("--eval-steps", type=int, default=10, help="eval batches per run (first 5 left out)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (both runs)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                        help="our precision; auto: bf16, or fp16 on GPUs without bf16")
    parser.add_argument("--data-dir", type=Path, default=None, help="an ImageFolder tree (train/, val/, classes.tsv)")
    parser.add_argument("--classes", type=int, default=10, help="classes of the synthetic data")
    parser.add_argument("--train-per-class", type=int, default=64, help="synthetic train images per class")
    parser.add_argument("--val-per-class", type=int, default=32, help="synthetic val images per class")
    parser.add_argument("--out", type=Path, default=Path("bench-out/train"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device if args.device == "cpu" else f"{args.device}:0")
    amp = fast_amp(device) if args.amp == "auto" else args.amp
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        work_dir = Path(tmp)
        data_dir = args.data_dir
        if data_dir is None:  # runs longer than an epoch go on to the next, as training does
            data_dir = make_image_folder(work_dir / "data", num_classes=args.classes,
                                         train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                         size=(320, 280), seed=0)
        log.info("data %s: %.0f MB read into the page cache", data_dir, warm_page_cache(data_dir) / 1e6)
        ref_train = reference_train(data_dir, args, device)
        our_train = ours_train(data_dir, args, amp, work_dir)
        ref_eval, our_eval = eval_pair(data_dir, args, device, amp)
    figures = {"train": (ref_train.img_per_s_all_ranks, ref_train.data_wait_frac,
                         our_train["img_per_s_all_ranks"], our_train["data_wait_frac"]),
               "eval": (ref_eval.img_per_s_all_ranks, ref_eval.data_wait_frac,
                        our_eval.img_per_s_all_ranks, our_eval.data_wait_frac)}
    rows = [[f"{kind} img/s", f"{ref:.1f}", f"{ref_wait:.0%}", f"{ours:.1f}", f"{our_wait:.0%}", f"{ours / ref:.2f}"]
            for kind, (ref, ref_wait, ours, our_wait) in figures.items()]
    setup = (f"{args.model}, {args.device}, batch {args.batch_size}, {args.workers} workers, {args.steps} train steps, "
             f"{args.eval_steps} eval batches, threads {torch.get_num_threads()}, cpus {os.cpu_count()}; "
             f"reference: ImageFolder, fp32, NCHW; ours: {amp} autocast, channels_last")
    table = tabulate(rows, headers=["", "reference", "data wait", "ours", "data wait", "ours / reference"],
                     tablefmt="github", disable_numparse=True)
    (args.out / "bench_train.md").write_text(f"{setup}\n\n{table}\n")
    (args.out / "bench_train.json").write_text(json.dumps(
        {"setup": setup, **{kind: dict(zip(("reference_img_per_s", "reference_data_wait_frac", "ours_img_per_s",
                                             "ours_data_wait_frac"), values)) for kind, values in figures.items()}},
        indent=2) + "\n")
    print(setup)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
