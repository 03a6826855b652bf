"""Stop training cleanly on SIGUSR1 or SIGTERM: a flag now, agreement at the next step boundary.

The handler only sets a flag (safe in a signal handler). Every few steps (pipeline.train.loop.STOP_CHECK_EVERY)
and at an epoch's end each rank calls ``stop_agreed()``: an all-reduce of the flags, so one signalled rank is
enough and all ranks stop after the same step, where rank 0 can save a consistent checkpoint. The all-reduce
runs on a CPU gloo group, so it never waits for the accelerator's queued work.
"""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from pipeline.core.signals import STOP_SIGNALS

log = logging.getLogger(__name__)



class PreemptionFlag:
    """Context manager that installs the handlers, and restores the previous ones on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None

    def __enter__(self) -> "PreemptionFlag":
        if dist.is_initialized():
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        if threading.current_thread() is not threading.main_thread():
            log.warning("train() runs outside the main thread: SIGUSR1/SIGTERM cannot be caught, so a "
                        "preemption will not save a checkpoint")
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def stop_agreed(self) -> bool:
        """True on every rank when any rank was signalled (a collective: all ranks call it after the same steps)."""
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int64)  # a dtype every backend has
        if dist.is_initialized():
            dist.all_reduce(flag, group=self._group)
        if flag.item() > 0 and self.signum is not None:
            log.warning("received %s: stopping after this step to save a checkpoint",
                        signal.Signals(self.signum).name)
        return bool(flag.item() > 0)
