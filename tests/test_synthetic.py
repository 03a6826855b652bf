"""The synthetic archives are in the official shapes, deterministic, learnable, and carry the classic traps."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from torchvision.datasets import CIFAR10
from torchvision.datasets import imagenet as tv_imagenet

from pipeline.prep.classes import read_classes
from pipeline.prep.synthetic import (CIFAR10_LABEL_NAMES, CIFAR10_TAR, DEVKIT_TAR, TRAIN_TAR, VAL_TAR, make_cifar10_archive,
                                     make_image_folder, make_imagenet_archives)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    return make_imagenet_archives(tmp_path_factory.mktemp("archives"), num_classes=5, train_per_class=4,
                                  val_per_class=4, missing_val=(2, 9), unlabelled_val=2, seed=3)


def devkit_member(info, suffix: str) -> bytes:
    with tarfile.open(info.archive_dir / DEVKIT_TAR) as tar:
        return tar.extractfile(f"ILSVRC2012_devkit_t12/data/{suffix}").read()


def test_meta_mat_has_real_structure_shuffled_ids_and_non_leaf_synsets(archives):
    synsets = scipy.io.loadmat(io.BytesIO(devkit_member(archives, "meta.mat")), squeeze_me=True)["synsets"]
    assert synsets.dtype.names == ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                                   "wordnet_height", "num_train_images")
    leaves = [(int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if int(s["num_children"]) == 0]
    inner = [s for s in synsets if int(s["num_children"]) > 0]
    assert sorted(leaves) == sorted((i, w) for w, i in archives.ilsvrc_ids.items())
    assert sorted(i for i, _ in leaves) == list(range(1, 6))
    assert [w for _, w in sorted(leaves)] != sorted(w for _, w in leaves), "IDs must not follow wnid order"
    assert inner and all(np.size(s["children"]) == int(s["num_children"]) for s in inner)


def test_ground_truth_labels_every_val_file_and_classes_are_interleaved(archives):
    truth = devkit_member(archives, "ILSVRC2012_validation_ground_truth.txt").decode().split()
    wnid_of_id = {i: w for w, i in archives.ilsvrc_ids.items()}
    assert len(truth) == 20
    for k, sid in enumerate(truth, 1):
        name = f"ILSVRC2012_val_{k:08d}.JPEG"
        assert archives.val_labels.get(name, wnid_of_id[int(sid)]) == wnid_of_id[int(sid)]
    labels_in_order = [archives.val_labels[n] for n in sorted(archives.val_labels)]
    assert labels_in_order != sorted(labels_in_order)
    with tarfile.open(archives.archive_dir / VAL_TAR) as tar:
        names = tar.getnames()
    assert archives.missing_val == ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000009.JPEG"]
    assert not set(archives.missing_val) & set(names)
    assert archives.unlabelled_val == ["ILSVRC2012_val_00000021.JPEG", "ILSVRC2012_val_00000022.JPEG"]
    assert set(names) == set(archives.val_labels) | set(archives.unlabelled_val)


def test_train_tar_nests_one_tar_per_class_of_real_jpegs(archives):
    with tarfile.open(archives.archive_dir / TRAIN_TAR) as outer:
        assert sorted(outer.getnames()) == sorted(f"{w}.tar" for w in archives.wnids)
        inner = tarfile.open(fileobj=outer.extractfile(f"{archives.wnids[0]}.tar"))
        assert inner.getnames() == archives.train_files[archives.wnids[0]]
        image = Image.open(inner.extractfile(inner.getnames()[0]))
        assert image.format == "JPEG" and image.mode == "RGB"


def test_torchvision_reads_the_devkit(archives, tmp_path, monkeypatch):
    """An independent parser (torchvision's) agrees with the generator on classes and val labels."""
    (tmp_path / DEVKIT_TAR).write_bytes((archives.archive_dir / DEVKIT_TAR).read_bytes())
    monkeypatch.setitem(tv_imagenet.ARCHIVE_META, "devkit", (DEVKIT_TAR, None))
    tv_imagenet.parse_devkit_archive(str(tmp_path))
    wnid_to_classes, val_wnids = tv_imagenet.load_meta_file(str(tmp_path))
    assert set(wnid_to_classes) == set(archives.wnids)
    numbered = {f"ILSVRC2012_val_{k:08d}.JPEG": w for k, w in enumerate(val_wnids, 1)}
    assert all(numbered[name] == wnid for name, wnid in archives.val_labels.items())


def test_same_seed_same_bytes_other_seed_other_bytes_and_rerun_is_a_no_op(archives, tmp_path):
    again = make_imagenet_archives(tmp_path / "a", num_classes=5, train_per_class=4, val_per_class=4,
                                   missing_val=(2, 9), unlabelled_val=2, seed=3)
    assert again.md5 == archives.md5 and again.val_labels == archives.val_labels
    mtime = (tmp_path / "a" / TRAIN_TAR).stat().st_mtime_ns
    make_imagenet_archives(tmp_path / "a", num_classes=5, train_per_class=4, val_per_class=4, missing_val=(2, 9),
                           unlabelled_val=2, seed=3)
    assert (tmp_path / "a" / TRAIN_TAR).stat().st_mtime_ns == mtime
    other = make_imagenet_archives(tmp_path / "a", num_classes=5, train_per_class=4, val_per_class=4, seed=4)
    assert other.md5[TRAIN_TAR] != archives.md5[TRAIN_TAR]


def test_missing_val_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="missing_val"):
        make_imagenet_archives(tmp_path, num_classes=2, train_per_class=1, val_per_class=2, missing_val=(5,))


def mean_colour(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).mean(axis=(0, 1))


def test_image_folder_is_learnable_and_has_the_class_list(tmp_path):
    """A nearest-centroid classifier on mean colour alone beats chance by far: a CNN will learn it."""
    root = make_image_folder(tmp_path, num_classes=6, train_per_class=8, val_per_class=4, seed=1)
    entries = read_classes(root)
    assert [e.wnid for e in entries] == sorted(p.name for p in (root / "train").iterdir())
    assert [e.index for e in entries] == list(range(6))
    centroids = np.stack([np.mean([mean_colour(p) for p in (root / "train" / e.wnid).iterdir()], axis=0)
                          for e in entries])
    hits = total = 0
    for e in entries:
        for path in (root / "val" / e.wnid).iterdir():
            hits += int(np.argmin(np.linalg.norm(centroids - mean_colour(path), axis=1)) == e.index)
            total += 1
    assert total == 24 and hits / total > 0.9
    sizes = {Image.open(p).size for p in (root / "train" / entries[0].wnid).iterdir()}
    assert len(sizes) > 1


class UncheckedCIFAR10(CIFAR10):
    """torchvision's reader without its MD5s of the real files (the synthetic ones differ by design)."""
    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def test_cifar10_archive_reads_like_the_official_one(tmp_path):
    archive = make_cifar10_archive(tmp_path, per_class=6, test_per_class=3, seed=2)
    assert archive.name == CIFAR10_TAR
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    train = UncheckedCIFAR10(str(tmp_path / "x"), train=True)
    test = UncheckedCIFAR10(str(tmp_path / "x"), train=False)
    assert len(train) == 60 and len(test) == 30 and train.classes == list(CIFAR10_LABEL_NAMES)
    assert np.bincount(train.targets).tolist() == [6] * 10
    with open(tmp_path / "x" / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")  # the CIFAR site's recipe sees byte-string keys
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape[1] == 3072 and b"filenames" in raw
    red = train.data[..., 0].mean(axis=(1, 2))
    assert red[np.array(train.targets) == 0].mean() > red[np.array(train.targets) == 5].mean() + 50


def test_cli_writes_the_demo_archives_with_one_val_file_missing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.prep.synthetic", "imagenet", str(tmp_path), "--classes", "3",
                             "--train-per-class", "2", "--val-per-class", "3"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "ILSVRC2012_val_00000007.JPEG" in result.stdout and "--skip-checksum" in result.stdout
    assert all((tmp_path / name).is_file() for name in (TRAIN_TAR, VAL_TAR, DEVKIT_TAR))
