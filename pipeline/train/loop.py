"""The inner loop: one optimizer step, an epoch of steps (resumable mid-epoch), a performance run.

Every ``print_freq`` steps rank 0 logs a line like torchvision's reference::

    Epoch: [3] [ 40/100] eta: 0:00:31 loss: 1.2031 (1.3350) acc1: 56.25 (51.80) acc5: 93.75 (90.12)
    lr: 0.100000 img/s: 812.4 data: 0.0031s max mem: 2201MB

loss/acc are the mean over the last ``print_freq`` steps (and, in brackets, over the epoch so far) of
this rank; img/s is this rank's rate over those steps, by wall clock including the data wait; data is
the mean wait for the loader per step. The epoch's record uses the steady-state figures over all ranks
(pipeline.core.metrics.ThroughputTimer).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.core import distributed
from pipeline.core.config import ConfigError
from pipeline.core.logs import format_seconds
from pipeline.data.loaders import DeviceBatcher
from pipeline.data.prefetch import DeviceInputs
from pipeline.train import watchdog
from pipeline.core.metrics import (RunningSums, Throughput, ThroughputTimer, Totals, batch_sums, peak_memory_mib,
                                   warmup_steps_for)
from pipeline.core.precision import Precision

log = logging.getLogger(__name__)

# Batches between the ranks' agreements on stopping (at the first accumulation window's end after them, and at an
# epoch's last step): a multi-node round trip every step costs more than stopping up to 7 batches later, well inside
# the scheduler's warning time; counted in batches, so a long accumulation window does not delay a stop 8 times.
STOP_CHECK_EVERY = 8

OnLog = Callable[[int, dict[str, float]], None]  # a tracker's log_step: (global step, scalars)


@dataclass
class Stepper:
    """What one optimizer step needs. ``model`` is as trained (DDP and/or compiled), ``raw_model`` unwrapped;
    ``to_device`` turns the loader's uint8 batch into the model's input (normalized, mixed when on).

    With ``accum_steps`` > 1 an optimizer step takes that many batches (a window): each batch's loss is divided by
    accum_steps and its gradients add up (DDP all-reduces only the window's last), then clipping, the scaler, the
    optimizer, the schedule and the EMA step once, so they all count optimizer steps.
    """

    model: nn.Module
    raw_model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    precision: Precision
    to_device: DeviceBatcher
    ema: AveragedModel | None = None
    ema_steps: int = 1  # optimizer steps between EMA updates
    ema_warmup_steps: int = 0  # until then the EMA restarts from the model at each update
    clip_grad_norm: float = 0.0  # 0: no clipping
    accum_steps: int = 1  # batches per optimizer step
    window_done: int = 0  # batches of the current window done; 0 at every resume point (a window's end)

    def inputs(self, batches: Iterable[tuple], first: tuple[int, int]) -> DeviceInputs:
        """The loader's ``batches`` as the model's input, one prepared ahead; ``first`` is the (epoch, index) of
        the first, which with the ones after it seeds each batch's mix."""
        epoch, index = first
        return DeviceInputs(batches, self.to_device, self.precision.device, ((epoch, i) for i in itertools.count(index)))

    def step(self, images: torch.Tensor, targets: torch.Tensor,
             on_backward: Callable[[], None] | None = None) -> torch.Tensor:
        """Forward and backward of a batch from ``inputs``, then at a window's end the optimizer and schedule step
        and the EMA update; returns the batch's ``batch_sums``. ``on_backward()`` is called after the backward
        pass (before the optimizer step)."""
        window_end = self.window_done + 1 == self.accum_steps
        if self.window_done == 0:
            self.model.zero_grad(set_to_none=True)  # the trained module's: under O2 not the optimizer's (master)
        with contextlib.nullcontext() if window_end else no_sync(self.model):
            with self.precision.autocast():
                logits = self.model(images)
                loss = self.criterion(logits, targets)
            self.precision.backward(loss / self.accum_steps)  # the window's mean: each batch is 1/accum_steps
        if on_backward is not None:
            on_backward()
        self.window_done = 0 if window_end else self.window_done + 1
        if window_end:
            self.precision.step(self.optimizer, clip_grad_norm=self.clip_grad_norm)
            self.scheduler.step()
            if self.ema is not None:
                self.update_ema()
        return batch_sums(loss, logits, targets)

    def update_ema(self) -> None:
        """Every ``ema_steps`` optimizer steps, counted by the scheduler (restored on resume, so exact there).
        During warm-up the average restarts from the model, as torchvision's reference does."""
        assert self.ema is not None
        steps_done = self.scheduler.last_epoch
        if steps_done % self.ema_steps:
            return
        if steps_done <= self.ema_warmup_steps:
            self.ema.n_averaged.zero_()  # the next update copies the model
        self.ema.update_parameters(self.raw_model)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def no_sync(model: nn.Module) -> ContextManager:
    """DDP's ``no_sync`` (gradients kept local, all-reduced at the next backward outside it) of ``model``, also under
    torch.compile's wrapper; nothing to do without DDP."""
    inner = getattr(model, "_orig_mod", model)
    return inner.no_sync() if isinstance(inner, DistributedDataParallel) else contextlib.nullcontext()


class LogWindow:
    """The steps since the last log line: their sums, wall time and data wait (this rank)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = RunningSums(self.device)
        self.start = time.perf_counter()
        self.data_wait_s = 0.0
        self.steps = 0

    def data_ready(self, loader_wait_s: float) -> None:
        self.data_wait_s += loader_wait_s

    def step_done(self, batch: torch.Tensor) -> None:
        self.sums.add(batch)
        self.steps += 1

    def scalars(self, lr: float) -> dict[str, float]:
        """The window's figures under the trackers' tags (pipeline/train/tracking.py); one host sync."""
        window = self.sums.local()
        elapsed_s = max(time.perf_counter() - self.start, 1e-9)
        return {"train/loss": window.loss, "train/acc1": window.acc1, "train/acc5": window.acc5, "train/lr": lr,
                "train/img_per_s": window.samples / elapsed_s,
                "train/data_wait_s": self.data_wait_s / max(self.steps, 1)}

    def line(self, prefix: str, step: int, total: int, epoch_sums: Totals, s: dict[str, float]) -> str:
        """The log line of the window's ``scalars``."""
        eta_s = (total - step) * (time.perf_counter() - self.start) / max(self.steps, 1)
        width = len(str(total))
        return (f"{prefix} [{step:>{width}}/{total}] eta: {format_seconds(eta_s)} "
                f"loss: {s['train/loss']:.4f} ({epoch_sums.loss:.4f}) "
                f"acc1: {s['train/acc1']:.2f} ({epoch_sums.acc1:.2f}) acc5: {s['train/acc5']:.2f} "
                f"({epoch_sums.acc5:.2f}) lr: {s['train/lr']:.6f} img/s: {s['train/img_per_s']:.1f} "
                f"data: {s['train/data_wait_s']:.4f}s max mem: {peak_memory_mib(self.device):.0f}MB")


class _BatchRange:
    """Batches ``skip`` to ``stop`` of a batch sampler (of the order it draws for the current epoch)."""

    def __init__(self, batch_sampler: Iterable[list], skip: int, stop: int):
        self.batch_sampler, self.skip, self.stop = batch_sampler, skip, stop

    def __len__(self) -> int:
        return max(min(len(self.batch_sampler), self.stop) - self.skip, 0)

    def __iter__(self) -> Iterator[list]:
        return itertools.islice(iter(self.batch_sampler), self.skip, self.stop)


def skip_batches(loader: DataLoader, skip: int, stop: int | None = None) -> DataLoader:
    """The same loader from batch ``skip`` to ``stop`` (default: its end); the batches outside are never loaded.

    Exact for pipeline.data.loaders's loaders, whose order and augmentation depend only on (seed, epoch, index).
    """
    stop = len(loader) if stop is None else stop
    if skip == 0 and stop == len(loader):
        return loader
    return DataLoader(loader.dataset, batch_sampler=_BatchRange(loader.batch_sampler, skip, stop),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor, in_order=loader.in_order)


class StepBook:
    """Bookkeeping around each step: epoch sums, log window, steady-state throughput, log lines."""

    def __init__(self, device: torch.device, *, warmup_steps: int, print_freq: int, prefix: str,
                 carried: torch.Tensor | None = None, first_step: int = 0, on_log: OnLog | None = None,
                 accum_steps: int = 1):
        """``on_log(global step, scalars)`` at each log line, the global step being ``first_step`` + the optimizer
        steps done (batches / ``accum_steps``)."""
        watchdog.step_done(0)  # the loop starts: the hang watchdog counts from now
        self.first_step, self.on_log, self.accum_steps = first_step, on_log, accum_steps
        self.sums = RunningSums(device)
        if carried is not None and distributed.is_main_process():  # global sums of an earlier run: count once
            self.sums.add(carried.to(device))
        self.window = LogWindow(device)
        self.timer = ThroughputTimer(device, warmup_steps)
        self.print_freq, self.prefix = max(print_freq, 1), prefix

    def data_ready(self, loader_wait_s: float) -> None:
        """A batch is handed over after ``loader_wait_s`` of host time blocked on the loader."""
        self.timer.data_ready(loader_wait_s)
        self.window.data_ready(loader_wait_s)

    def step_done(self, batch: torch.Tensor, images: int, step: int, total: int, lr: float) -> None:
        self.sums.add(batch)
        self.window.step_done(batch)
        watchdog.step_done()
        if step % self.print_freq == 0 or step == total:
            scalars = self.window.scalars(lr)
            line = self.window.line(self.prefix, step, total, self.sums.local(), scalars)
            distributed.on_main_process(log.info, line)
            if self.on_log is not None:
                self.on_log(self.first_step + step // self.accum_steps, scalars)
            self.window.reset()
        self.timer.step_done(images)


@dataclass(frozen=True)
class EpochResult:
    step_in_epoch: int       # batches of the epoch done, including those of an earlier run before a resume (a
    #                          whole number of accumulation windows)
    stopped: bool            # preempted before the epoch's end
    sums: torch.Tensor       # batch_sums over the epoch so far, all ranks, on the CPU
    throughput: Throughput
    elapsed_s: float         # wall clock of this run's part of the epoch, s

    @property
    def totals(self) -> Totals:
        return Totals(*self.sums.tolist())


class NonFiniteLossError(ConfigError):
    """Training diverged (a NaN or infinite loss or weight): the recipe is the user's to change, so it ends as bad
    input does, in one line."""


DIVERGED_HINT = ("lower --lr (or ramp it up with --warmup-epochs) or bound each step with --clip-grad-norm; nothing "
                 "was saved after it, so the checkpoints hold the last good weights")
SCALER_PATIENCE = 10  # consecutive non-finite losses fp16's GradScaler may skip (it halves its scale at each)


class LossWatch:
    """The first non-finite loss, tracked on the device and read only at checks (log boundaries, and before the
    loop returns, so before any save): no host sync per step.

    fp16's GradScaler skips the optimizer step of an overflow, so with it a streak of up to ``tolerated``
    non-finite losses is forgiven once a finite one follows; a streak still running before a save is not (the
    weights about to be saved give NaN).
    """

    def __init__(self, device: torch.device, *, tolerated: int, where: str):
        self.tolerated, self.where = tolerated, where
        self.streak = torch.zeros((), dtype=torch.int64, device=device)  # non-finite losses in a row, up to now
        self.start = torch.zeros((), dtype=torch.int64, device=device)  # the step that began the streak
        self.first = torch.zeros((), dtype=torch.int64, device=device)  # the start of the first fatal streak, 0: none

    @classmethod
    def of(cls, stepper: Stepper, where: str) -> "LossWatch":
        scaled = stepper.precision.scaler is not None  # it skips a whole window: its batches' losses in a row
        return cls(stepper.precision.device, tolerated=SCALER_PATIENCE * stepper.accum_steps if scaled else 0,
                   where=where)

    def add(self, batch_sums: torch.Tensor, step: int) -> None:
        """``step``: the number (1-based) of the step whose ``batch_sums`` these are."""
        self.streak = (self.streak + 1) * ~torch.isfinite(batch_sums[0])
        self.start.masked_fill_(self.streak == 1, step)
        self.first.masked_fill_((self.streak > self.tolerated) & (self.first == 0), step - self.tolerated)

    def check(self, model: nn.Module | None = None) -> None:
        """Raise NonFiniteLossError on every rank when any rank saw a fatal loss (a collective). With ``model``,
        before a save: a running streak is fatal too, and so are weights that are not finite (a NaN learning
        rate spoils them with a finite loss)."""
        fatal = self.first
        if model is not None:
            fatal = torch.where((fatal == 0) & (self.streak > 0), self.start, fatal)
        none = torch.iinfo(torch.int64).max
        step = torch.where(fatal > 0, fatal, none)
        if dist.is_initialized():
            dist.all_reduce(step, op=dist.ReduceOp.MIN)
        if step.item() != none:
            raise NonFiniteLossError(f"training diverged: the loss became NaN or infinite at step {step.item()} of "
                                     f"{self.where}; {DIVERGED_HINT}")
        if model is not None and distributed.all_reduce_sum([float(not finite_weights(model))])[0]:
            raise NonFiniteLossError(f"training diverged: the weights are NaN or infinite at the end of {self.where}; "
                                     f"{DIVERGED_HINT}")


def finite_weights(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (one host sync)."""
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all()) if tensors else True


def run_steps(stepper: Stepper, batches: Iterable[tuple], *, first: tuple[int, int], total: int, book: StepBook,
              watch: LossWatch, stop: Callable[[], bool]) -> tuple[int, bool]:
    """The step loop of both modes: a step per batch of ``batches``, the first being (epoch, index) ``first``, the
    last being step ``total``; ``stop()`` (a collective) is asked every STOP_CHECK_EVERY optimizer steps and at the
    last, always at an accumulation window's end (every STOP_CHECK_EVERY batches, or every window when a window
    is longer): a run stops, and resumes, between windows (no gradients to save).
    Returns (the number of the last step done, counted from index 0 of ``first``'s epoch; whether stop() said so)."""
    step = first[1]
    inputs = stepper.inputs(batches, first)
    for images, targets in inputs:
        book.data_ready(inputs.loader_wait_s)
        batch = stepper.step(images, targets, on_backward=book.timer.backward_done)
        step += 1
        watch.add(batch, step)
        book.step_done(batch, len(images), step, total, stepper.lr)
        if step % book.print_freq == 0:
            watch.check()
        accum = stepper.accum_steps
        windows_per_check = max(1, STOP_CHECK_EVERY // accum)
        if step % accum == 0 and ((step // accum) % windows_per_check == 0 or step == total) and stop():
            return step, True
    return step, False


def run_epoch(stepper: Stepper, loader: DataLoader, *, epoch: int, start_step: int, print_freq: int,
              stop: Callable[[], bool], carried: torch.Tensor | None = None,
              on_log: OnLog | None = None) -> EpochResult:
    """Train over ``loader`` from batch ``start_step``; ``stop()`` (a collective) is asked about every STOP_CHECK_EVERY
    batches, at a window's end, and after the epoch's last. The batches after the last whole accumulation window are left out,
    as drop_last leaves out a short batch: accum_steps x batch b then sees the very images of one batch of
    accum_steps x b, and an epoch has the same optimizer steps as with that batch."""
    accum = stepper.accum_steps
    total = len(loader) - len(loader) % accum
    book = StepBook(stepper.precision.device, warmup_steps=warmup_steps_for(total - start_step),
                    print_freq=print_freq, prefix=f"Epoch: [{epoch}]", carried=carried,
                    first_step=epoch * (total // accum), on_log=on_log, accum_steps=accum)
    start_s = time.perf_counter()
    watch = LossWatch.of(stepper, f"epoch {epoch}")
    stepper.model.train()  # validation left it in eval mode
    step, stopped = run_steps(stepper, skip_batches(loader, start_step, total), first=(epoch, start_step), total=total,
                              book=book, watch=watch, stop=stop)
    watch.check(stepper.raw_model)  # before the caller saves anything
    throughput = book.timer.result()
    sums = torch.tensor(distributed.all_reduce_sum(book.sums.sums.tolist()), dtype=torch.float64)
    return EpochResult(step, stopped, sums, throughput, time.perf_counter() - start_s)


def endless_batches(loader: DataLoader, sampler: DistributedSampler | None) -> Iterator[tuple]:
    """The loader's batches epoch after epoch (a new order each epoch)."""
    if len(loader) == 0:
        raise ValueError("the train loader yields no batch; lower --batch-size")
    for epoch in itertools.count():
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader


def run_perf(stepper: Stepper, loader: DataLoader, sampler: DistributedSampler | None, *, max_steps: int,
             print_freq: int, stop: Callable[[], bool], on_log: OnLog | None = None) -> Throughput | None:
    """``max_steps`` optimizer steps over as many epochs as they take: the steady-state throughput (per batch
    processed) after the warm-up, or None when ``stop()`` (a collective, asked every STOP_CHECK_EVERY steps) ended
    the run early."""
    batches = max_steps * stepper.accum_steps
    book = StepBook(stepper.precision.device, warmup_steps=warmup_steps_for(batches), print_freq=print_freq,
                    prefix="Perf:", on_log=on_log, accum_steps=stepper.accum_steps)
    watch = LossWatch.of(stepper, "the performance run")
    stepper.model.train()
    step, stopped = run_steps(stepper, itertools.islice(endless_batches(loader, sampler), batches), first=(0, 0),
                              total=batches, book=book, watch=watch, stop=stop)
    if stopped and step < batches:
        return None
    watch.check()
    return book.timer.result()
