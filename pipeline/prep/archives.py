"""Reading archives safely and in one pass: the MD5 is computed from the same bytes that are extracted.

The official archives are large (the train tar is 138 GiB), so they are read once, front to back: every
byte tarfile asks for goes through ``HashingReader``, which feeds the MD5 and the progress line. When
no checksum is wanted, skipped members are seeked over instead (a resumed run then skips finished classes
without reading them).

Every member is checked before anything is written: absolute names, ``..``, links, devices, FIFOs and names
that are not UTF-8 or hold control characters are refused with ``UnsafeMemberError`` (stricter than tarfile's
``data`` filter, which allows links inside the destination); a name that becomes a file must be a plain portable
one (``safe_name``). Files are written by this module, never by ``TarFile.extract``. Names are decoded as UTF-8
whatever the locale, so that an undecodable one is refused here rather than crashing the loaders later.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import re
import queue
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterator

from pipeline.core.errors import UserError
from pipeline.core.logs import Progress

log = logging.getLogger(__name__)

READ_CHUNK = 4 << 20  # bytes per read when draining or reading through a skipped member
HASH_QUEUE_CHUNKS = 16  # chunks read but not yet hashed, at most (the chunks are shared with the writers)
NAME_ENCODING = "utf-8"  # member names; tarfile keeps undecodable bytes as surrogates, which check_member refuses
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc: newline, tab, escape, ...
PORTABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")  # POSIX portable file name, not hidden

# The official archive names (synthetic test archives use the same ones) and their published MD5s.
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
TEST_TAR = "ILSVRC2012_img_test.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
CIFAR10_TAR = "cifar-10-python.tar.gz"
OFFICIAL_MD5 = {
    TRAIN_TAR: "1d675b47d978889d74fa0da5fadfb00e",
    VAL_TAR: "29b22e2961454d5413ddabcf34fc5622",
    DEVKIT_TAR: "fa75699e90414af021442c21a62c3abf",
    CIFAR10_TAR: "c58f30108f718f92721af3b95e74349a",
}


class PrepError(UserError, RuntimeError):
    """Bad input to the prep stage; the message says what is wrong and what to do."""


class ArchiveError(PrepError):
    """An archive that is missing, truncated or not in the expected shape."""


class ChecksumError(ArchiveError):
    """An archive whose MD5 differs from the expected one."""


class UnsafeMemberError(ArchiveError):
    """A member that could write outside the destination (absolute path, '..', link, device)."""


class _Hasher(threading.Thread):
    """MD5 in its own thread (hashlib releases the GIL), so hashing overlaps reading and writing."""

    def __init__(self) -> None:
        super().__init__(name="prep-md5", daemon=True)
        self.md5 = hashlib.md5()
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=HASH_QUEUE_CHUNKS)

    def run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            self.md5.update(chunk)


class HashingReader:
    """A read-only file over ``fh`` that hashes every byte it hands out, in order.

    Forward seeks read through (and hash) the bytes in between, so the digest covers the whole file;
    with ``hashing=False`` they are real seeks. A backward seek while hashing would break the digest
    and is refused. ``finish()`` ends the hashing thread and returns the digest.
    """

    def __init__(self, fh: IO[bytes], *, hashing: bool, on_read: Callable[[int], None]):
        self._fh, self.hashing, self._on_read = fh, hashing, on_read
        self._hasher = _Hasher() if hashing else None
        if self._hasher is not None:
            self._hasher.start()
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._fh.read(size)
        except OSError as exc:  # EIO and the like: the archive, not the data dir, is at fault
            raise ArchiveError(f"cannot read archive {getattr(self._fh, 'name', '')}: {exc.strerror or exc}") from None
        if self._hasher is not None and data:
            self._hasher.chunks.put(data)
        self.position += len(data)
        self._on_read(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        target = {0: offset, 1: self.position + offset}.get(whence)
        if target is None:
            raise OSError("HashingReader seeks from the start or the current position only")
        if not self.hashing:
            self._on_read(target - self.position)
            self.position = self._fh.seek(target)
            return self.position
        if target < self.position:
            raise OSError(f"backward seek to {target} from {self.position} would skip bytes of the MD5")
        while self.position < target and self.read(min(READ_CHUNK, target - self.position)):
            pass
        return self.position

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return True

    def drain(self) -> None:
        """Read (and hash) whatever follows the archive's end: tar record padding."""
        while self.read(READ_CHUNK):
            pass

    def finish(self) -> str | None:
        """The MD5 of everything read (None when not hashing); stops the hashing thread."""
        if self._hasher is None:
            return None
        if self._hasher.is_alive():
            self._hasher.chunks.put(None)
            self._hasher.join()
        return self._hasher.md5.hexdigest()


@dataclass
class ArchiveRead:
    """An open archive and, once it is read to the end, what the prep report says about it."""
    path: Path
    tar: tarfile.TarFile | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def missing_archive_error(path: Path) -> ArchiveError:
    try:
        present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError as exc:
        raise unreadable_archive_error(path.parent, exc) from None
    return ArchiveError(f"archive {path} is missing (the archive dir holds {present or 'nothing'}); "
                        f"put the official {path.name} there or pass --archive-dir")


def unreadable_archive_error(path: Path, exc: OSError) -> ArchiveError:
    return ArchiveError(f"cannot read {path}: {exc.strerror or exc}; give this user read access to the archive dir "
                        "and its archives, or pass another --archive-dir")


def archive_exists(path: Path) -> bool:
    """Whether ``path`` is a file; an archive dir that cannot be searched is an ArchiveError, not a missing file."""
    try:
        return path.is_file()
    except OSError as exc:
        raise unreadable_archive_error(path.parent, exc) from None


@contextlib.contextmanager
def read_archive(path: Path, *, expected_md5: str | None, digest: bool = False) -> Iterator[ArchiveRead]:
    """Open ``path`` (tar or tar.gz) for one front-to-back pass; on leaving, check its end and its MD5 (computed
    also without one to check when ``digest``: a packed data dir's manifest records it).

    A truncated or corrupt archive raises ArchiveError, a wrong MD5 ChecksumError; both name the file.
    """
    if not archive_exists(path):
        raise missing_archive_error(path)
    start = time.monotonic()
    read = ArchiveRead(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise unreadable_archive_error(path, exc) from None
    stat = os.fstat(fh.fileno())
    with fh, Progress(path.name, stat.st_size, unit="B", logger=log) as progress:
        reader = HashingReader(fh, hashing=digest or expected_md5 is not None, on_read=progress.update)
        try:
            mode = "r:gz" if path.name.endswith(".gz") else "r:"
            read.tar = tarfile.open(fileobj=reader, mode=mode, encoding=NAME_ENCODING)  # type: ignore[call-overload]
            yield read
            check_end(read.tar, f"archive {path}")
            reader.drain()
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise ArchiveError(f"archive {path} is truncated or corrupt ({exc}); download it again") from None
        finally:
            md5 = reader.finish()
    seconds = time.monotonic() - start
    size = stat.st_size
    read.stats = {"bytes": size, "mtime_ns": stat.st_mtime_ns, "md5": md5, "expected_md5": expected_md5,
                  "checksum": "skipped" if expected_md5 is None else "ok" if md5 == expected_md5 else "mismatch",
                  "seconds": round(seconds, 3), "mb_per_s": round(size / 1e6 / max(seconds, 1e-9), 1)}
    if read.stats["checksum"] == "mismatch":
        raise ChecksumError(f"checksum mismatch for {path}: MD5 {md5}, expected {expected_md5}. The file is "
                            "damaged or not the official one: download it again, or pass --skip-checksum "
                            "for a mirror or a subset you trust")


def check_end(tar: tarfile.TarFile, what: str) -> None:
    """tarfile stops quietly when an archive ends exactly between two members: demand the end-of-archive blocks.

    ``what`` names the tar in the error: ``archive <path>``, or a class tar inside the train archive.
    """
    tar.getmembers()  # reads the remaining headers, should the caller have stopped early
    stream = tar.fileobj
    assert stream is not None
    end = tar.offset
    while stream.read(READ_CHUNK):  # for .tar.gz this also checks the gzip trailer (CRC and length)
        pass
    if stream.tell() < end + 2 * tarfile.BLOCKSIZE:
        raise ArchiveError(f"{what} ends after {end:,} bytes without the end-of-archive marker: it is truncated "
                           "(an interrupted download or copy); download it again")


def check_member(member: tarfile.TarInfo, where: str) -> PurePosixPath:
    """The member's relative path, or UnsafeMemberError when it could escape or is not a plain file or folder."""
    path = PurePosixPath(member.name)
    reason = ""
    if not _is_utf8(member.name):
        reason = "has a name that is not valid UTF-8"
    elif CONTROL_CHARACTER.search(member.name):
        reason = "has a control character (newline, tab, ...) in its name"
    elif path.is_absolute() or member.name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", member.name):
        reason = "has an absolute path"
    elif ".." in path.parts or "\\" in member.name:
        reason = "has '..' or a backslash in its path"
    elif member.issym() or member.islnk():
        reason = f"is a link to {member.linkname!r}"
    elif not (member.isfile() or member.isdir()):
        reason = "is a device, FIFO or other special file"
    if reason:
        raise UnsafeMemberError(f"{where}: member {shown(member.name)} {reason}; nothing more is extracted from it. "
                                "Official archives hold plain files with plain names only: download the archive "
                                "again from the official source")
    return path


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: the bytes tarfile could not decode
        return False
    return True


def shown(name: str) -> str:
    """``repr`` of a member name; a name that is not UTF-8 as its bytes, e.g. ``b'a\\xe9.JPEG'``."""
    return repr(name) if _is_utf8(name) else repr(name.encode(NAME_ENCODING, "surrogateescape"))


def safe_name(name: str, where: str) -> str:
    """``name`` when it may become a file or folder name: letters, digits, '.', '_', '-', not hidden."""
    if not PORTABLE_NAME.fullmatch(name):
        raise UnsafeMemberError(f"{where} {shown(name)} is not a plain file name (letters, digits, '.', '_' and '-', "
                                "not starting with '.'), which the official archives use throughout; refusing to "
                                "write it. Download the archive again from the official source")
    return name


def flat_name(path: PurePosixPath) -> str | None:
    """The file name when the member sits at the top of the archive (``./`` allowed), else None."""
    return path.name if len(path.parts) == 1 else None


@contextlib.contextmanager
def naming_errors(path: Path) -> Iterator[None]:
    """Attach ``path`` to an OSError raised by a write (ENOSPC from write() names no file)."""
    try:
        yield
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise


def member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular member's data in one read from the archive stream (no small-buffer copies)."""
    stream = tar.fileobj
    assert stream is not None and member.isfile()
    stream.seek(member.offset_data)
    data = stream.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError(f"unexpected end of data in {member.name}")
    return data


def write_file(dest: Path, data: bytes) -> None:
    """Write a new file (never over an existing one); an OSError names the file."""
    with naming_errors(dest), open(dest, "xb") as out:
        out.write(data)


def write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """Copy one checked regular member to ``dest``, which must not exist yet."""
    write_file(dest, member_bytes(tar, member))
