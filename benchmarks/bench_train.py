"""Training and eval img/s against the torchvision reference script's approach, same model, data and machine.

    python -m benchmarks.bench_train [--device cpu|cuda] [--model resnet50,resnet18] [--decode cpu,device]
                                     [--steps 20] [--eval-steps 10] [--batch-size 32] [--workers 2]
                                     [--data-dir DIR] [--out bench-out/train]

Reference (torchvision ``references/classification/train.py``): ``ImageFolder`` with its preset
transforms (RandomResizedCrop 224 + flip; eval resize 256 + center crop 224), a plain loop in fp32,
NCHW, no channels_last, SGD, float32 images normalized per sample in the loader workers. Ours:
``train(cfg)`` in performance mode (``--max-steps``) with the device's fast path (uint8 batches from
the workers, normalized on the device; channels_last and bf16 autocast, fp16 on GPUs without bf16),
and our val loader with the same precision and device-side normalization for eval; each of our runs once per
``--decode`` path (cpu: PIL in the workers; device: decode_jpeg and the augmentation on the device, see
pipeline/data/device_decode.py). All are timed alike
(pipeline.core.metrics.ThroughputTimer): wall clock including the wait for data, after device synchronization,
the first steps left out. The data is a synthetic ImageFolder of ImageNet-sized JPEGs (500x375, quality 90,
one in 50 rewritten as CMYK or grayscale; ``--data-dir`` takes a prepared one instead), read once before the timings so both runs find the page cache warm. Results go to
``<out>/bench_train.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torchvision
from PIL import Image
from tabulate import tabulate
from torchvision.transforms import v2

from pipeline.core.accelerator import Accelerator
from pipeline.core.config import Config
from pipeline.core.distributed import DistEnv
from pipeline.core.metrics import Throughput, ThroughputTimer, warmup_steps_for
from pipeline.core.precision import Precision, setup_precision
from pipeline.core.records import PERF_FILE
from pipeline.data.loaders import build_val_loader, device_batcher
from pipeline.data.prefetch import DeviceInputs
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.registry import build_model
from pipeline.prep.synthetic import make_image_folder
from pipeline.train.trainer import train

log = logging.getLogger("bench_train")
CROP, RESIZE = 224, 256  # the reference's train crop, eval resize and center crop (pixels)


def fast_amp(device: torch.device) -> str:
    """Our default for the device: bf16 where it runs natively, else fp16 (GPUs before Ampere, Ascend 910A)."""
    return "fp16" if Accelerator.of(device).amp_problem("bf16") else "bf16"


def reference_transforms(train: bool) -> v2.Compose:
    """torchvision reference presets (ClassificationPresetTrain/Eval) with their defaults."""
    head = ([v2.RandomResizedCrop(CROP, antialias=True), v2.RandomHorizontalFlip()] if train
            else [v2.Resize(RESIZE, antialias=True), v2.CenterCrop(CROP)])
    return v2.Compose(head + [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                              v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def reference_loader(data_dir: Path, split: str, args: argparse.Namespace, device: torch.device):
    folder = torchvision.datasets.ImageFolder(str(data_dir / split), transform=reference_transforms(split == "train"))
    return folder, torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=split == "train",
                                               num_workers=args.workers, pin_memory=device.type != "cpu",
                                               drop_last=split == "train")


def cycle(loader: Iterable, steps: int) -> Iterable:
    done = 0
    while True:
        for batch in loader:
            if done == steps:
                return
            yield batch
            done += 1


def with_wait(batches: Iterable) -> Iterator[tuple[float, Any]]:
    """(host seconds blocked on ``batches``, batch) pairs: the reference's loader wait, as its loop sees it."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield time.perf_counter() - start, batch


def reference_train(data_dir: Path, args: argparse.Namespace, model_name: str, device: torch.device) -> Throughput:
    """Throughput of the reference's plain fp32 NCHW loop (one process)."""
    folder, loader = reference_loader(data_dir, "train", args, device)
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=len(folder.classes)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    timer = ThroughputTimer(device, warmup_steps_for(args.steps))
    for waited, (images, targets) in with_wait(cycle(loader, args.steps)):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        timer.data_ready(waited)
        loss = criterion(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        timer.backward_done()
        optimizer.step()
        timer.step_done(len(images))
    return timer.result()


def ours_train(data_dir: Path, args: argparse.Namespace, model: str, amp: str, decode: str,
               work_dir: Path, *, steps: int | None = None) -> dict[str, Any]:
    """train(cfg) in performance mode: its perf.csv row (img/s, waits, step phases) and peak device memory."""
    cfg = Config()
    cfg.data.data_dir, cfg.data.workers, cfg.data.decode = str(data_dir), args.workers, decode
    cfg.model.model, cfg.model.channels_last = model, True
    cfg.train.run_dir, cfg.train.device, cfg.train.amp = str(work_dir / f"ours-{model}-{decode}"), args.device, amp
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.print_freq = args.batch_size, steps or args.steps, 5
    accelerator = Accelerator.of(torch.device(args.device))
    if accelerator.module is not None:
        accelerator.module.reset_peak_memory_stats()
    perf = train(cfg)["perf"]
    assert (Path(cfg.train.run_dir) / PERF_FILE).exists()
    return {**perf, "peak_mem_mib": accelerator.peak_memory_mib()}


def synthetic_ceiling(args: argparse.Namespace, model_name: str, amp: str, device: torch.device, *,
                      compiled: bool) -> Throughput:
    """The model alone: our precision and layout on one fixed batch already on the device, no loader, no decode
    (what the data path can at best let the model reach)."""
    torch.manual_seed(0)
    precision = setup_precision(device, amp, channels_last=True)
    model = precision.prepare_model(build_model(model_name, num_classes=args.classes)).train()
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(args.batch_size, 3, CROP, CROP, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, args.classes, (args.batch_size,), device=device)
    criterion = nn.CrossEntropyLoss()
    timer = ThroughputTimer(device, warmup_steps_for(args.steps) + (10 if compiled else 0))  # compiling is warm-up
    for _ in range(args.steps + (10 if compiled else 0)):
        timer.data_ready(0.0)
        with precision.autocast():
            loss = criterion(step_model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        timer.backward_done()
        precision.step(optimizer)
        timer.step_done(len(images))
    return timer.result()


def host_syncs_per_step(data_dir: Path, args: argparse.Namespace, model: str, amp: str, work_dir: Path) -> float:
    """Synchronizing CUDA calls per training step of ``--decode device``, counted by torch's sync debug mode."""
    steps = 12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ours_train(data_dir, args, model, amp, "device", work_dir / "sync-debug", steps=steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


@torch.inference_mode()
def timed_eval(model: nn.Module, loader: Iterable, steps: int, precision: Precision,
               to_device: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> Throughput:
    """img/s of forward passes over ``steps`` val batches (warm-up steps left out); ``to_device`` makes a
    loader batch the model's input."""
    model.eval()
    timer = ThroughputTimer(precision.device, warmup_steps_for(steps))
    inputs = DeviceInputs(cycle(loader, steps), lambda images, targets, batch_key: to_device(images, targets),
                          precision.device)
    for images, _ in inputs:
        timer.data_ready(inputs.loader_wait_s)
        with precision.autocast():
            model(images)
        timer.step_done(len(images))
    return timer.result()


def eval_runs(data_dir: Path, args: argparse.Namespace, device: torch.device, model_name: str,
              amp: str) -> dict[str, Throughput]:
    """Eval img/s on the val split of the reference and of each of our decode paths, the same weights."""
    folder, loader = reference_loader(data_dir, "val", args, device)
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=len(folder.classes))
    plain = setup_precision(device, "none", channels_last=False)
    runs = {"reference": timed_eval(plain.prepare_model(model), loader, args.eval_steps, plain,
                                    lambda images, targets: (images.to(device, non_blocking=True), targets))}
    fast = setup_precision(device, amp, channels_last=True)
    fast_model = fast.prepare_model(model)
    for decode in args.decode:
        cfg = Config()
        cfg.data.data_dir, cfg.data.workers, cfg.data.decode = str(data_dir), args.workers, decode
        cfg.train.batch_size = args.batch_size
        runs[decode] = timed_eval(fast_model, build_val_loader(cfg, DistEnv(), device), args.eval_steps, fast,
                                  device_batcher(cfg, fast))
    return runs


def figures(tp: Throughput) -> dict[str, float]:
    return {"train_img_per_s": tp.img_per_s_all_ranks, "train_data_wait_frac": tp.data_wait_frac,
            "train_device_wait_frac": tp.device_wait_frac, "input_wait_ms": tp.input_wait_ms,
            "fwd_bwd_ms": tp.fwd_bwd_ms, "optimizer_ms": tp.optimizer_ms}


def model_runs(data_dir: Path, args: argparse.Namespace, device: torch.device, model: str, amp: str,
               work_dir: Path) -> dict[str, dict[str, float]]:
    """Every run of one model: the reference, each decode path, and on request the ceiling and the sync count."""
    runs = {"reference": figures(reference_train(data_dir, args, model, device))}
    for decode in args.decode:
        perf = ours_train(data_dir, args, model, amp, decode, work_dir)
        runs[decode] = {"train_img_per_s": perf["img_per_s_all_ranks"], "train_data_wait_frac": perf["data_wait_frac"],
                        "train_device_wait_frac": perf["device_wait_frac"], "input_wait_ms": perf["input_wait_ms"],
                        "fwd_bwd_ms": perf["fwd_bwd_ms"], "optimizer_ms": perf["optimizer_ms"],
                        "peak_mem_mib": perf["peak_mem_mib"]}
    for path, tp in eval_runs(data_dir, args, device, model, amp).items():
        runs[path].update(eval_img_per_s=tp.img_per_s_all_ranks)
    if "device" in runs and args.sync_debug and device.type == "cuda":
        runs["device"]["host_syncs_per_step"] = host_syncs_per_step(data_dir, args, model, amp, work_dir)
    if args.ceiling:
        runs["model alone"] = figures(synthetic_ceiling(args, model, amp, device, compiled=False))
        runs["model alone, compiled"] = figures(synthetic_ceiling(args, model, amp, device, compiled=True))
    return runs


RUN_NAMES = {"reference": "reference", "cpu": "ours, --decode cpu", "device": "ours, --decode device",
             "model alone": "model alone (synthetic batch)", "model alone, compiled": "model alone, torch.compile"}


def table_rows(model: str, runs: dict[str, dict[str, float]]) -> list[list[str]]:
    ref = runs["reference"]

    def text(value: Any, spec: str) -> str:  # empty where nothing was measured (None, NaN, or "" in perf.csv)
        return format(value, spec) if isinstance(value, (int, float)) and value == value else ""

    rows = []
    for path, f in runs.items():
        eval_ratio = f["eval_img_per_s"] / ref["eval_img_per_s"] if "eval_img_per_s" in f else None
        phases = " | ".join(text(f.get(k), ".1f") for k in ("input_wait_ms", "fwd_bwd_ms", "optimizer_ms"))
        rows.append([model, RUN_NAMES.get(path, path), text(f["train_img_per_s"], ".1f"),
                     text(f["train_data_wait_frac"], ".0%"), text(f["train_device_wait_frac"], ".0%"),
                     text(f.get("eval_img_per_s"), ".1f"), text(f["train_img_per_s"] / ref["train_img_per_s"], ".2f"),
                     text(eval_ratio, ".2f"), phases, text(f.get("peak_mem_mib"), ".0f"),
                     text(f.get("host_syncs_per_step"), ".1f")])
    return rows


def add_odd_files(data_dir: Path, every: int) -> int:
    """Rewrite every ``every``-th JPEG as CMYK or grayscale, as ILSVRC2012 train holds some; returns how many."""
    paths = sorted(data_dir.rglob("*.JPEG"))[::every]
    for number, path in enumerate(paths):
        with Image.open(path) as image:
            image.convert("CMYK" if number % 2 else "L").save(path, "JPEG", quality=90)
    return len(paths)


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
    parser.add_argument("--model", default=["resnet18"], type=lambda text: text.split(","),
                        help="registered model names, comma-separated (every run)")
    parser.add_argument("--decode", default=["cpu", "device"], type=lambda text: text.split(","),
                        help="our decode paths to run, comma-separated: cpu, device")
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
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the model alone on a synthetic batch on the device, with and without "
                             "torch.compile (the data path's ceiling)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: count synchronizing calls per step of --decode device (torch's sync debug mode)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/train"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device if args.device == "cpu" else f"{args.device}:0")
    amp = fast_amp(device) if args.amp == "auto" else args.amp
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        work_dir = Path(tmp)
        data_dir = args.data_dir
        if data_dir is None:  # runs longer than an epoch go on to the next, as training does
            data_dir = make_image_folder(work_dir / "data", num_classes=args.classes,
                                         train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                         size=(500, 375), seed=0)
            log.info("%d of the synthetic JPEGs rewritten as CMYK or grayscale", add_odd_files(data_dir, 50))
        log.info("data %s: %.0f MB read into the page cache", data_dir, warm_page_cache(data_dir) / 1e6)
        for model in args.model:
            results[model] = model_runs(data_dir, args, device, model, amp, work_dir)
    rows = [row for model, runs in results.items() for row in table_rows(model, runs)]
    setup = (f"{args.device}, batch {args.batch_size}, {args.workers} workers, {args.steps} train steps, "
             f"{args.eval_steps} eval batches, threads {torch.get_num_threads()}, cpus {os.cpu_count()}; "
             f"reference: ImageFolder, fp32, NCHW; ours: {amp} autocast, channels_last")
    table = tabulate(rows, headers=["model", "", "train img/s", "loader wait", "device wait", "eval img/s",
                                    "train x ref", "eval x ref", "ms/step input | fwd+bwd | optimizer",
                                    "peak MiB", "host syncs/step"], tablefmt="github", disable_numparse=True)
    (args.out / "bench_train.md").write_text(f"{setup}\n\n{table}\n")
    (args.out / "bench_train.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    print(setup)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
