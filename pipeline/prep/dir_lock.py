"""One writer per folder: an advisory lock (``fcntl.flock``) on a lock file in it, held while the writer runs.

The lock file names its holder (host, process id, start time), so a second writer is refused at once with one line
saying who holds it. The kernel drops the lock when the holder exits, however it ends (a killed job included); the
file itself stays, and holds no secret.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def held(folder: Path, name: str, error: type[Exception], what: str) -> Iterator[None]:
    """Hold the lock ``folder/name`` for the block; ``error`` (saying ``what`` holds it) when another process or
    thread holds it."""
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("ascii", "replace").strip()
            holder = "".join(c if c.isprintable() else "?" for c in holder) or "a process that just started"
            raise error(f"{folder} is in use by {what} ({holder}); wait for it to end (a job: squeue), or use "
                        f"another folder. {folder / name} is only a lock: removing it does not stop the other") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
