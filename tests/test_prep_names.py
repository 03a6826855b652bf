"""Every name that becomes a path is checked: WNIDs from meta.mat, member names (UTF-8, plain, once per class);
meta.mat fields of another type are refused in one line rather than crashing."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.prep.archives import TEST_TAR, ArchiveError, UnsafeMemberError
from pipeline.prep.devkit import DevkitError
from pipeline.prep.prepare import prepare_imagenet
from pipeline.prep.synthetic import TRAIN_TAR, VAL_TAR
from prep_fixtures import archive_dir, archives  # noqa: F401 (fixtures)
from prep_fixtures import file_member, replace_class_tar, rewrite_meta_mat, tar_bytes, tar_members, write_tar

NOT_UTF8 = "\udce9"  # how tarfile holds the byte 0xE9 of a name that is not UTF-8 (surrogateescape)


def assert_unfinished(data_dir: Path, split: str = "train") -> None:
    assert not (data_dir / "prep_report.json").exists() and not (data_dir / ".prep" / f"{split}.json").exists()


def set_first_leaf(field: str, value: object):
    """A meta.mat change: ``field`` of the first synset (a leaf, ILSVRC2012_ID 1) set to ``value``."""
    def change(synsets: np.ndarray) -> None:
        synsets[field][0, 0] = value
    return change


@pytest.mark.parametrize("wnid", ["../../escape", "n1234567", "n123456789", "N01440764", "n0144076a"])
def test_leaf_wnid_that_is_not_n_and_8_digits_is_refused_and_nothing_escapes(archive_dir, tmp_path, wnid):
    rewrite_meta_mat(archive_dir, set_first_leaf("WNID", np.array([wnid])))
    data_dir = tmp_path / "deep" / "data"
    with pytest.raises(DevkitError, match=f"synset 1 has WNID {re.escape(repr(wnid))}, not n \\+ 8 digits"):
        prepare_imagenet(archive_dir, data_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives", "deep"]
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["data"] and not list(data_dir.iterdir())


@pytest.mark.parametrize("field, value, wanted", [
    ("WNID", np.array([[1440764.0]]), "text"),
    ("words", np.array([[3.0]]), "text"),
    ("num_children", np.array(["none"]), "one whole number"),
    ("ILSVRC2012_ID", np.zeros((0, 0)), "one whole number"),
    ("ILSVRC2012_ID", np.array([[1.5]]), "one whole number"),
    ("ILSVRC2012_ID", np.array([[1, 2]]), "one whole number"),
])
def test_meta_mat_field_of_the_wrong_type_is_a_devkit_error(archive_dir, tmp_path, field, value, wanted):
    rewrite_meta_mat(archive_dir, set_first_leaf(field, value))
    with pytest.raises(DevkitError, match=f"meta.mat: synset 1 has {field} = .*, not {wanted}"):
        prepare_imagenet(archive_dir, tmp_path / "data")
    assert not (tmp_path / "data" / "classes.tsv").exists()


def test_duplicate_member_in_a_class_tar_is_an_archive_error(archives, archive_dir, tmp_path):
    wnid = archives.wnids[1]
    replace_class_tar(archive_dir, wnid, lambda data: tar_bytes([*tar_members(data), tar_members(data)[0]]))
    with pytest.raises(ArchiveError, match=f"{TRAIN_TAR}:{wnid}.tar holds '{archives.train_files[wnid][0]}' twice"):
        prepare_imagenet(archive_dir, tmp_path / "data", workers=2)
    assert not (tmp_path / "data" / ".train.partial" / wnid).exists() and not list(tmp_path.rglob("*.tmp"))
    assert_unfinished(tmp_path / "data")


@pytest.mark.parametrize("archive", [VAL_TAR, "class tar"])
def test_member_name_that_is_not_utf8_is_refused_with_its_bytes_shown(archives, archive_dir, tmp_path, archive):
    bad = file_member(f"ILSVRC2012_val_0000000{NOT_UTF8}.JPEG", b"jpeg")
    if archive == VAL_TAR:
        write_tar(archive_dir / VAL_TAR, [*tar_members(archive_dir / VAL_TAR), bad])
        where = VAL_TAR
    else:
        replace_class_tar(archive_dir, archives.wnids[0], lambda data: tar_bytes([bad, *tar_members(data)]))
        where = f"{TRAIN_TAR}:{archives.wnids[0]}.tar"
    shown = re.escape("b'ILSVRC2012_val_0000000\\xe9.JPEG'")
    with pytest.raises(UnsafeMemberError, match=f"{re.escape(where)}: member {shown} has a name that is not valid "
                                                "UTF-8"):
        prepare_imagenet(archive_dir, tmp_path / "data", workers=2)
    assert_unfinished(tmp_path / "data", "val" if archive == VAL_TAR else "train")
    assert not [p for p in tmp_path.rglob("*") if not p.name.isascii()]


@pytest.mark.parametrize("name, reason", [
    (".n0_1.JPEG", "is not a plain file name"),
    ("caf\u00e9.JPEG", "is not a plain file name"),
    ("two words.JPEG", "is not a plain file name"),
    ("line\nbreak.JPEG", "control character"),
])
@pytest.mark.parametrize("archive", [TEST_TAR, "class tar"])
def test_member_name_that_is_no_plain_file_name_is_refused(archives, archive_dir, tmp_path, name, reason, archive):
    bad = file_member(name, b"jpeg")
    if archive == TEST_TAR:
        write_tar(archive_dir / TEST_TAR, [file_member("ILSVRC2012_test_00000001.JPEG", b"jpeg"), bad])
    else:
        replace_class_tar(archive_dir, archives.wnids[0], lambda data: tar_bytes([*tar_members(data), bad]))
    with pytest.raises(UnsafeMemberError, match=reason):
        prepare_imagenet(archive_dir, tmp_path / "data", workers=2)
    assert not list(tmp_path.rglob(name))
    assert not (tmp_path / "data" / "prep_report.json").exists()
