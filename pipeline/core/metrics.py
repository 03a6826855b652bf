"""What a step measures: top-k correct counts, running sums, honest throughput, peak memory.

Counts stay on the device as tensors between log lines, so a training step never waits for the GPU
just to be counted; they reach the host (``.item()``, one sync) only when a line is written.

Throughput follows the run-dir contract (pipeline/core/records.py): wall clock between two device
synchronizations, including the time spent waiting for the loader, excluding the first steps of each
epoch (warm-up: cudnn autotuning, worker start-up, allocator growth), summed over all processes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pipeline.core import distributed
from pipeline.core.accelerator import Accelerator

MAX_WARMUP_STEPS = 5


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU), so the wall clock covers what was launched."""
    Accelerator.of(device).synchronize()


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: allocated on the accelerator, or max resident set size on CPU."""
    return Accelerator.of(device).peak_memory_mib()


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices: the targets themselves, or the argmax of soft (N x C, MixUp/CutMix) targets."""
    return targets.argmax(dim=1) if targets.ndim == 2 else targets


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Per k, how many samples have their class among the k highest logits (k capped at the class count)."""
    labels = hard_labels(targets)
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(labels.unsqueeze(1))
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def batch_sums(loss_mean: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[loss sum, top-1 correct, top-5 correct, samples] of one batch on the batch's device, in the accelerator's
    sum dtype (float64; float32 on NPUs, exact for counts below 2**24 per process and epoch)."""
    n = logits.shape[0]
    dtype = Accelerator.of(logits.device).sum_dtype
    correct = topk_correct(logits.detach(), targets).to(dtype)
    return torch.cat([(loss_mean.detach().to(dtype) * n).reshape(1), correct,
                      torch.full((1,), float(n), dtype=dtype, device=logits.device)])


class RunningSums:
    """Sums of ``batch_sums`` vectors, kept on the device until read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(4, dtype=Accelerator.of(device).sum_dtype, device=device)

    def add(self, batch: torch.Tensor) -> None:
        self.sums += batch

    def local(self) -> "Totals":
        return Totals(*self.sums.tolist())


@dataclass(frozen=True)
class Totals:
    loss_sum: float
    top1_correct: float
    top5_correct: float
    samples: float

    def _mean(self, value: float, scale: float = 1.0) -> float:
        return scale * value / self.samples if self.samples else float("nan")

    @property
    def loss(self) -> float:
        return self._mean(self.loss_sum)

    @property
    def acc1(self) -> float:
        return self._mean(self.top1_correct, 100.0)

    @property
    def acc5(self) -> float:
        return self._mean(self.top5_correct, 100.0)


def warmup_steps_for(steps_in_epoch: int) -> int:
    """Steps left out of the throughput: 5, or half an epoch shorter than 10 steps (0 for one step)."""
    return min(MAX_WARMUP_STEPS, steps_in_epoch // 2)


@dataclass(frozen=True)
class Throughput:
    img_per_s_all_ranks: float
    img_per_s_per_rank: float
    data_wait_frac: float
    measured_steps: int
    warmup_steps: int


class ThroughputTimer:
    """Steady-state images per second of one epoch (or one performance run).

    Call ``data_ready()`` when a batch arrives and ``step_done(n)`` after its optimizer step. The clock
    starts after the warm-up steps (with a device sync) and stops at ``result()`` (another sync); the
    host time spent blocked on the loader in between is the data wait.
    """

    def __init__(self, device: torch.device, warmup_steps: int):
        self.device = device
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.images = 0
        self.data_wait_s = 0.0
        self.start: float | None = None
        self.last = time.perf_counter()
        if warmup_steps == 0:
            self._start_clock()

    def _start_clock(self) -> None:
        synchronize(self.device)
        self.start = self.last = time.perf_counter()

    def data_ready(self) -> None:
        now = time.perf_counter()
        if self.start is not None:
            self.data_wait_s += now - self.last
        self.last = now

    def step_done(self, images: int) -> None:
        self.steps += 1
        if self.start is not None:
            self.images += images
        elif self.steps >= self.warmup_steps:
            self._start_clock()
        self.last = time.perf_counter()

    def result(self) -> Throughput:
        """The steady-state figures over all processes (a collective: every rank must call it)."""
        synchronize(self.device)
        elapsed = time.perf_counter() - self.start if self.start is not None else 0.0
        images, elapsed_sum, wait_sum = distributed.all_reduce_sum([self.images, elapsed, self.data_wait_s])
        world = distributed.world_size()
        mean_elapsed_s = elapsed_sum / world
        all_ranks = images / mean_elapsed_s if images and mean_elapsed_s > 0 else float("nan")
        return Throughput(img_per_s_all_ranks=all_ranks, img_per_s_per_rank=all_ranks / world,
                          data_wait_frac=wait_sum / elapsed_sum if elapsed_sum > 0 else float("nan"),
                          measured_steps=max(self.steps - self.warmup_steps, 0), warmup_steps=self.warmup_steps)
