"""Node-local staging (``--stage-data-to DIR``): a train or eval job copies its data dir's large files (the archives
or shards its data manifest lists) to a folder on the node once, verified, and reads from that copy::

    DIR/<data dir name>-<hash of its real path and manifest>/
        manifest.json    the source's manifest with files_root "files" and "staged_from" (written last: it marks
                         a complete copy; nothing reads a copy without it)
        <meta files>     the small files the readers need
        files/<name>     each large file, its size and MD5 checked against the manifest while it was copied
        verified.json    what was verified: each large file's size and md5, and its copy's inode and mtime; each
                         meta file's size, inode and mtime, in the source and in the copy
        .staging.lock    held by the process that stages

Who copies: every process of a job calls ``stage_data``; the first to take the copy's lock copies, the others wait
for the lock (the node's other ranks, or another job sharing DIR), then find the copy complete and use it. Why a
lock and no collective: staging runs before the process group exists (so the pre-flight and the group's join meet
nodes that are ready), it must serve two jobs on one node as it serves the ranks of one, and a copy of 140 GB can
outlast a collective's timeout. The kernel releases the lock of a process that dies, so a waiter never waits for a
dead copier: it takes the lock and copies what is missing.

Trust: DEST may be shared by the node's users (/tmp, /dev/shm). The copy's folder is made mode 0700 and used only
when it is a real folder of this user that no one else may write (not a link); the lock file is never followed
through a link. Anything else there is refused, never repaired: another user could have planted it.

A requeue finds the earlier copy: files whose size, inode and mtime still match verified.json are used without
hashing 140 GB again; a file an earlier attempt left half-copied has only a temporary name and is copied anew.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.atomic import atomic_path, atomic_write_text
from pipeline.core.config import Config
from pipeline.core.data_manifest import (MANIFEST_FILE, DataManifestError, Manifest, ManifestFile, files_dir,
                                         read_manifest, to_dict, write_manifest)
from pipeline.core.dir_lock import NoLocksError, locked
from pipeline.core.logs import Progress, format_seconds, human_bytes
from pipeline.data.verified_copy import StagingError, copy_failed, copy_verified, redo

log = logging.getLogger(__name__)

FILES = "files"  # the copy's files_root
VERIFIED = "verified.json"
LOCK_FILE = ".staging.lock"
STAGED_FROM = "staged_from"  # a key the copy's manifest adds: the real path of the data dir it was copied from
RESERVED = (MANIFEST_FILE, VERIFIED, LOCK_FILE)
UNSET_VARIABLE = re.compile(r"\$\{?(\w+)")


class _Busy(Exception):
    """Another process holds the copy's lock (it stages now)."""


def expand_dest(value: str) -> Path:
    """``--stage-data-to`` on this node: its $VARIABLES expanded here (``$TMPDIR`` differs per node and job)."""
    expanded = os.path.expandvars(value)
    unset = UNSET_VARIABLE.search(expanded)
    if unset:
        raise StagingError(f"data.stage_data_to (--stage-data-to) {value!r}: ${unset.group(1)} is not set on host "
                           f"{socket.gethostname()}; pass a variable the jobs' nodes set, or an absolute path")
    if not os.path.isabs(expanded):
        raise StagingError(f"data.stage_data_to (--stage-data-to) {value!r} is {expanded!r} on host "
                           f"{socket.gethostname()}, not an absolute path; pass one (or $TMPDIR/...)")
    return Path(expanded)


def staged_dir(data_dir: str | Path, dest: Path, manifest: Manifest | None = None) -> Path:
    """The copy of ``data_dir`` under ``dest``: named by the data dir and a hash of its real path and its manifest
    (``manifest``, else read), so two data dirs of one name never share a copy, and a data dir prepared again gets a
    new copy: a copy that jobs read is never rewritten under them."""
    real = os.path.realpath(data_dir)
    text = json.dumps(to_dict(manifest or stageable(data_dir)), sort_keys=True)
    digest = hashlib.sha256(f"{real}\0{text}".encode()).hexdigest()
    return dest / f"{Path(real).name}-{digest[:12]}"


def stage_data(data_dir: str | Path, dest: str | Path, *, workers: int = 4, every_s: float = 30.0) -> Path:
    """Make (or find) the verified copy of ``data_dir``'s packed files under ``dest``; returns the copy's folder, a
    data dir the readers use as they use the original. StagingError, with nothing of it used, when it cannot."""
    manifest = stageable(data_dir)
    target = staged_dir(data_dir, Path(dest), manifest)
    source = os.path.realpath(data_dir)
    copy = dataclasses.replace(manifest, files_root=FILES, extra={**manifest.extra, STAGED_FROM: source})
    with _lock(target, every_s):
        if _complete(target, copy, Path(data_dir)):
            log.info("data dir %s: using its staged copy %s (%d files, %s, verified when copied)", data_dir, target,
                     len(copy.files), human_bytes(copy.total_size))
            return target
        _stage(Path(data_dir), manifest, target, copy, workers, every_s)
    return target


def describe(data_dir: str, value: str) -> str:
    """The staging step as ``--dry-run`` shows it (before its prep, the copy's name waits for the manifest)."""
    try:
        copy = str(staged_dir(data_dir, Path(value)))
    except StagingError:
        copy = f"{Path(value) / Path(os.path.realpath(data_dir)).name}-<hash of its path and manifest>"
    return (f"the processes of each node first stage data dir {data_dir} to {copy} "
            "(variables expanded on the node): one copies the files its manifest lists, verified by size and md5 (or "
            "finds an earlier verified copy) while the others wait, then all read that copy")


def stageable(data_dir: str | Path) -> Manifest:
    """The manifest of a data dir staging can copy; StagingError saying why not (checked by the launcher too)."""
    try:
        manifest = read_manifest(data_dir)
    except DataManifestError as exc:
        raise StagingError(str(exc)) from None
    if manifest is None:
        raise StagingError(f"data dir {data_dir} has no {MANIFEST_FILE}: --stage-data-to copies a packed data dir "
                           "(layout archives or shards, whose prep writes one); prep with --layout archives or "
                           "--layout shards, or drop --stage-data-to")
    bad = [name for name in manifest.meta if name in RESERVED or name.startswith(f"{FILES}/")]
    if bad:
        raise StagingError(f"the data manifest of {data_dir} lists meta file {bad[0]!r}, a name its staged copy "
                           f"uses itself; {redo(Path(data_dir))}")
    return manifest


@contextlib.contextmanager
def _lock(target: Path, every_s: float) -> Iterator[None]:
    """Hold the copy's lock, waiting while another process (this node's other rank, another job) stages."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # a link or a file there is refused by the check
            target.mkdir(mode=0o700)
        _check_owned(target)
        # opened here as the lock opens it (no link followed), so that a failure below can only mean another holder
        fd = os.open(target / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        os.close(fd)
        if not regular:
            raise StagingError(f"--stage-data-to: {target / LOCK_FILE} is not a regular file; remove it")
    except OSError as exc:
        raise StagingError(f"--stage-data-to: cannot write {target / LOCK_FILE} ({exc.strerror}); pass a folder "
                           "this user can write on every node") from None
    said = 0.0
    while True:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(locked(target, "staging", label="staged copy", lock_file=LOCK_FILE, error=_Busy,
                                       hint="waiting for it to finish", required=True))
        except NoLocksError:  # every process of the node would copy at once
            raise StagingError(f"--stage-data-to: {target.parent} takes no file locks; pass a node-local folder "
                               "($TMPDIR, a local disk, /dev/shm)") from None
        except _Busy as exc:
            if time.monotonic() - said >= every_s:
                said = time.monotonic()
                log.info("%s", exc)
            time.sleep(1.0)
            continue
        with stack:
            yield
        return


def _check_owned(target: Path) -> None:
    """``target`` is a real folder of this user that no one else may write: DEST may be shared (/tmp, /dev/shm), and
    a folder another user made there in advance (its name is predictable) could hold a forged verified.json, or be a
    link that sends the copy elsewhere."""
    st = os.lstat(target)
    what = None
    if not stat.S_ISDIR(st.st_mode):
        what = "a link or not a folder"
    elif st.st_uid != os.getuid():
        what = f"owned by uid {st.st_uid}"
    elif st.st_mode & 0o022:
        what = f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    if what:
        raise StagingError(f"--stage-data-to: {target} is {what}, not a folder of this user (uid {os.getuid()}) that "
                           "only it may write; it is not trusted: remove it, or pass a folder of your own")


def _complete(target: Path, copy: Manifest, data_dir: Path) -> bool:
    """The copy under ``target`` is ``copy`` in full: its manifest (written last), every large file as verified,
    every meta file as copied from the source now and untouched since."""
    try:
        if read_manifest(target) != copy:
            return False
    except DataManifestError:
        return False
    record = _read_verified(target)
    return (all(_still_verified(target, f, record["files"].get(f.name)) for f in copy.files)
            and all(_unchanged(data_dir / name, record["meta"].get(name))
                    and _unchanged(target / name, record["meta_copies"].get(name)) for name in copy.meta))


def _stage(data_dir: Path, manifest: Manifest, target: Path, copy: Manifest, workers: int, every_s: float) -> None:
    (target / MANIFEST_FILE).unlink(missing_ok=True)  # the copy is about to change: incomplete until written again
    for leftover in (target / FILES).rglob(".*.part"):  # an earlier attempt's copies cut short
        leftover.unlink()
    record = _read_verified(target)
    todo = [f for f in manifest.files if not _still_verified(target, f, record["files"].get(f.name))]
    meta = {name: _meta_stamp(data_dir / name) for name in manifest.meta}
    missing = [name for name, stamp in meta.items() if stamp is None]
    if missing:
        raise StagingError(f"data dir {data_dir} lacks {missing[0]}, which its data manifest lists; {redo(data_dir)}")
    _free_old_copies(target, manifest, todo)
    _check_space(data_dir, target, sum(f.size for f in todo) + sum(stamp["size"] for stamp in meta.values()),
                 len(todo))
    for name in manifest.meta:
        try:
            with atomic_path(target / name) as tmp:
                shutil.copyfile(data_dir / name, tmp)
        except OSError as exc:
            raise copy_failed(data_dir / name, target / name, exc, data_dir) from None
        record["meta"][name], record["meta_copies"][name] = meta[name], _meta_stamp(target / name)
    source_dir, total = files_dir(data_dir, manifest), sum(f.size for f in todo)
    log.info("staging %d of the %d files of %s (%s) to %s with %d thread(s)", len(todo), len(manifest.files),
             data_dir, human_bytes(total), target, min(workers, len(todo)) or 1)
    start, guard, failed = time.monotonic(), threading.Lock(), threading.Event()
    with Progress(f"staging {data_dir.name} to {target}", total, unit="B", logger=log, every_s=every_s) as progress:
        def one(entry: ManifestFile) -> None:
            if failed.is_set():
                return
            try:
                copy_verified(source_dir / entry.name, target / FILES / entry.name, entry, progress.update,
                              data_dir=data_dir)
            except BaseException:
                failed.set()
                raise
            with guard:
                record["files"][entry.name] = _stamp(target, entry)
                atomic_write_text(target / VERIFIED, json.dumps(record, indent=1))
        with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
            for done in [pool.submit(one, f) for f in sorted(todo, key=lambda f: -f.size)]:
                done.result()  # the first failure, once the copies in flight end (no other starts after it)
        atomic_write_text(target / VERIFIED, json.dumps(record, indent=1))
    write_manifest(target, copy)
    elapsed = time.monotonic() - start
    log.info("staged %s to %s: %s in %s (%s/s)", data_dir, target, human_bytes(total), format_seconds(elapsed),
             human_bytes(total / max(elapsed, 1e-9)))


def _free_old_copies(target: Path, manifest: Manifest, todo: list[ManifestFile]) -> None:
    """Remove the copies about to be replaced and the files the manifest no longer lists, before the free space is
    measured: an old version keeps its blocks until it is replaced, and an unlisted file would keep them for ever."""
    listed = {f.name for f in manifest.files} - {f.name for f in todo}
    folder = target / FILES
    for path in [p for p in folder.rglob("*") if p.is_symlink() or not p.is_dir()]:
        if path.relative_to(folder).as_posix() not in listed:
            path.unlink()


def _check_space(data_dir: Path, target: Path, need: int, files: int) -> None:
    free = shutil.disk_usage(target).free
    if need > free:
        raise StagingError(f"--stage-data-to: {target} has {free} bytes ({human_bytes(free)}) free but staging "
                           f"{data_dir} needs {need} bytes ({human_bytes(need)}, {files} large file(s) and the meta "
                           "files); free space there or pass another --stage-data-to")


def _read_verified(target: Path) -> dict[str, dict[str, Any]]:
    try:
        record = json.loads((target / VERIFIED).read_bytes())
        return {key: dict(record[key]) for key in ("files", "meta", "meta_copies")}
    except (OSError, ValueError, KeyError, TypeError):
        return {"files": {}, "meta": {}, "meta_copies": {}}  # none yet, or damaged: what it vouched for is copied again


def _stamp(target: Path, entry: ManifestFile) -> dict[str, Any]:
    st = (target / FILES / entry.name).stat()
    return {"size": entry.size, "md5": entry.md5, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}


def _still_verified(target: Path, entry: ManifestFile, stamp: dict[str, Any] | None) -> bool:
    """The copy of ``entry`` is the file verified when copied (same size, md5, inode and mtime): no re-hash."""
    try:
        return stamp is not None and _stamp(target, entry) == stamp
    except OSError:
        return False


def _meta_stamp(path: Path) -> dict[str, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}


def _unchanged(path: Path, stamp: dict[str, int] | None) -> bool:
    """``path`` is the file ``stamp`` was taken of (a meta file: small, rewritten rather than re-hashed)."""
    now = _meta_stamp(path)
    return now is not None and now == stamp


def as_given(cfg: Config) -> tuple[Config, dict[str, str]]:
    """For a run's records: ``cfg`` with the data dir that was staged (the source) in place of its staged copy, and
    the note that says which copy the job read ({} when it read the data dir itself)."""
    try:
        manifest = read_manifest(cfg.data.data_dir)
    except DataManifestError:
        manifest = None
    source = manifest.extra.get(STAGED_FROM) if manifest else None
    if not isinstance(source, str):
        return cfg, {}
    return (dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=source)),
            {"data_dir": source, "staged_data_dir": str(cfg.data.data_dir)})
