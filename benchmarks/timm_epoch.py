"""The comparison's other side: one epoch (train + val + checkpoint) the way timm's ``train.py`` runs it at its
fastest setting, written with timm's public API because ``train.py`` is not in timm's wheel.

    python -m benchmarks.timm_epoch DATA_DIR [--model resnet18] [--batch-size 32] [--workers 2] [--out DIR]

Mirrors ``train.py DATA --model resnet18 -b 32 --epochs 1 --amp --amp-dtype bfloat16 --channels-last -j 2
--device cpu`` with its defaults: ``create_dataset`` + ``create_loader`` with the prefetcher (uint8 batches,
normalized on the device: timm's fast path), RandomResizedCrop + flip + color jitter 0.4, SGD via
``create_optimizer_v2``, label smoothing 0.1, cosine schedule, bf16 autocast, channels_last, then ``validate``
on the val split (crop 0.875) and ``CheckpointSaver`` writing last and best. Needs ``pip install -e '.[bench]'``.
"""
from __future__ import annotations

import argparse
import logging
import time
from contextlib import nullcontext
from pathlib import Path

START = time.monotonic()  # before torch and timm are imported, as the script's own start

import torch  # noqa: E402
from timm.data import create_dataset, create_loader, resolve_data_config  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from timm.models import create_model  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import CheckpointSaver, accuracy  # noqa: E402

log = logging.getLogger("timm_epoch")


def loaders(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> tuple:
    data_config = resolve_data_config(model=model)
    common = dict(batch_size=args.batch_size, use_prefetcher=True, mean=data_config["mean"], std=data_config["std"],
                  num_workers=args.workers, device=device, interpolation=data_config["interpolation"])
    train = create_loader(create_dataset("", root=str(args.data_dir), split="train", is_training=True,
                                         batch_size=args.batch_size), input_size=data_config["input_size"],
                          is_training=True, color_jitter=0.4, **common)
    val = create_loader(create_dataset("", root=str(args.data_dir), split="val", batch_size=args.batch_size),
                        input_size=data_config["input_size"], crop_pct=data_config["crop_pct"], **common)
    return train, val


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path, help="an ImageFolder tree with train/ and val/")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out/timm"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device("cpu")
    classes = len([p for p in (args.data_dir / "train").iterdir() if p.is_dir()])
    model = create_model(args.model, num_classes=classes).to(device).to(memory_format=torch.channels_last)
    train_loader, val_loader = loaders(args, model, device)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, weight_decay=2e-5, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, warmup_epochs=0)
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cpu" else nullcontext()
    args.out.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(model, optimizer, checkpoint_dir=str(args.out), recovery_dir=str(args.out),
                            max_history=1)
    log.info("training %s on 1 process(es), %d batches of %d", args.model, len(train_loader), args.batch_size)
    train_start = time.monotonic()
    model.train()
    for images, targets in train_loader:
        with autocast:
            loss = criterion(model(images.contiguous(memory_format=torch.channels_last)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_s = time.monotonic() - train_start
    scheduler.step(1)
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for images, targets in val_loader:
            with autocast:
                top1, _ = accuracy(model(images.contiguous(memory_format=torch.channels_last)), targets, topk=(1, 5))
            correct += top1.item() * len(targets) / 100
            total += len(targets)
    saver.save_checkpoint(0, metric=correct / max(total, 1))
    log.info("epoch trained in %.1f s; val %d/%d top-1; done %.1f s after start", train_s, round(correct), total,
             time.monotonic() - START)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
