"""The prep stage on official-shaped archives: placement of every file, the class list, the report, re-runs, CLI."""
from __future__ import annotations

import json
import os

import pytest
from torchvision.datasets import ImageFolder

from pipeline.core.config import Config
from pipeline.prep.classes import read_classes
from pipeline.prep.datadir import DataDirError
from pipeline.prep.prepare import TEST_TAR, prepare, prepare_imagenet
from pipeline.prep.synthetic import DEVKIT_TAR, TRAIN_TAR, VAL_TAR
from prep_fixtures import assert_prepared, file_member, run_prep_cli, small_archives, tar_members, write_tar


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    return small_archives(tmp_path_factory.mktemp("archives"))


def config(archive_dir, data_dir, **prep) -> Config:
    cfg = Config()
    cfg.prep.archive_dir, cfg.data.data_dir, cfg.data.workers = str(archive_dir), str(data_dir), 2
    for key, value in prep.items():
        setattr(cfg.prep, key, value)
    return cfg


@pytest.mark.parametrize("workers", [1, 3])
def test_every_file_lands_in_its_class_and_traps_are_reported_by_name(archives, tmp_path, workers):
    report = prepare_imagenet(archives.archive_dir, tmp_path, workers=workers, expected_md5=archives.md5)
    assert_prepared(archives, tmp_path)
    val = report["splits"]["val"]
    assert val["missing"] == archives.missing_val == ["ILSVRC2012_val_00000003.JPEG", "ILSVRC2012_val_00000017.JPEG"]
    assert val["unlabelled"] == archives.unlabelled_val and val["extra"] == []
    assert val["images"] == len(archives.val_labels) == 22
    assert report["splits"]["train"]["per_class"] == {w: 5 for w in archives.wnids}
    assert {a["checksum"] for a in report["archives"].values()} == {"ok"}
    assert report["official_counts_match"] is False and report["mb_per_s"] > 0
    assert json.loads((tmp_path / "prep_report.json").read_text()) == report


def test_class_list_is_sorted_wnid_order_with_words_and_matches_imagefolder(archives, tmp_path):
    prepare(config(archives.archive_dir, tmp_path, skip_checksum=True))
    entries = read_classes(tmp_path)
    assert [e.wnid for e in entries] == sorted(archives.wnids)
    assert [e.words for e in entries] == [archives.words[e.wnid] for e in entries]
    for split in ("train", "val"):
        assert ImageFolder(str(tmp_path / split)).class_to_idx == {e.wnid: e.index for e in entries}


def test_rerun_on_a_finished_data_dir_is_a_no_op_that_catches_a_changed_tree(archives, tmp_path):
    first = prepare(config(archives.archive_dir, tmp_path, skip_checksum=True))
    some_file = next((tmp_path / "train").glob("*/*.JPEG"))
    before = some_file.stat().st_mtime_ns
    assert prepare(config(archives.archive_dir, tmp_path, skip_checksum=True)) == first
    assert some_file.stat().st_mtime_ns == before
    some_file.unlink()
    with pytest.raises(DataDirError, match=f"{some_file.parent.name} holds 4 files, the prep report says 5"):
        prepare(config(archives.archive_dir, tmp_path, skip_checksum=True))


def test_removed_split_and_report_are_rebuilt_without_touching_the_other_split(archives, tmp_path):
    prepare(config(archives.archive_dir, tmp_path, skip_checksum=True))
    val_file = next((tmp_path / "val").glob("*/*.JPEG"))
    before = val_file.stat().st_mtime_ns
    for path in sorted((tmp_path / "train").glob("*/*"), reverse=True) + sorted((tmp_path / "train").glob("*")):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "train").rmdir()
    (tmp_path / "prep_report.json").unlink()
    prepare(config(archives.archive_dir, tmp_path, skip_checksum=True))
    assert_prepared(archives, tmp_path)
    assert val_file.stat().st_mtime_ns == before


def test_test_archive_goes_to_test_and_archives_are_kept_unless_asked(archives, tmp_path):
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    for name in (TRAIN_TAR, VAL_TAR, DEVKIT_TAR):
        os.link(archives.archive_dir / name, archive_dir / name)
    test_names = [f"ILSVRC2012_test_{k:08d}.JPEG" for k in range(1, 4)]
    write_tar(archive_dir / TEST_TAR, [file_member(n, n.encode()) for n in test_names])
    report = prepare(config(archive_dir, tmp_path / "kept", skip_checksum=True))
    assert sorted(p.name for p in (tmp_path / "kept" / "test").iterdir()) == test_names
    assert report["splits"]["test"]["images"] == 3 and TEST_TAR in report["archives"]
    assert sorted(p.name for p in archive_dir.iterdir()) == sorted([TRAIN_TAR, VAL_TAR, DEVKIT_TAR, TEST_TAR])
    prepare(config(archive_dir, tmp_path / "deleted", skip_checksum=True, delete_archives=True))
    assert list(archive_dir.iterdir()) == []
    assert (tmp_path / "deleted" / "test" / test_names[0]).read_bytes() == test_names[0].encode()


def test_cli_prepares_and_reports_a_checksum_mismatch_by_file_name_without_traceback(archives, tmp_path):
    ok = run_prep_cli("--archive-dir", str(archives.archive_dir), "--data-dir", str(tmp_path / "d"), "--skip-checksum",
                 "--workers", "2")
    assert ok.returncode == 0, ok.stderr
    assert_prepared(archives, tmp_path / "d")
    assert "val files missing (2): ILSVRC2012_val_00000003.JPEG" in ok.stderr
    bad = run_prep_cli("--archive-dir", str(archives.archive_dir), "--data-dir", str(tmp_path / "e"))
    assert bad.returncode == 2
    assert f"error: checksum mismatch for {archives.archive_dir / DEVKIT_TAR}" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "e" / "train").exists()


def test_a_second_class_tar_of_the_same_wnid_is_reported_as_extra(archives, tmp_path):
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    for name in (VAL_TAR, DEVKIT_TAR):
        os.symlink(archives.archive_dir / name, archive_dir / name)
    members = tar_members(archives.archive_dir / TRAIN_TAR)
    first = members[0]
    write_tar(archive_dir / TRAIN_TAR, [*members[:2], first, *members[2:]])  # early, while the first may be extracting
    report = prepare_imagenet(archive_dir, tmp_path / "data", workers=3)
    assert_prepared(archives, tmp_path / "data")
    assert report["splits"]["train"]["extra"] == [first[0].name]
