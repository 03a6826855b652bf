"""Copy one large file while computing its MD5 in the same pass, and keep it only when size and MD5 match.

Why one pass: staging reads 140 GB (ImageNet's train archive) from a shared file system; hashing the copy in a
second read would double the time. A reader thread reads ahead into a few large buffers, the MD5 of each buffer
is computed here, then a writer thread writes it (reads, writes and hashlib all release the GIL), so the source
is read without pause and the copy takes about as long as the slowest of the three, not their sum.
The copy goes to a temporary name of its own beside the target and is renamed only after its check: nothing
half-copied or wrong ever carries the final name.
"""
from __future__ import annotations

import collections
import concurrent.futures
import errno
import hashlib
import os
import tempfile
from concurrent.futures import Executor
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from pipeline.core.data_manifest import MANIFEST_FILE, ManifestFile
from pipeline.core.errors import UserError

CHUNK = 8 << 20  # bytes per read and write: 8 MiB keeps system calls and thread hand-offs rare
BUFFERS = 4  # per file: one read ahead, one hashed, writes in flight; 32 MiB


def redo(data_dir: Path) -> str:
    """What to do about a source file that does not match its manifest. Not "prepare again" alone: prep on a
    finished data dir checks sizes only, so it would pass and the next staging fail the same way."""
    return (f"remove {data_dir / MANIFEST_FILE} and run prep again (verified shards are kept), or restore the file "
            "from its source")


class StagingError(UserError, RuntimeError):
    """Staging cannot make a valid copy: the message names the file or folder and what to do."""


def copy_failed(source: Path, target: Path, exc: OSError, data_dir: Path) -> StagingError:
    """The one line for a copy the file systems refused (a missing source, a full disk, an I/O error)."""
    if isinstance(exc, FileNotFoundError) and exc.filename == str(source):
        return StagingError(f"{source} is missing, but the data manifest lists it; {redo(data_dir)}")
    hint = ("free space there or pass another --stage-data-to" if exc.errno == errno.ENOSPC else
            "check both file systems, then start again (the files verified so far are kept)")
    return StagingError(f"copying {source} to {target.parent} failed: {exc.strerror or exc}; {hint}")


def _write_at(fd: int, view: memoryview, offset: int) -> None:
    """Write ``view`` at ``offset``, then start its writeback: the fsync at the end of a 138 GB file then waits for
    the last chunks only, and the node does not fill with dirty pages (DONTNEED writes dirty pages back first)."""
    start, length = offset, len(view)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


def _pipeline(src: BinaryIO, reader: Executor, writer: Executor, fd: int) -> Iterator[tuple[int, memoryview]]:
    """Yield each chunk of ``src`` in order as (bytes, buffer), reads ahead in ``reader`` and, once the caller has
    seen a chunk, its write to ``fd`` in ``writer``: the source never waits for the hash or the destination."""
    free = collections.deque(memoryview(bytearray(CHUNK)) for _ in range(BUFFERS))
    reads: collections.deque = collections.deque()
    writes: collections.deque = collections.deque()
    at_end, offset = False, 0
    while True:
        while free and not at_end:
            buffer = free.popleft()
            reads.append((buffer, reader.submit(src.readinto, buffer)))
        if not reads:
            if at_end:
                break
            buffer, done = writes.popleft()  # every buffer waits for its write: the oldest frees first
            done.result()
            free.append(buffer)
            continue
        buffer, done = reads.popleft()
        n = done.result()
        if not n:
            at_end = True  # the reads after it find the end too
            free.append(buffer)
            continue
        yield n, buffer
        writes.append((buffer, writer.submit(_write_at, fd, buffer[:n], offset)))
        offset += n
        while writes and writes[0][1].done():
            buffer, done = writes.popleft()
            done.result()
            free.append(buffer)
    for _, done in writes:
        done.result()


def copy_verified(source: Path, target: Path, expected: ManifestFile, progress: Callable[[int], None], *,
                  data_dir: Path) -> None:
    """Copy ``source`` to ``target`` (fsynced, then renamed into place) if its size and MD5 are ``expected``'s (from
    ``data_dir``'s manifest); StagingError naming ``source`` otherwise, and nothing left at ``target``.
    ``progress(bytes)`` after each chunk."""
    md5, copied, tmp = hashlib.md5(), 0, None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own until verified (.<name>.<random>.part: left-overs are removed by the next staging), so
        # two copiers never write one file, should a file system without locks let both in
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        tmp = Path(name)
        with open(source, "rb", buffering=0) as src, open(fd, "wb", buffering=0) as dst:
            size = os.fstat(src.fileno()).st_size
            if size != expected.size:
                raise StagingError(f"{source} has {size} bytes but its data manifest says {expected.size}: it "
                                   f"changed or was cut short since prep; {redo(data_dir)}")
            os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            with (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="staging-read") as reader,
                  concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="staging-write") as writer):
                for n, buffer in _pipeline(src, reader, writer, dst.fileno()):
                    md5.update(buffer[:n])
                    copied += n
                    progress(n)
            os.fsync(dst.fileno())  # a verified copy must survive the node's crash as its marker does
        if copied != expected.size or md5.hexdigest() != expected.md5:
            raise StagingError(f"{source} does not match its data manifest ({copied} bytes with md5 "
                               f"{md5.hexdigest()}, expected {expected.size} bytes with md5 {expected.md5}): it "
                               f"changed or is damaged; {redo(data_dir)}")
        os.replace(tmp, target)
    except OSError as exc:
        raise copy_failed(source, target, exc, data_dir) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
