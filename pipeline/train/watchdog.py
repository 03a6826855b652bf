"""Hang diagnosis during training: a rank without a training step for ``hang_timeout_s`` says so in its log, names
the ranks it waits for, and dumps the Python stacks of all its threads (again every ``hang_timeout_s`` while it
lasts).

Why heartbeat files: a rank stuck in a collective cannot tell who is missing. Each rank's watchdog thread rewrites
``<run dir>/logs/heartbeat/<torchrun run id>/rank<R>.json`` (host, steps done, seconds without a step) every
``check_interval_s``; a rank whose file stops changing is stopped or gone (SIGSTOP, swapped out, its node dead); a
rank alive but behind in steps is stuck on its own (waiting for a data worker that died, say). The launcher's
follow (launcher/follow.py) reads the same files and prints the same names, wherever the silent rank's log is.

Why faulthandler too: the thread needs the GIL. faulthandler's own timer (a C thread) is kept armed a little past
the thread's next dump and pushed back at each check, so the stacks are written even when the thread cannot run.

NCCL (CUDA): when the process group's own timeout (30 min, after ours) fires, torch's flight recorder writes each
rank's last collectives to ``<run dir>/logs/flight_recorder/<run id>/nccl_trace_rank_<R>`` (defaults set here
before the group is made: TORCH_NCCL_TRACE_BUFFER_SIZE=2000, TORCH_NCCL_DUMP_ON_TIMEOUT=1, TORCH_FR_DUMP_TEMP_FILE;
set them yourself to change them); ``python -m torch.distributed.flight_recorder.fr_trace FOLDER`` finds the
first collective the ranks disagree on.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, TextIO

from pipeline.core.config import Config
from pipeline.core.heartbeat import HEARTBEAT_DIR, diagnose, read_heartbeats, write_quietly

log = logging.getLogger(__name__)

FLIGHT_RECORDER_DIR = "flight_recorder"
HANG_MARKER = "no training progress"  # starts the log line before the stacks


def check_interval_s(timeout_s: float) -> float:
    """Seconds between checks and heartbeats: a tenth of the timeout, within 0.5..30."""
    return min(max(timeout_s / 10, 0.5), 30.0)


def flight_recorder_defaults(folder: Path) -> None:
    """NCCL's flight recorder on, dumping into ``folder``, unless the environment says otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(folder / "nccl_trace_rank_"))


class HangWatch:
    """The watchdog of one training process (a daemon thread); ``beat()`` marks progress."""

    def __init__(self, timeout_s: float, folder: Path, *, rank: int, world_size: int, stream: TextIO | None = None):
        self.timeout_s, self.interval_s = timeout_s, check_interval_s(timeout_s)
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self.path = folder / f"rank{rank}.json"
        self.host = socket.gethostname().split(".")[0]
        self.stream = stream or sys.stderr
        self.steps = 0
        self.progress_at: float | None = None  # monotonic time of the last progress; None: not armed yet
        self.stall_start: float | None = None
        self.dumps = 0  # in the current stall
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="hang-watch", daemon=True)

    def beat(self, steps: int = 1) -> None:
        """Progress: ``steps`` more done (0: work that is not a step, like starting a loop)."""
        self.steps += steps
        self.progress_at = time.monotonic()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        with contextlib.suppress(ValueError, OSError, RuntimeError):
            faulthandler.cancel_dump_traceback_later()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.check(time.monotonic())
            except OSError as exc:  # a full or unreachable file system must not end training
                log.warning("hang watchdog: %s", exc)

    def check(self, now: float) -> None:
        """Heartbeat, dump when due, push the backstop back; nothing before the loop starts (a run that stops
        earlier, on bad input, leaves its run dir as it was)."""
        if self.progress_at is None:
            return
        if self.progress_at != self.stall_start:
            self.stall_start, self.dumps = self.progress_at, 0
        stalled_s = now - self.progress_at
        self.heartbeat(stalled_s)
        if stalled_s >= self.timeout_s * (self.dumps + 1):
            self.dumps += 1
            self.dump(stalled_s)
        self.arm_backstop(now)

    def heartbeat(self, stalled_s: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_quietly(self.path, json.dumps({
            "rank": self.rank, "world_size": self.world_size, "host": self.host, "pid": os.getpid(),
            "steps": self.steps, "stalled_s": round(stalled_s, 1), "timeout_s": self.timeout_s,
            "interval_s": self.interval_s, "beat_at": time.time()}))

    def dump(self, stalled_s: float) -> None:
        hang = diagnose(read_heartbeats(self.folder))
        log.error("%s for %.0f s on %s rank %d after %d steps; %s. Python stacks of this process follow (again every "
                  "%.0f s while it lasts)", HANG_MARKER, stalled_s, self.host, self.rank, self.steps, hang.text,
                  self.timeout_s)
        self.stream.flush()
        faulthandler.dump_traceback(self.stream, all_threads=True)
        self.stream.flush()

    def arm_backstop(self, now: float) -> None:
        """faulthandler's timer, due a little after the thread's own next dump (pushed back at each check)."""
        assert self.progress_at is not None
        due = self.progress_at + self.timeout_s * (self.dumps + 1)
        with contextlib.suppress(ValueError, OSError, RuntimeError):  # a stream without a file descriptor
            faulthandler.dump_traceback_later(max(due - now, 0) + 2 * self.interval_s, repeat=True, file=self.stream)


_active: HangWatch | None = None


def step_done(steps: int = 1) -> None:
    """Called by the training loop: progress (cheap; nothing when no watchdog runs)."""
    if _active is not None:
        _active.beat(steps)


@contextlib.contextmanager
def watching(cfg: Config) -> Iterator[HangWatch | None]:
    """The watchdog of this training process; enter it before the process group exists (NCCL reads its variables
    then). Armed by the training loop's first ``step_done`` call."""
    global _active
    import torch  # here, not above: the launcher reads heartbeats (launcher/follow.py) without importing torch

    from pipeline.core import distributed

    if cfg.train.hang_timeout_s <= 0:
        yield None
        return
    env = distributed.read_env()
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "single")
    logs = Path(cfg.train.run_dir) / "logs"
    if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available():
        flight_recorder_defaults(logs / FLIGHT_RECORDER_DIR / run_id)
    watch = HangWatch(cfg.train.hang_timeout_s, logs / HEARTBEAT_DIR / run_id, rank=env.rank,
                      world_size=env.world_size)
    watch.start()
    _active = watch
    try:
        yield watch
    finally:
        _active = None
        watch.stop()
