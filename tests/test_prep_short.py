"""Short or empty archives are errors naming them, nothing is marked finished, and good archives repair the data dir;
a finished data dir given other archives says so instead of keeping its old data in silence."""
from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from pipeline.prep.archives import TEST_TAR, ArchiveError
from pipeline.prep.datadir import DataDirError
from pipeline.prep.prepare import prepare_imagenet
from pipeline.prep.synthetic import TRAIN_TAR, VAL_TAR
from prep_fixtures import archive_dir, archives  # noqa: F401 (fixtures)
from prep_fixtures import (assert_one_line_error, assert_prepared, file_member, replace_class_tar, run_prep_cli,
                           tar_bytes, tar_members, write_tar)


def cut_between_members(data: bytes) -> bytes:
    """A class tar cut just after its second file: no end-of-archive marker, every header whole."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        second = tar.getmembers()[1]
    return data[: second.offset_data + -(-second.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE]


def assert_split_unfinished(data_dir: Path, split: str) -> None:
    for path in (data_dir / split, data_dir / ".prep" / f"{split}.json", data_dir / "prep_report.json"):
        assert not path.exists(), path


CLASS_TAR_DAMAGE = {
    "cut between two files": (cut_between_members, "without the end-of-archive marker: it is truncated"),
    "no files": (lambda data: tar_bytes([]), "holds no files"),
}


@pytest.mark.parametrize("damage", CLASS_TAR_DAMAGE)
def test_short_class_tar_is_an_error_and_good_archives_repair_it(archives, archive_dir, tmp_path, damage):
    change, message = CLASS_TAR_DAMAGE[damage]
    wnid = archives.wnids[2]
    replace_class_tar(archive_dir, wnid, change)
    data_dir = tmp_path / "data"
    with pytest.raises(ArchiveError, match=f"{TRAIN_TAR}:{wnid}.tar .*{message}"):
        prepare_imagenet(archive_dir, data_dir, workers=2)
    assert_split_unfinished(data_dir, "train")
    assert not (data_dir / ".train.partial" / wnid).exists()
    prepare_imagenet(archives.archive_dir, data_dir, workers=2)
    assert_prepared(archives, data_dir)


@pytest.mark.parametrize("split, archive, what", [("train", TRAIN_TAR, "<wnid>.tar of the devkit's 6 classes"),
                                                  ("val", VAL_TAR, "val file with a ground-truth line")])
def test_empty_split_archive_is_an_error_and_good_archives_repair_it(archives, archive_dir, tmp_path, split, archive,
                                                                     what):
    write_tar(archive_dir / archive, [])
    data_dir = tmp_path / "data"
    with pytest.raises(ArchiveError, match=f"archive {archive_dir / archive} holds no {what}"):
        prepare_imagenet(archive_dir, data_dir)
    assert_split_unfinished(data_dir, split)
    prepare_imagenet(archives.archive_dir, data_dir)
    assert_prepared(archives, data_dir)


def test_empty_test_archive_is_an_error(archives, tmp_path):
    archive_dir = tmp_path / "archives"
    shutil.copytree(archives.archive_dir, archive_dir)
    write_tar(archive_dir / TEST_TAR, [])
    with pytest.raises(ArchiveError, match=f"archive {archive_dir / TEST_TAR} holds no files"):
        prepare_imagenet(archive_dir, tmp_path / "data")
    assert_split_unfinished(tmp_path / "data", "test")


def test_cli_says_an_empty_val_archive_in_one_line(archive_dir, tmp_path):
    write_tar(archive_dir / VAL_TAR, [])
    result = run_prep_cli("--archive-dir", str(archive_dir), "--data-dir", str(tmp_path / "d"), "--skip-checksum")
    assert_one_line_error(result, f"archive {archive_dir / VAL_TAR} holds no val file")


def smaller_val_tar(archive_dir: Path) -> int:
    """The val archive without its first 12 files (tars grow in 10 KiB records): another archive, another size."""
    write_tar(archive_dir / VAL_TAR, tar_members(archive_dir / VAL_TAR)[12:])
    return 12


def test_finished_data_dir_given_other_archives_says_so_and_its_hint_redoes_the_split(archives, archive_dir,
                                                                                      tmp_path):
    data_dir = tmp_path / "data"
    prepare_imagenet(archive_dir, data_dir)
    train_file = next((data_dir / "train").glob("*/*.JPEG"))
    before = train_file.stat().st_mtime_ns
    removed = smaller_val_tar(archive_dir)
    with pytest.raises(DataDirError, match=f"{data_dir} was prepared from a {VAL_TAR} of .* bytes, not from "
                                           f"{archive_dir / VAL_TAR} .*remove {data_dir / 'val'} and prep_report.json"):
        prepare_imagenet(archive_dir, data_dir)
    shutil.rmtree(data_dir / "val")
    (data_dir / "prep_report.json").unlink()
    report = prepare_imagenet(archive_dir, data_dir)
    assert report["splits"]["val"]["images"] == len(archives.val_labels) - removed
    assert train_file.stat().st_mtime_ns == before


def test_finished_split_of_an_interrupted_run_given_another_archive_says_so(archives, archive_dir, tmp_path):
    """Train finished, then val failed (empty): a run with another train archive must not reuse the old train."""
    write_tar(archive_dir / VAL_TAR, [])
    with pytest.raises(ArchiveError):
        prepare_imagenet(archive_dir, tmp_path / "data")
    shutil.copy(archives.archive_dir / VAL_TAR, archive_dir / VAL_TAR)
    replace_class_tar(archive_dir, archives.wnids[0], lambda data: data + bytes(10240))
    with pytest.raises(DataDirError, match=f"prepared from a {TRAIN_TAR} of .* bytes"):
        prepare_imagenet(archive_dir, tmp_path / "data")


def test_same_size_archive_with_a_new_mtime_only_warns(archive_dir, tmp_path, caplog):
    """Copies of the archives (to node-local disk, say) have new mtimes: the data is kept, with a warning."""
    first = prepare_imagenet(archive_dir, tmp_path / "data")
    stat = (archive_dir / VAL_TAR).stat()
    os.utime(archive_dir / VAL_TAR, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert prepare_imagenet(archive_dir, tmp_path / "data") == first
    assert f"{archive_dir / VAL_TAR} was modified since" in caplog.text


def test_test_archive_added_to_a_finished_data_dir_says_how_to_add_it(archive_dir, tmp_path):
    data_dir = tmp_path / "data"
    prepare_imagenet(archive_dir, data_dir)
    write_tar(archive_dir / TEST_TAR, [file_member("ILSVRC2012_test_00000001.JPEG", b"jpeg")])
    with pytest.raises(DataDirError, match=f"prepared without the {TEST_TAR} .* remove {data_dir}/prep_report.json"):
        prepare_imagenet(archive_dir, data_dir)
    (data_dir / "prep_report.json").unlink()
    assert prepare_imagenet(archive_dir, data_dir)["splits"]["test"]["images"] == 1
