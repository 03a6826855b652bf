"""Copy one large file while computing its MD5 in the same pass, and keep it only when size and MD5 match.

Why one pass: staging reads 140 GB (ImageNet's train archive) from a shared file system; hashing the copy in a
second read would double the time. The bytes are read into one of two large buffers; the write of a buffer runs
in a thread while the MD5 of the same buffer is computed here and the next read starts (the reads, writes and
hashlib all release the GIL), so the copy takes about as long as the slowest of the three, not their sum.
The copy goes to a temporary name beside the target and is renamed only after its check: nothing half-copied
or wrong ever carries the final name.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
from pathlib import Path
from typing import Callable

from pipeline.core.data_manifest import ManifestFile
from pipeline.core.errors import UserError

CHUNK = 16 << 20  # bytes per read and write: 16 MiB keeps system calls and thread hand-offs rare
REDO = "prepare the data dir again (or restore the file from its source)"


class StagingError(UserError, RuntimeError):
    """Staging cannot make a valid copy: the message names the file or folder and what to do."""


def part_name(target: Path) -> Path:
    """The temporary name a copy has until it is verified (left-overs are removed by the next staging)."""
    return target.with_name(f".{target.name}.part")


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def copy_verified(source: Path, target: Path, expected: ManifestFile, progress: Callable[[int], None]) -> None:
    """Copy ``source`` to ``target`` (fsynced, then renamed into place) if its size and MD5 are ``expected``'s;
    StagingError naming ``source`` otherwise, and nothing left at ``target``. ``progress(bytes)`` after each chunk."""
    tmp = part_name(target)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    md5, copied = hashlib.md5(), 0
    try:
        with open(source, "rb", buffering=0) as src, open(tmp, "wb", buffering=0) as dst:
            size = os.fstat(src.fileno()).st_size
            if size != expected.size:
                raise StagingError(f"{source} has {size} bytes but its data manifest says {expected.size}: it "
                                   f"changed or was cut short since prep; {REDO}")
            os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            buffers = (bytearray(CHUNK), bytearray(CHUNK))
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="staging-write") as writer:
                pending, turn = None, 0
                while True:
                    view = memoryview(buffers[turn])  # the buffer the write in flight is not using
                    turn = 1 - turn
                    n = src.readinto(view)
                    if not n:
                        break
                    if pending is not None:
                        pending.result()  # the other buffer is free again
                    pending = writer.submit(_write_all, dst.fileno(), view[:n])
                    md5.update(view[:n])
                    copied += n
                    progress(n)
                if pending is not None:
                    pending.result()
            os.fsync(dst.fileno())  # a verified copy must survive the node's crash as its marker does
        if copied != expected.size or md5.hexdigest() != expected.md5:
            raise StagingError(f"{source} does not match its data manifest ({copied} bytes with md5 "
                               f"{md5.hexdigest()}, expected {expected.size} bytes with md5 {expected.md5}): it "
                               f"changed or is damaged; {REDO}")
        os.replace(tmp, target)
    except FileNotFoundError as exc:
        if exc.filename != str(source):
            raise
        raise StagingError(f"{source} is missing, but the data manifest lists it; {REDO}") from None
    finally:
        tmp.unlink(missing_ok=True)
