"""One writer per folder: an advisory lock on a lock file in it, held while the writer runs. Rank 0 of a training
holds ``<run dir>/run.lock``; a download holds ``<archive dir>/.download.lock``.

Two trainings writing one run dir interleave their epochs in ``epochs.csv`` and overwrite each other's
checkpoints (a sweep rerun while its jobs still run does this); two downloads into one archive dir write one part
file. The kernel releases the lock when its holder exits, however it ends, so a requeued job takes it again; a
second writer started while the first runs is refused at once, with one line naming the holder (host, pid, start
time: what the holder wrote into the file, which holds no secret and stays). Advisory: only code that asks is
stopped.

Why a POSIX record lock (``fcntl.lockf``) rather than ``fcntl.flock``: a flock belongs to the open file, which the
loader workers forked by rank 0 share, so it would outlive a killed rank 0 until they notice, and refuse the
restart torchrun makes; a record lock belongs to the process. It is also what NFS servers see from every node
(Linux emulates flock with it there); Lustre needs its ``flock`` mount option for either.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Iterator

from pipeline.core import distributed
from pipeline.core.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"  # a run dir's
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # a file system without POSIX locks (NFS without lockd)


class RunDirBusyError(UserError, RuntimeError):
    """Another process holds the run dir's lock."""


class NoLocksError(UserError, RuntimeError):
    """The folder's file system takes no locks, and the caller cannot go on without one."""


RUN_DIR_HINT = "wait for it to end, stop it, or pass another --run-dir"


def holder_line(what: str) -> str:
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return f"{what} on host {socket.gethostname()}, pid {os.getpid()}, started {started}"


@contextlib.contextmanager
def locked(folder: str | Path, what: str, *, label: str = "run dir", lock_file: str = LOCK_FILE,
           error: type[Exception] = RunDirBusyError, hint: str = RUN_DIR_HINT,
           required: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock (``lock_file`` in it) for the block in this process, as ``what`` (named to a second
    writer); ``error`` saying who holds the ``label`` folder, followed by ``hint``, if another process does. On a file
    system without locks: a warning, or NoLocksError when the lock is ``required``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        # O_NOFOLLOW: a lock "file" linked to another file by another user must not be truncated below
        fd = os.open(folder / lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise error(f"cannot open the lock file {folder / lock_file} of {label} {folder} ({exc.strerror}); it must be "
                    f"a file this user can write: move what is there away") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device opens too
            raise error(f"the lock file {folder / lock_file} of {label} {folder} is not a regular file; move what is "
                        "there away")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in NO_LOCKS and required:
                raise NoLocksError(f"{folder} takes no file locks ({exc.strerror})") from None
            if exc.errno in NO_LOCKS:
                log.warning("%s %s: its file system takes no locks (%s), so a second writer would not be refused "
                            "(Lustre: mount with -o flock; NFS: run lockd); going on without the lock", label, folder,
                            exc.strerror)
                yield
                return
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            holder = "".join(c if c.isprintable() else "?" for c in holder) or "a process that has not yet said"
            raise error(f"{label} {folder} is in use by {holder} (it holds {folder / lock_file}; removing that file does "
                        f"not stop it); {hint}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder_line(what) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the holder line stays, the next holder overwrites it


@contextlib.contextmanager
def locked_by_main_process(run_dir: str | Path, what: str) -> Iterator[None]:
    """The lock held by rank 0 of the torchrun group (read from the environment: enter before the group exists);
    the other ranks end with rank 0, which torchrun's agent sees exit."""
    if distributed.read_env().rank != 0:
        yield
        return
    with locked(run_dir, what):
        yield
