"""One index instead of a scan: prep writes each split's file index, the loaders read it instead of listing the
tree (the same samples in the same order as the scan), fall back to the scan with a warning without one, and refuse
an index that does not describe the folder beside it."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from pipeline.core.file_index import index_path, list_split, read_index, write_index
from pipeline.data.datasets import DataDirError, imagenet_classes, imagenet_split, split_files
from pipeline.prep.prepare import prepare_imagenet
from pipeline.prep.synthetic import make_image_folder
from prep_fixtures import archives  # noqa: F401 (a fixture)


@pytest.fixture
def folder(tmp_path):
    root = make_image_folder(tmp_path / "data", num_classes=3, train_per_class=5, val_per_class=2, size=(24, 20))
    first = sorted((root / "train").iterdir())[0]
    (first / "nested").mkdir()
    shutil.copy(next(first.glob("*.JPEG")), first / "nested" / "deeper.jpeg")  # ImageFolder walks sub-folders
    (first / "notes.txt").write_text("not an image")
    (root / "train" / "n99999999").mkdir()  # a folder that is no class of classes.tsv
    shutil.copy(next(first.glob("*.JPEG")), root / "train" / "n99999999" / "stray.JPEG")
    return root


def samples(root, split):
    split_files.cache_clear()
    files = imagenet_split(root, split, imagenet_classes(root))
    return [p.decode() for p in files.paths], files.labels.tolist()


def test_the_index_gives_the_samples_of_the_scan_in_the_same_order(folder, caplog):
    write_index(folder, "train")  # after the changes above, as prep would have written it
    with caplog.at_level(logging.WARNING):
        from_index = samples(folder, "train")
    index_path(folder, "train").unlink()
    with caplog.at_level(logging.WARNING):
        from_scan = samples(folder, "train")
    assert from_index == from_scan and len(from_index[0]) == 3 * 5 + 1  # the nested image in, the stray class out
    assert "no file index" in caplog.text and caplog.text.count("no file index") == 1  # the scan said so, once


def test_prep_writes_each_splits_index_and_a_rerun_writes_a_missing_one(archives, tmp_path):  # noqa: F811
    data_dir = tmp_path / "data"
    report = prepare_imagenet(archives.archive_dir, data_dir, workers=2, expected_md5=archives.md5)
    for split in ("train", "val"):
        assert len(read_index(data_dir, split)) == report["splits"][split]["images"]
        assert read_index(data_dir, split) == list_split(data_dir / split)
    index_path(data_dir, "val").unlink()  # a data dir prepared before indexes existed
    prepare_imagenet(archives.archive_dir, data_dir, workers=2, expected_md5=archives.md5)
    assert read_index(data_dir, "val") == list_split(data_dir / "val")


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "is cut short or not one"),
    (lambda text: text.replace("/", "/x", 1), "lists files that are not in"),
    (lambda text: "garbage\n", "is cut short or not one"),
])
def test_an_index_that_does_not_match_its_folder_is_one_line(folder, damage, message):
    path = index_path(folder, "val")
    path.write_text(damage(path.read_text()))
    split_files.cache_clear()
    with pytest.raises(DataDirError, match=message):
        imagenet_split(folder, "val", imagenet_classes(folder))


def test_the_paths_are_numpy_bytes_the_workers_do_not_copy(folder):
    split_files.cache_clear()
    paths, labels = split_files(str(folder), "val", imagenet_classes(folder).wnids)
    assert paths.dtype.kind == "S" and labels.dtype == np.int64 and len(paths) == len(labels) == 6
