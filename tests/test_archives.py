"""One-pass reading: the MD5 covers every byte even when members are skipped; member path and name checks."""
from __future__ import annotations

import errno
import hashlib
import io
import tarfile
from pathlib import PurePosixPath

import pytest

from pipeline.prep.archives import (ArchiveError, HashingReader, UnsafeMemberError, check_member, flat_name, read_archive,
                                    safe_name)
from prep_fixtures import file_member, write_tar


def md5_of(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["a.tar", "a.tar.gz"])
@pytest.mark.parametrize("read_data", [True, False])
def test_md5_covers_the_whole_file_whether_or_not_members_are_read(tmp_path, name, read_data):
    path = tmp_path / name
    write_tar(path, [file_member(f"f{i}.JPEG", bytes([i]) * (700 + 300 * i)) for i in range(6)])
    contents = {}
    with read_archive(path, expected_md5=md5_of(path)) as read:
        for member in read.tar:
            if read_data and member.name != "f2.JPEG":
                contents[member.name] = read.tar.extractfile(member).read()
    assert read.stats["md5"] == md5_of(path) and read.stats["checksum"] == "ok"
    assert read.stats["bytes"] == path.stat().st_size
    assert contents == ({f"f{i}.JPEG": bytes([i]) * (700 + 300 * i) for i in range(6) if i != 2} if read_data else {})


def test_skipping_without_checksum_seeks_instead_of_reading(tmp_path):
    data = b"0123456789" * 1000
    reads = []
    reader = HashingReader(io.BytesIO(data), hashing=False, on_read=reads.append)
    reader.read(10)
    reader.seek(9000)
    assert reader.read(5) == b"01234" and reader.tell() == 9005 and sum(reads) == 9005
    hashing = HashingReader(io.BytesIO(data), hashing=True, on_read=lambda n: None)
    hashing.seek(5000)
    with pytest.raises(OSError, match="backward seek"):
        hashing.seek(10)
    hashing.drain()
    assert hashing.finish() == hashlib.md5(data).hexdigest()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("info, reason", [
    (member("/etc/cron.d/job"), "absolute path"),
    (member("C:/windows/x.JPEG"), "absolute path"),
    (member("a/../../x.JPEG"), "'..'"),
    (member("..\\x.JPEG"), "backslash"),
    (member("x.JPEG", tarfile.SYMTYPE, "/etc/passwd"), "link to '/etc/passwd'"),
    (member("x.JPEG", tarfile.LNKTYPE, "y.JPEG"), "link to 'y.JPEG'"),
    (member("x", tarfile.CHRTYPE), "device"),
    (member("x", tarfile.BLKTYPE), "device"),
    (member("x", tarfile.FIFOTYPE), "FIFO"),
    (member("a\udce9.JPEG"), "name that is not valid UTF-8"),
    (member("a\nb.JPEG"), "control character"),
    (member("a\x1b[2Jb.JPEG"), "control character"),
])
def test_unsafe_members_are_refused_with_the_reason(info, reason):
    with pytest.raises(UnsafeMemberError, match=f"archive.tar: member .* {reason}"):
        check_member(info, "archive.tar")


@pytest.mark.parametrize("name, flat", [("./n1_1.JPEG", "n1_1.JPEG"), ("n1_1.JPEG", "n1_1.JPEG"),
                                        ("test/x.JPEG", None)])
def test_plain_members_pass_and_flat_names_are_recognised(name, flat):
    path = check_member(member(name), "archive.tar")
    assert path == PurePosixPath(name) and flat_name(path) == flat
    assert check_member(member("folder", tarfile.DIRTYPE), "archive.tar") == PurePosixPath("folder")


def test_a_name_that_is_not_utf8_is_shown_as_its_bytes():
    with pytest.raises(UnsafeMemberError, match=r"member b'n01_\\xe9\\xff.JPEG' has a name that is not valid UTF-8"):
        check_member(member("n01_\udce9\udcff.JPEG"), "archive.tar")


@pytest.mark.parametrize("name", ["n01440764_10026.JPEG", "data_batch_1", "ILSVRC2012_test_00000001.JPEG", "a-b.c"])
def test_plain_file_names_pass(name):
    assert safe_name(name, "archive.tar: member") == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-rf", "a b", "caf\u00e9.JPEG", "a/b", "x" * 256])
def test_names_that_are_not_plain_file_names_are_refused(name):
    with pytest.raises(UnsafeMemberError, match="archive.tar: member .* is not a plain file name"):
        safe_name(name, "archive.tar: member")


class FailingFile(io.BytesIO):
    """An archive on a disk that fails: every read is an I/O error."""
    name = "/archives/broken.tar"

    def read(self, size: int = -1) -> bytes:
        raise OSError(errno.EIO, "Input/output error")


def test_a_read_error_of_the_archive_is_an_archive_error_naming_it():
    reader = HashingReader(FailingFile(), hashing=True, on_read=lambda n: None)
    with pytest.raises(ArchiveError, match="cannot read archive /archives/broken.tar: Input/output error"):
        reader.read(10)
    reader.finish()
