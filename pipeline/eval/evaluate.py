"""The eval stage: exact top-1/top-5 counts over the whole val set, whatever the number of processes.

    python -m jobs.eval --data-dir DATA --run-dir RUN [--checkpoint FILE]
    torchrun --nproc-per-node 2 -m jobs.eval --data-dir DATA --run-dir RUN

Each rank runs its exact shard of the val set (pipeline.data.loaders: every image once, no padding, no dropped
tail); the correct counts, image counts and loss sums are summed over the ranks (float64, exact), and the
total is checked against the val set's size (minus unreadable images, which are counted and named), so a
sharding error fails loudly instead of shifting the accuracy. Rank 0 prints the torchvision-style line::

    top1_correct=37657 top5_correct=46224 total=50000 Acc@1 75.314 Acc@5 92.448

and writes ``<run dir>/eval.json`` (keys in pipeline/records.EVAL_KEYS). The checkpoint is
``--checkpoint`` or ``<run dir>/checkpoints/best.pt``: one of ours (the model name and class count come
from it) or a plain state dict for ``--model``; loaded with ``weights_only=True``. ``--weights ema`` evaluates
the checkpoint's EMA weights instead of the model's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from pipeline.core import distributed
from pipeline.core.config import Config
from pipeline.core.logs import Progress
from pipeline.core.metrics import RunningSums, batch_sums
from pipeline.core.precision import Precision, setup_precision
from pipeline.core.records import EVAL_FILE, write_record
from pipeline.core.stage_process import stage_process
from pipeline.data.loaders import (DeviceBatcher, build_val_loader, cpu_decoded_images, dataset_info, device_batcher,
                                   skipped_images)
from pipeline.data.prefetch import DeviceInputs
from pipeline.data.staging import as_given
from pipeline.models.registry import build_model, read_state_dict
from pipeline.core.checkpoint_file import (BEST, CheckpointError, NotATrainingCheckpointError, checkpoint_dir,
                                           load_checkpoint)

log = logging.getLogger(__name__)


class EvalCountError(RuntimeError):
    """The ranks together did not see every val image exactly once."""


@dataclass(frozen=True)
class EvalResult:
    top1_correct: int
    top5_correct: int
    total: int
    loss_sum: float
    skipped: int  # unreadable val images, left out of total

    @property
    def acc1(self) -> float:
        return 100.0 * self.top1_correct / self.total if self.total else float("nan")

    @property
    def acc5(self) -> float:
        return 100.0 * self.top5_correct / self.total if self.total else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.total if self.total else float("nan")

    def line(self) -> str:
        return (f"top1_correct={self.top1_correct} top5_correct={self.top5_correct} total={self.total} "
                f"Acc@1 {self.acc1:.3f} Acc@5 {self.acc5:.3f}")


@torch.inference_mode()
def validate(model: nn.Module, loader: DataLoader, precision: Precision, to_device: DeviceBatcher, *,
             expected_total: int, desc: str = "val") -> EvalResult:
    """Exact counts of ``model`` over the val set (a collective: every rank calls it with its shard);
    ``to_device`` makes the loader's uint8 batches the model's input (pipeline.data.loaders.device_batcher)."""
    model.eval()
    sums = RunningSums(precision.device)
    skipped_before = skipped_images(loader) + to_device.skipped  # the workers' and, decoding on the device, its own
    criterion = nn.CrossEntropyLoss()
    with Progress(desc, total=len(loader), unit="batch", logger=log, enabled=distributed.is_main_process()) as bar:
        for images, targets in DeviceInputs(loader, to_device, precision.device):  # next batch made meanwhile
            if len(targets):
                with precision.autocast():
                    logits = model(images)
                logits = logits.float()
                sums.add(batch_sums(criterion(logits, targets), logits, targets))
            bar.update()
    skipped_here = skipped_images(loader) + to_device.skipped - skipped_before
    loss_sum, top1, top5, total, skipped = distributed.all_reduce_sum(sums.sums.tolist() + [skipped_here])
    result = EvalResult(int(top1), int(top5), int(total), loss_sum, int(skipped))
    if result.total + result.skipped != expected_total:
        raise EvalCountError(f"{desc}: the {distributed.world_size()} process(es) counted {result.total} images "
                             f"(+{result.skipped} unreadable) but the val set has {expected_total}; the val "
                             "sampler must give every image to exactly one rank")
    if result.skipped:
        log.warning("%s: %d unreadable val image(s) left out of the total (named in the warnings above)",
                    desc, result.skipped)
    on_cpu = cpu_decoded_images(loader, to_device)
    if on_cpu:
        log.info("%s: %d image(s) of this process decoded by PIL so far: the device decoder takes 3-channel JPEGs only",
                 desc, on_cpu)
    return result


def load_eval_weights(path: Path, model_name: str, which: str) -> tuple[str, int | None, dict[str, torch.Tensor]]:
    """(model name, class count or None, state dict) of one of our checkpoints or of a plain weights file;
    ``which`` is "model" or "ema" (the AveragedModel's weights, saved beside the model's)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train first, or pass --checkpoint FILE")
    try:
        state = load_checkpoint(path)
    except NotATrainingCheckpointError:  # plain weights; a corrupt or unreadable file stops here
        if which == "ema":
            raise CheckpointError(f"{path} is not a training checkpoint of this pipeline, so it holds no EMA "
                                  "weights; evaluate it with --weights model") from None
        return model_name, None, read_state_dict(path)
    if state["model_name"] != model_name:
        log.info("%s holds a %s model; evaluating that (not --model %s)", path, state["model_name"], model_name)
    weights = state["model"]
    if which == "ema":
        if not state.get("ema"):
            raise CheckpointError(f"checkpoint {path} holds no EMA weights: its run trained without --ema-decay; "
                                  "evaluate it with --weights model")
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    return state["model_name"], state["num_classes"], weights


def build_eval_model(path: Path, model_name: str, num_classes: int, which: str) -> tuple[str, nn.Module]:
    name, saved_classes, weights = load_eval_weights(path, model_name, which)
    if saved_classes is not None and saved_classes != num_classes:
        raise CheckpointError(f"checkpoint {path} has {saved_classes} classes but the val set has {num_classes}; "
                              "point --data-dir at the data it was trained on")
    model = build_model(name, num_classes=num_classes)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {path} do not fit model {name} with {num_classes} classes "
                              f"(was it trained as another --model?): {exc}") from exc
    return name, model


def evaluate(cfg: Config) -> dict[str, Any]:
    """The eval stage's door: exact counts of a checkpoint on the val set; rank 0 writes eval.json."""
    with stage_process(cfg.train.device, workers=cfg.data.workers, threads=cfg.train.threads) as (env, device):
        return _evaluate(cfg, env, device)


def _evaluate(cfg: Config, env: distributed.DistEnv, device: torch.device) -> dict[str, Any]:
    info = dataset_info(cfg)
    path = Path(cfg.eval.checkpoint) if cfg.eval.checkpoint else checkpoint_dir(cfg.train.run_dir) / BEST
    name, model = build_eval_model(path, cfg.model.model, info.num_classes, cfg.eval.weights)
    precision = setup_precision(device, cfg.train.amp, cfg.model.channels_last)
    model = precision.prepare_model(model)
    result = validate(model, build_val_loader(cfg, env, device), precision, device_batcher(cfg, precision),
                      expected_total=info.val_size)
    distributed.on_main_process(log.info, "%s (%s weights) from %s on %d process(es):", name, cfg.eval.weights, path,
                                env.world_size)
    distributed.on_main_process(log.info, result.line())
    record = {"checkpoint": str(path), "weights": cfg.eval.weights, "top1_correct": result.top1_correct,
              "top5_correct": result.top5_correct, "total": result.total, "acc1": result.acc1, "acc5": result.acc5,
              "loss": result.loss, "world_size": env.world_size, **as_given(cfg)[1]}
    distributed.on_main_process(write_record, Path(cfg.train.run_dir) / EVAL_FILE, record)
    return record
