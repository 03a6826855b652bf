"""One-pass reading: the MD5 covers every byte even when members are skipped; member path checks."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import PurePosixPath

import pytest

from pipeline.archives import HashingReader, UnsafeMemberError, check_member, flat_name, read_archive
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
