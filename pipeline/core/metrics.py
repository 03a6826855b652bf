"""What a step measures: top-k correct counts, running sums, honest throughput, peak memory.

Counts stay on the device as tensors between log lines, so a training step never waits for the GPU
just to be counted; they reach the host (``.item()``, one sync) only when a line is written.

Throughput follows the run-dir contract (pipeline/core/records.py): wall clock between two device
synchronizations, including the time spent waiting for the loader, excluding the first steps of each
epoch (warm-up: cudnn autotuning, worker start-up, allocator growth), summed over all processes.
"""
from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core import distributed
from pipeline.core.accelerator import Accelerator
from pipeline.core.energy import EnergyMeter, process_counters
from pipeline.core.rank_figures import RankSample, run_energy

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
    data_wait_frac: float    # host time blocked on the loader / step time
    measured_steps: int
    warmup_steps: int
    device_wait_frac: float = float("nan")  # time the device waited for its input / step time
    input_wait_ms: float = float("nan")     # per step, mean over ranks: the device waiting for its input
    fwd_bwd_ms: float = float("nan")        # per step: input ready to backward done
    optimizer_ms: float = float("nan")      # per step: backward done to the step's end (optimizer, schedule, EMA)
    steady_s: float = float("nan")          # the measured steps' wall clock, mean over ranks
    images: int = 0                         # every image of the span (warm-up included), all ranks
    energy_j: float = float("nan")          # the ranks' counters over the span, summed; NaN: none, or not all read
    energy_source: str = ""
    ranks: tuple[RankSample, ...] = ()      # each rank's own figures, in rank order


class StepClock:
    """Where each step's time goes, on the device's own clock: marks at input ready, backward done and step done.

    On an accelerator the marks are timing events on the training stream, read only when the figures are asked
    for (completed pairs are folded in as they land, so a long epoch keeps few events); the time from one step's
    end to the next step's input being ready is the device waiting for its input, whoever made it wait (the
    loader, the decode on the side stream, or a host too slow to queue work). On the CPU, where work is done
    when its call returns, the marks are the host's clock."""

    PHASES = ("input", "fwd_bwd", "optimizer")
    FOLD_AFTER = 64  # pending event pairs before the completed ones are read

    def __init__(self, device: torch.device):
        self.accelerator = Accelerator.of(device)
        self.totals_ms = dict.fromkeys(self.PHASES, 0.0)
        self.pending: list[tuple[str, Any, Any]] = []  # (phase, start mark, end mark) not read yet
        self.last: Any = None

    def _now(self) -> Any:
        event = self.accelerator.timing_event()
        if event is None:
            return time.perf_counter()
        event.record()
        return event

    def start(self) -> None:
        """The clock starts now (the previous step's end, for the first input wait)."""
        self.last = self._now()

    def mark(self, phase: str) -> None:
        """``phase`` ends now (it began at the previous mark)."""
        now = self._now()
        if self.last is not None:
            self.pending.append((phase, self.last, now))
        self.last = now
        if len(self.pending) > self.FOLD_AFTER:
            self._fold(wait=False)

    def _fold(self, *, wait: bool) -> None:
        """Add up the pairs whose end has been reached (all of them with ``wait``, after a device sync)."""
        if wait:
            self.accelerator.synchronize()
        left = []
        for phase, begin, end in self.pending:
            if isinstance(end, float):
                self.totals_ms[phase] += 1000 * (end - begin)
            elif wait or end.query():
                self.totals_ms[phase] += begin.elapsed_time(end)
            else:
                left.append((phase, begin, end))
        self.pending = left

    def totals(self) -> dict[str, float]:
        """Milliseconds per phase over the measured steps (waits for the device)."""
        self._fold(wait=True)
        return dict(self.totals_ms)


class ThroughputTimer:
    """Steady-state images per second of one epoch (or one performance run).

    Call ``data_ready(loader_wait_s)`` when a batch is handed over, ``backward_done()`` between backward and
    optimizer, and ``step_done(n)`` after the step. The clock starts after the warm-up steps (with a device sync)
    and stops at ``result()`` (another sync). Two waits are told apart: the host's time blocked on the loader,
    and the device's time waiting for its input (StepClock), which also counts a decode on the device. The energy
    is read over the whole span, from construction to ``result()`` (pipeline/core/energy.py).
    """

    def __init__(self, device: torch.device, warmup_steps: int):
        self.device = device
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.images = 0
        self.span_images = 0
        self.data_wait_s = 0.0
        self.clock = StepClock(device)
        self.start: float | None = None
        self.energy = EnergyMeter(process_counters(device.type, device.index or 0,
                                                   distributed.read_env().local_rank)).start()
        if warmup_steps == 0:
            self._start_clock()

    def _start_clock(self) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()
        self.clock.start()

    def data_ready(self, loader_wait_s: float) -> None:
        if self.start is not None:
            self.data_wait_s += loader_wait_s
            self.clock.mark("input")

    def backward_done(self) -> None:
        if self.start is not None:
            self.clock.mark("fwd_bwd")

    def step_done(self, images: int) -> None:
        self.steps += 1
        self.span_images += images
        if self.start is not None:
            self.images += images
            self.clock.mark("optimizer")
        elif self.steps >= self.warmup_steps:
            self._start_clock()

    def result(self) -> Throughput:
        """The steady-state figures over all processes, and each one's (a collective: every rank must call it)."""
        phases_ms = self.clock.totals()  # syncs the device
        elapsed = time.perf_counter() - self.start if self.start is not None else 0.0
        measured = max(self.steps - self.warmup_steps, 0)
        mine = RankSample(host=socket.gethostname(), threads=torch.get_num_threads(), images=self.images,
                          elapsed_s=elapsed, data_wait_s=self.data_wait_s,
                          phases_ms=tuple(phases_ms[p] for p in StepClock.PHASES), span_images=self.span_images,
                          energy_j=self.energy.stop(), energy_source=self.energy.source)
        ranks = tuple(distributed.gather(mine))  # the epoch's one collective: sums below, each rank's in ranks.csv
        images, elapsed_sum, wait_sum = (math.fsum(getattr(r, key) for r in ranks)
                                         for key in ("images", "elapsed_s", "data_wait_s"))
        phase_sums = [math.fsum(r.phases_ms[i] for r in ranks) for i in range(len(StepClock.PHASES))]
        energy_j, energy_source = run_energy(ranks)
        world = len(ranks)
        mean_elapsed_s = elapsed_sum / world
        all_ranks = images / mean_elapsed_s if images and mean_elapsed_s > 0 else float("nan")
        per_step = [total / (world * measured) if measured else float("nan") for total in phase_sums]
        return Throughput(img_per_s_all_ranks=all_ranks, img_per_s_per_rank=all_ranks / world,
                          data_wait_frac=wait_sum / elapsed_sum if elapsed_sum > 0 else float("nan"),
                          measured_steps=measured, warmup_steps=self.warmup_steps,
                          device_wait_frac=phase_sums[0] / (1000 * elapsed_sum) if elapsed_sum > 0 else float("nan"),
                          input_wait_ms=per_step[0], fwd_bwd_ms=per_step[1], optimizer_ms=per_step[2],
                          steady_s=mean_elapsed_s, images=sum(r.span_images for r in ranks),
                          energy_j=energy_j, energy_source=energy_source,
                          ranks=ranks)
