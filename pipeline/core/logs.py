"""Logging with the rank in every line, and progress that suits both a terminal and a batch log.

On a terminal, ``Progress`` draws a tqdm bar; in a batch log (stderr not a TTY) it writes a plain
line every ``every_s`` seconds with count, rate and ETA, so `tail -f` on a SLURM log stays readable.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from tqdm import tqdm

LOG_FORMAT = "%(asctime)s [%(host)s rank %(rank)s] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: str, host: str):
        super().__init__()
        self.rank, self.host = rank, host

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.host = self.rank, self.host
        return True


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> None:
    """Configure the root logger once per process; the rank defaults to $RANK (torchrun) or 0."""
    rank_text = str(rank if rank is not None else os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_RankFilter(rank_text, os.uname().nodename.split(".")[0]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Counts work done (items or bytes) and shows it as a bar on a TTY or as periodic log lines."""

    def __init__(self, desc: str, total: float | None, unit: str = "it", logger: logging.Logger | None = None,
                 every_s: float = 30.0, enabled: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.log = logger or logging.getLogger("pipeline.progress")
        self.every_s = every_s
        self.done = 0.0
        self.start = self.last_line = time.monotonic()
        interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True,
                        leave=False) if interactive else None
        self.enabled = enabled
        self.lock = threading.Lock()  # several threads may count into one (a file's byte ranges)

    def update(self, n: float = 1) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            elif self.enabled and time.monotonic() - self.last_line >= self.every_s:
                self.last_line = time.monotonic()
                self.log.info(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        fmt = human_bytes if self.unit == "B" else (lambda v: f"{v:,.0f}")
        text = f"{self.desc}: {fmt(self.done)}"
        if self.total:
            text += f"/{fmt(self.total)} ({100 * self.done / self.total:.1f}%)"
        text += f" {fmt(rate)}/s" if self.unit == "B" else f" {rate:,.1f} {self.unit}/s"
        if self.total and rate > 0:
            text += f" eta {format_seconds((self.total - self.done) / rate)}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self.log.info(self.line() + f" done in {format_seconds(time.monotonic() - self.start)}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"
