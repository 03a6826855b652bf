"""Extracting the ImageNet splits: the main thread reads an archive once, worker threads write the files.

Train: the outer tar holds one ``<wnid>.tar`` per class. Each class is read into memory and handed to a
thread, which extracts it to ``<wnid>.tmp`` and renames that to ``<wnid>`` when complete: a killed run
leaves finished classes (skipped on the next run) and at most a few ``.tmp`` folders (removed). Val and
test are flat tars, written in batches by the same threads. The work is I/O bound (writes release the GIL),
so threads overlap the writing of many files with the single sequential read of the archive.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from pipeline.prep.archives import (NAME_ENCODING, ArchiveError, check_end, check_member, flat_name, member_bytes,
                                    read_archive, safe_name, write_file, write_member)
from pipeline.prep.devkit import Devkit, val_number

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
MAX_PENDING_BYTES = 1 << 30  # archive bytes read ahead of the writers, at most (1 GiB; plus one class)
VAL_BATCH_BYTES = 32 << 20   # val/test files handed to a writer thread at a time


class BoundedPool:
    """Worker threads behind a read-ahead budget: ``submit`` blocks while MAX_PENDING_BYTES wait in memory.

    The first failure of a task is raised in the submitting thread, at the next submit or on leaving.
    """

    def __init__(self, workers: int, max_pending_bytes: int = MAX_PENDING_BYTES):
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="prep-writer")
        self._limit, self._pending = max_pending_bytes, 0
        self._cond = threading.Condition()
        self._futures: list[Future] = []

    def submit(self, nbytes: int, fn: Callable[..., Any], *args: Any) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0 or self._pending + nbytes <= self._limit)
            self._pending += nbytes
        self._raise_first_error()
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: self._release(nbytes))
        self._futures.append(future)

    def _release(self, nbytes: int) -> None:
        with self._cond:
            self._pending -= nbytes
            self._cond.notify_all()

    def _raise_first_error(self) -> None:
        running = []
        for future in self._futures:
            if not future.done():
                running.append(future)
            elif future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        self._futures = running

    def __enter__(self) -> "BoundedPool":
        return self

    def __exit__(self, exc_type: type | None, *rest: Any) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        if exc_type is None:
            self._raise_first_error()


def remove_temp_dirs(folder: Path) -> None:
    """Remove what a killed run left half-written: ``<wnid>.tmp`` folders."""
    for leftover in folder.glob(f"*{TMP_SUFFIX}"):
        log.info("removing %s, left by an interrupted run", leftover)
        shutil.rmtree(leftover)


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def class_members(data: bytes, where: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo, str]]:
    """The checked file members of one class tar held in memory: (the open tar to read its data, member, name).

    The class tar must be a plain tar (not compressed: the archives layout reads its members by offset), whole
    (end-of-archive marker), hold at least one file, each name once and every member inside its bytes: a class cut
    short or doubled inside an intact train tar would otherwise pass as complete.
    """
    if data.startswith(COMPRESSED_MAGIC):
        raise ArchiveError(f"{where} is compressed; the official class tars are plain tars: download the train "
                           "archive again")
    names: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding=NAME_ENCODING) as tar:
            for member in tar:
                name = flat_name(check_member(member, where))
                if member.isdir():
                    continue
                if name is None:
                    raise ArchiveError(f"{where}: member {member.name!r} is in a sub-folder; the official class "
                                       "tars hold flat <wnid>_<n>.JPEG files")
                if safe_name(name, f"{where}: member") in names:
                    raise ArchiveError(f"{where} holds {name!r} twice; the official class tars hold each file "
                                       "once: download the train archive again")
                if member.offset_data + member.size > len(data):
                    raise ArchiveError(f"{where}: member {name!r} runs past the end of its class tar; download the "
                                       "train archive again")
                names.add(name)
                yield tar, member, name
            check_end(tar, where)
    except tarfile.TarError as exc:
        raise ArchiveError(f"{where} is not a readable tar ({exc}); download the train archive again") from None
    if not names:
        raise ArchiveError(f"{where} holds no files; download the train archive again")


def extract_class(data: bytes, wnid: str, staging: Path, where: str) -> None:
    """Extract one class tar (in memory) to ``staging/<wnid>.tmp``, then rename it to ``staging/<wnid>``."""
    tmp, final = staging / (wnid + TMP_SUFFIX), staging / wnid
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for tar, member, name in class_members(data, where):
            write_member(tar, member, tmp / name)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def class_tars(tar: tarfile.TarFile, archive: Path, classes: Collection[str],
               extra: list[str]) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """(wnid, member) of each ``<wnid>.tar`` of the train archive; anything else, or a second ``<wnid>.tar``, goes
    to ``extra``. An archive without any class tar is an ArchiveError."""
    seen: set[str] = set()
    for member in tar:
        name = flat_name(check_member(member, archive.name))
        if member.isdir():
            continue
        wnid = name[: -len(".tar")] if name and name.endswith(".tar") else None
        if wnid not in classes or wnid in seen:
            extra.append(member.name)
            continue
        seen.add(wnid)
        yield wnid, member
    require_some(len(seen), archive, f"<wnid>.tar of the devkit's {len(classes)} classes")


def extract_train(archive: Path, staging: Path, *, classes: Collection[str], expected_md5: str | None,
                  workers: int) -> dict[str, Any]:
    """All class tars of the train archive into ``staging/<wnid>/``; finished classes are skipped."""
    staging.mkdir(parents=True, exist_ok=True)
    remove_temp_dirs(staging)
    done = {p.name for p in staging.iterdir() if p.is_dir()}
    if done:
        log.info("resuming: %d of %d classes are already extracted", len(done), len(classes))
    extra: list[str] = []  # not a class tar, or a second <wnid>.tar (the first one is extracted)
    with read_archive(archive, expected_md5=expected_md5) as read, BoundedPool(workers) as pool:
        assert read.tar is not None
        for wnid, member in class_tars(read.tar, archive, classes, extra):
            if wnid not in done:
                data = member_bytes(read.tar, member)
                pool.submit(len(data), extract_class, data, wnid, staging, f"{archive.name}:{member.name}")
    return {"archive": read.stats, "extra": extra}


def _write_files(batch: list[tuple[Path, bytes]]) -> None:
    for path, data in batch:
        write_file(path, data)


class _Batcher:
    """Collects (path, data) pairs and hands them to the pool ``VAL_BATCH_BYTES`` at a time."""

    def __init__(self, pool: BoundedPool):
        self.pool, self.batch, self.nbytes = pool, [], 0  # type: ignore[var-annotated]

    def add(self, path: Path, data: bytes) -> None:
        self.batch.append((path, data))
        self.nbytes += len(data)
        if self.nbytes >= VAL_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            self.pool.submit(self.nbytes, _write_files, self.batch)
            self.batch, self.nbytes = [], 0


def val_members(tar: tarfile.TarFile, archive: Path, devkit: Devkit,
                record: dict[str, Any]) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, file name, wnid) of every val file, labelled by the number in its own name through the devkit; once done,
    ``record`` lists the files ``missing`` from the archive, ``unlabelled`` (no ground-truth line) and ``extra``."""
    seen: set[int] = set()
    unlabelled: list[str] = []
    extra: list[str] = []
    for member in tar:
        name = flat_name(check_member(member, archive.name))
        if member.isdir():
            continue
        number = val_number(name) if name else None
        wnid = devkit.val_wnid(number) if number else None
        if number is None or number in seen:
            extra.append(member.name)
        elif wnid is None:
            unlabelled.append(member.name)
        else:
            seen.add(number)
            yield member, name, wnid
    require_some(len(seen), archive, f"val file with a ground-truth line (ILSVRC2012_val_<k>.JPEG, k = 1.."
                 f"{len(devkit.ground_truth)})")
    missing = [f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, len(devkit.ground_truth) + 1) if k not in seen]
    record.update(missing=missing, unlabelled=unlabelled, extra=extra)


def extract_val(archive: Path, staging: Path, *, devkit: Devkit, expected_md5: str | None,
                workers: int) -> dict[str, Any]:
    """Every val file into ``staging/<wnid>/`` by the number in its own name; the rest is reported by name.

    Val files arrive in label-shuffled order, so the split is started afresh rather than resumed.
    """
    shutil.rmtree(staging, ignore_errors=True)
    for wnid in devkit.wnids:
        (staging / wnid).mkdir(parents=True)
    record: dict[str, Any] = {}
    with read_archive(archive, expected_md5=expected_md5) as read, BoundedPool(workers) as pool:
        assert read.tar is not None
        batcher = _Batcher(pool)
        for member, name, wnid in val_members(read.tar, archive, devkit, record):
            batcher.add(staging / wnid / name, member_bytes(read.tar, member))
        batcher.flush()
    return {"archive": read.stats, **record}


def extract_flat(archive: Path, staging: Path, *, expected_md5: str | None, workers: int) -> dict[str, Any]:
    """Every file of a tar into one folder by its base name (the test images, which have no labels)."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    duplicates: list[str] = []
    names: set[str] = set()
    with read_archive(archive, expected_md5=expected_md5) as read, BoundedPool(workers) as pool:
        assert read.tar is not None
        batcher = _Batcher(pool)
        for member in read.tar:
            path = check_member(member, archive.name)
            if member.isdir():
                continue
            if safe_name(path.name, f"{archive.name}: member") in names:
                duplicates.append(member.name)
                continue
            names.add(path.name)
            batcher.add(staging / path.name, member_bytes(read.tar, member))
        batcher.flush()
    require_some(len(names), archive, "files")
    return {"archive": read.stats, "extra": duplicates}


def require_some(found: int, archive: Path, what: str) -> None:
    """An archive that yields nothing is an error: an empty split must never be recorded as finished."""
    if not found:
        raise ArchiveError(f"archive {archive} holds no {what}: it is empty or not the official one; "
                           "download it again")


def count_files(split_dir: Path) -> dict[str, int]:
    """Files per class folder of a split (what the report states and a re-run re-verifies)."""
    counts = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir():
            counts[entry.name] = sum(1 for f in os.scandir(entry.path) if f.is_file())
    return counts
