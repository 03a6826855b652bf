"""CIFAR-10 prep: verified extraction that torchvision's reader accepts, counts, no pickle code execution."""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from torchvision.datasets import CIFAR10

from pipeline.core.config import Config
from pipeline.prep.archives import ArchiveError, ChecksumError
from pipeline.prep.cifar import prepare_cifar10
from pipeline.prep.classes import read_classes
from pipeline.prep.datadir import DataDirError
from pipeline.prep.prepare import prepare
from pipeline.prep.synthetic import CIFAR10_LABEL_NAMES, CIFAR10_TAR, make_cifar10_archive
from prep_fixtures import file_member, tar_members, write_tar


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_cifar10_archive(tmp_path_factory.mktemp("cifar"), per_class=5, test_per_class=2, seed=1)


def cifar_config(archive_dir, data_dir, **prep) -> Config:
    cfg = Config()
    cfg.data.dataset, cfg.prep.archive_dir, cfg.data.data_dir = "cifar10", str(archive_dir), str(data_dir)
    for key, value in prep.items():
        setattr(cfg.prep, key, value)
    return cfg


class UncheckedCIFAR10(CIFAR10):
    """torchvision's reader minus the MD5s of the real batch files (the synthetic ones differ by design)."""
    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def test_prepared_cifar_is_read_by_torchvision_with_counts_and_classes(archive, tmp_path):
    report = prepare(cifar_config(archive.parent, tmp_path, skip_checksum=True))
    train, test = UncheckedCIFAR10(str(tmp_path), train=True), UncheckedCIFAR10(str(tmp_path), train=False)
    assert len(train) == 50 and len(test) == 20
    assert report["splits"]["train"]["per_class"] == dict.fromkeys(CIFAR10_LABEL_NAMES, 5)
    assert report["splits"]["test"]["images"] == 20 and report["official_counts_match"] is False
    assert [(e.index, e.wnid) for e in read_classes(tmp_path)] == list(enumerate(train.classes))
    assert np.bincount(test.targets).tolist() == [2] * 10


def test_cifar_checksum_is_verified_and_a_mismatch_names_the_archive(archive, tmp_path):
    actual = hashlib.md5(archive.read_bytes()).hexdigest()
    report = prepare_cifar10(archive.parent, tmp_path / "ok", expected_md5=actual)
    assert report["archives"][CIFAR10_TAR]["checksum"] == "ok"
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {archive}: MD5 {actual}, "
                                            "expected c58f30108f718f92721af3b95e74349a"):
        prepare(cifar_config(archive.parent, tmp_path / "official"))
    assert not (tmp_path / "official" / "cifar-10-batches-py").exists()
    assert not list((tmp_path / "official").iterdir())


def damaged_copy(archive: Path, folder: Path, member: str, change: Callable[[bytes], bytes]) -> Path:
    """A copy of the archive in ``folder`` with the file ``member`` replaced by ``change(its bytes)``."""
    folder.mkdir()
    write_tar(folder / CIFAR10_TAR, [file_member(m.name, change(d) if m.name.endswith(member) else d)
                                     for m, d in tar_members(archive)])
    return folder


class RunsCode:
    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_batch_with_foreign_pickle_globals_is_refused_without_running_them(archive, tmp_path):
    evil = RunsCode()
    evil.marker = str(tmp_path / "code-ran")
    bad_dir = damaged_copy(archive, tmp_path / "bad", "data_batch_3", lambda d: pickle.dumps({"data": evil,
                                                                                               "labels": []}))
    with pytest.raises(ArchiveError, match="data_batch_3 in the CIFAR-10 archive is not a readable batch .*mkdir"):
        prepare(cifar_config(bad_dir, tmp_path / "data", skip_checksum=True))
    assert not (tmp_path / "code-ran").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == []


@pytest.mark.parametrize("label", [10, -1, "cat"])
def test_out_of_range_label_names_the_batch(archive, tmp_path, label):
    def damaged(data: bytes) -> bytes:
        batch = pickle.loads(data, encoding="latin1")  # str keys, as the pipeline reads them
        batch["labels"][2] = label
        return pickle.dumps(batch)

    bad_dir = damaged_copy(archive, tmp_path / "bad", "data_batch_2", damaged)
    with pytest.raises(ArchiveError, match=rf"data_batch_2 in the CIFAR-10 archive has 1 label\(s\) outside 0..9 "
                                           rf"\(first: {label!r}\)"):
        prepare(cifar_config(bad_dir, tmp_path / "data", skip_checksum=True))
    assert [p.name for p in (tmp_path / "data").iterdir()] == []


@pytest.mark.parametrize("name, message", [("cat\tdog", "label name 'cat\\\\tdog' is not a plain file name"),
                                           ("../up", "label name '../up' is not a plain file name"),
                                           (3, "has no 'label_names' list of texts")])
def test_label_name_that_is_no_plain_name_is_refused(archive, tmp_path, name, message):
    def relabel(data: bytes) -> bytes:
        meta = pickle.loads(data, encoding="latin1")
        meta["label_names"][3] = name
        return pickle.dumps(meta)

    bad_dir = damaged_copy(archive, tmp_path / "bad", "batches.meta", relabel)
    with pytest.raises(ArchiveError, match=message):
        prepare(cifar_config(bad_dir, tmp_path / "data", skip_checksum=True))
    assert not (tmp_path / "data" / "classes.tsv").exists()


def test_finished_data_dir_given_another_archive_says_so(archive, tmp_path):
    first = prepare(cifar_config(archive.parent, tmp_path / "data", skip_checksum=True))
    other = make_cifar10_archive(tmp_path / "other", per_class=6, test_per_class=2, seed=1)
    with pytest.raises(DataDirError, match=f"was prepared from a {CIFAR10_TAR} of .* bytes, not from {other} "
                                           r"\(.* bytes\), and still holds that data"):
        prepare(cifar_config(other.parent, tmp_path / "data", skip_checksum=True))
    assert prepare(cifar_config(archive.parent, tmp_path / "data", skip_checksum=True)) == first


def test_missing_batch_and_rerun_checks(archive, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    write_tar(bad_dir / CIFAR10_TAR, [(m, d) for m, d in tar_members(archive) if not m.name.endswith("test_batch")])
    with pytest.raises(ArchiveError, match="has no cifar-10-batches-py/test_batch"):
        prepare(cifar_config(bad_dir, tmp_path / "a", skip_checksum=True))
    first = prepare(cifar_config(archive.parent, tmp_path / "b", skip_checksum=True))
    assert prepare(cifar_config(archive.parent, tmp_path / "b", skip_checksum=True)) == first
    with open(tmp_path / "b" / "cifar-10-batches-py" / "data_batch_2", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(DataDirError, match="data_batch_2 is .* bytes, the prep report says"):
        prepare(cifar_config(archive.parent, tmp_path / "b", skip_checksum=True))
    (tmp_path / "c" / "train").mkdir(parents=True)
    with pytest.raises(DataDirError, match="holds train/ of the imagenet dataset"):
        prepare(cifar_config(archive.parent, tmp_path / "c", skip_checksum=True))


def test_delete_archives_removes_the_archive_only_after_success(archive, tmp_path):
    copy = tmp_path / "archives" / CIFAR10_TAR
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    prepare(cifar_config(copy.parent, tmp_path / "data", skip_checksum=True, delete_archives=True))
    assert not copy.exists()
    with tarfile.open(archive) as tar:
        names = {m.name.split("/")[-1] for m in tar.getmembers()}
    assert {p.name for p in (tmp_path / "data" / "cifar-10-batches-py").iterdir()} == names
