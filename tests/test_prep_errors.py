"""Bad input to prep ends in a clear error naming what is wrong, with nothing half-written and nothing lost."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.prep.archives import ArchiveError, ChecksumError, UnsafeMemberError
from pipeline.prep.classes import write_classes
from pipeline.prep.datadir import DataDirError
from pipeline.prep.devkit import DevkitError
from pipeline.prep.prepare import prepare_imagenet
from pipeline.prep.synthetic import DEVKIT_TAR, TRAIN_TAR, VAL_TAR, make_cifar10_archive
from prep_fixtures import archive_dir, archives  # noqa: F401 (fixtures)
from prep_fixtures import REPO, file_member, replace_class_tar, tar_bytes, tar_members, write_tar


def assert_nothing_finished(data_dir: Path) -> None:
    for name in ("train", "val", "prep_report.json"):
        assert not (data_dir / name).exists(), name
    assert not list(data_dir.rglob("*.tmp"))


def test_missing_archive_is_named_before_anything_is_extracted(archive_dir, tmp_path):
    (archive_dir / VAL_TAR).unlink()
    with pytest.raises(ArchiveError, match=f"archive {archive_dir / VAL_TAR} is missing"):
        prepare_imagenet(archive_dir, tmp_path / "data")
    assert not (tmp_path / "data" / ".train.partial").exists()
    assert_nothing_finished(tmp_path / "data")


def boundary_offset(path: Path, members_kept: int) -> int:
    """Byte offset just after the data of the first ``members_kept`` members (a cut between two members)."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[members_kept - 1]
    return member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


@pytest.mark.parametrize("cut", ["inside a member", "between two members"])
def test_truncated_train_archive_is_an_error_and_keeps_finished_classes(archive_dir, tmp_path, cut):
    path = archive_dir / TRAIN_TAR
    size = path.stat().st_size // 2 + 100 if cut == "inside a member" else boundary_offset(path, 3)
    os.truncate(path, size)
    with pytest.raises(ArchiveError, match=f"archive {path} .*truncated"):
        prepare_imagenet(archive_dir, tmp_path / "data", workers=2)
    assert_nothing_finished(tmp_path / "data")
    assert 1 <= len(list((tmp_path / "data" / ".train.partial").iterdir())) <= 3


def test_truncated_devkit_is_an_error(archive_dir, tmp_path):
    os.truncate(archive_dir / DEVKIT_TAR, (archive_dir / DEVKIT_TAR).stat().st_size - 30)
    with pytest.raises(ArchiveError, match=f"{DEVKIT_TAR} is truncated or corrupt"):
        prepare_imagenet(archive_dir, tmp_path / "data")


def test_devkit_without_meta_mat_says_which_file_is_expected(archive_dir, tmp_path):
    path = archive_dir / DEVKIT_TAR
    write_tar(path, [(m, d) for m, d in tar_members(path) if not m.name.endswith("meta.mat")])
    with pytest.raises(DevkitError, match="has no data/meta.mat: is it ILSVRC2012_devkit_t12.tar.gz"):
        prepare_imagenet(archive_dir, tmp_path / "data")
    assert_nothing_finished(tmp_path / "data")


def test_checksum_mismatch_names_the_archive_and_keeps_no_files_from_it(archives, tmp_path):
    wrong = {**archives.md5, TRAIN_TAR: "0" * 32}
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {archives.archive_dir / TRAIN_TAR}: "
                                            f"MD5 {archives.md5[TRAIN_TAR]}, expected 0{{32}}"):
        prepare_imagenet(archives.archive_dir, tmp_path, expected_md5=wrong)
    assert_nothing_finished(tmp_path)
    assert not (tmp_path / ".train.partial").exists()
    assert (archives.archive_dir / TRAIN_TAR).exists()


def test_data_dir_with_another_prepared_dataset_is_refused(archives, tmp_path):
    from pipeline.prep.cifar import prepare_cifar10

    prepare_cifar10(make_cifar10_archive(tmp_path / "cifar", per_class=2, test_per_class=1).parent, tmp_path / "d")
    with pytest.raises(DataDirError, match="already holds the prepared cifar10 dataset"):
        prepare_imagenet(archives.archive_dir, tmp_path / "d")


def test_data_dir_with_other_classes_is_refused(archives, tmp_path):
    (tmp_path / "a" / ".train.partial" / "n99999999").mkdir(parents=True)
    with pytest.raises(DataDirError, match=r"holds folders that are not classes of the devkit \(\['n99999999'\]\)"):
        prepare_imagenet(archives.archive_dir, tmp_path / "a")
    write_classes(tmp_path / "b", [("n00000001", "other"), ("n00000002", "other")])
    with pytest.raises(DataDirError, match="lists 2 classes that are not the devkit's 6"):
        prepare_imagenet(archives.archive_dir, tmp_path / "b")


def special_member(kind: str) -> tuple[tarfile.TarInfo, bytes | None]:
    if kind in ("absolute", "dotdot"):
        return file_member("/tmp/escape.JPEG" if kind == "absolute" else "../escape.JPEG", b"x")
    info = tarfile.TarInfo("ILSVRC2012_val_00000001.JPEG")
    info.type, info.linkname = {"symlink": (tarfile.SYMTYPE, "/etc/passwd"), "hardlink": (tarfile.LNKTYPE, "x"),
                                "device": (tarfile.CHRTYPE, ""), "fifo": (tarfile.FIFOTYPE, "")}[kind]
    return info, None


KINDS = ["absolute", "dotdot", "symlink", "hardlink", "device", "fifo"]
REASONS = {"absolute": "absolute path", "dotdot": "'..'", "symlink": "link to '/etc/passwd'", "hardlink": "link to",
           "device": "device", "fifo": "FIFO"}


@pytest.mark.parametrize("kind", KINDS)
def test_malicious_val_member_is_refused_and_nothing_escapes(archive_dir, tmp_path, kind):
    path = archive_dir / VAL_TAR
    write_tar(path, [special_member(kind)] + tar_members(path))
    data_dir = tmp_path / "deep" / "data"
    with pytest.raises(UnsafeMemberError, match=f"{VAL_TAR}: member .* {REASONS[kind]}"):
        prepare_imagenet(archive_dir, data_dir)
    assert not (tmp_path / "deep" / "escape.JPEG").exists() and not (data_dir / "val").exists()
    assert not (data_dir / ".val.partial").exists()


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_malicious_member_inside_a_class_tar_is_refused_and_its_temp_removed(archives, archive_dir, tmp_path, kind):
    wnid = archives.wnids[0]
    replace_class_tar(archive_dir, wnid, lambda data: tar_bytes([special_member(kind), *tar_members(data)]))
    with pytest.raises(UnsafeMemberError, match=f"{TRAIN_TAR}:{wnid}.tar: member"):
        prepare_imagenet(archive_dir, tmp_path / "data", workers=2)
    assert not (tmp_path / "data" / ".train.partial" / wnid).exists()
    assert_nothing_finished(tmp_path / "data")


def test_full_disk_is_a_clear_error_and_the_half_written_class_is_removed(archives, tmp_path):
    """A real full file system: a 96 KiB tmpfs mounted in a private mount namespace (needs unshare)."""
    data_dir = tmp_path / "small-disk"
    data_dir.mkdir()
    script = (f"mount -t tmpfs -o size=96k tmpfs {data_dir} && cd {REPO} && "
              f"{sys.executable} -m jobs.prep --archive-dir {archives.archive_dir} --data-dir {data_dir} "
              f"--skip-checksum --workers 1; echo rc=$?; find {data_dir} -name '*.tmp'; ls -a {data_dir}")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "rc=2" in result.stdout, result.stdout + result.stderr
    assert f"error: no space left in {data_dir}" in result.stderr and "Traceback" not in result.stderr
    listing = result.stdout.split("rc=2", 1)[1].split()
    assert not any(name.endswith(".tmp") for name in listing)
    assert "train" not in listing and "prep_report.json" not in listing


@pytest.mark.parametrize("damage", ["record", "classes.tsv"])
def test_damaged_state_of_an_interrupted_run_is_a_data_dir_error(archive_dir, tmp_path, damage):
    """Train finished, val failed; then the split record or the class list is damaged (by hand, or a bad disk)."""
    write_tar(archive_dir / VAL_TAR, [])
    with pytest.raises(ArchiveError):
        prepare_imagenet(archive_dir, tmp_path)
    if damage == "record":
        (tmp_path / ".prep" / "train.json").write_text('{"archive": ')
        message = r"\.prep/train\.json is not valid JSON .*remove it and .*/train to redo that split"
    else:
        with open(tmp_path / "classes.tsv", "a") as fh:
            fh.write("seven\tn00000007\n")
        message = r"classes\.tsv line 8 is not 'index<TAB>wnid<TAB>words': 'seven\\tn00000007'"
    with pytest.raises(DataDirError, match=message):
        prepare_imagenet(archive_dir, tmp_path)
