"""Loaders on real JPEG folders and real CIFAR-10 pickles: sharding, reproducibility, bad data, clear errors."""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import tarfile

import pytest
import torch
from torchvision.transforms import v2

from pipeline.core.config import Config, ConfigError
from pipeline.data.loaders import (DataDirError, EpochSampler, RepeatedAugmentationSampler, ShardSampler, build_train_loader,
                                   build_val_loader, dataset_info, device_batcher, skipped_images)
from pipeline.core.distributed import DistEnv
from pipeline.core.precision import setup_precision
from pipeline.core.validate import validate
from pipeline.core.dataset_kinds import dataset_kind
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.prep.synthetic import make_cifar10_archive, make_image_folder

CPU = torch.device("cpu")
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 10, 5  # 40 train and 20 val images


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), num_classes=CLASSES,
                             train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, size=(40, 36), seed=0)


def small_config(data_dir, *, batch_size: int = 4, workers: int = 0, **data) -> Config:
    cfg = Config()
    cfg.data.data_dir = str(data_dir)
    cfg.data.workers = workers
    cfg.data.train_crop_size, cfg.data.val_resize_size, cfg.data.val_crop_size = 32, 36, 32
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.train.batch_size = batch_size
    return cfg


def epoch_batches(loader, sampler, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sampler.set_epoch(epoch)
    return [(images.clone(), targets.clone()) for images, targets in loader]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 7, 10, 13])
def test_shard_sampler_gives_every_index_exactly_once(size, world_size):
    shards = [list(ShardSampler(size, rank=r, world_size=world_size)) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(ShardSampler(size, rank=r, world_size=world_size)) for r in range(world_size)] == \
        [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_val_loaders_of_all_ranks_cover_the_val_set_exactly(image_dir):
    cfg = small_config(image_dir, batch_size=3)
    whole = [t for _, targets in build_val_loader(cfg, DistEnv(), CPU) for t in targets.tolist()]
    assert len(whole) == CLASSES * VAL_PER_CLASS
    world = 3  # 20 images do not divide by 3 ranks
    counts = [0] * CLASSES
    for rank in range(world):
        loader = build_val_loader(cfg, DistEnv(rank=rank, world_size=world), CPU)
        for images, targets in loader:
            assert images.shape[1:] == (3, 32, 32)
            for t in targets.tolist():
                counts[t] += 1
    assert counts == [VAL_PER_CLASS] * CLASSES


def test_train_ranks_draw_disjoint_samples_every_epoch():
    ranks = [EpochSampler(range(41), num_replicas=2, rank=r, shuffle=True, seed=5, drop_last=True) for r in (0, 1)]
    for epoch in (0, 1):
        keys = []
        for sampler in ranks:
            sampler.set_epoch(epoch)
            keys += list(sampler)
        assert {e for e, _ in keys} == {epoch}
        indices = [i for _, i in keys]
        assert len(indices) == len(set(indices)) == 40  # 41 // 2 per rank, the tail dropped


@pytest.mark.parametrize("world_size, reps", [(1, 3), (2, 2), (4, 3), (3, 4)])
def test_repeated_augmentation_deals_the_copies_of_an_image_to_different_ranks(world_size, reps):
    size = 41

    def epoch(number: int) -> list[list[tuple[int, int, int]]]:
        ranks = [RepeatedAugmentationSampler(range(size), num_replicas=world_size, rank=r, seed=5, reps=reps)
                 for r in range(world_size)]
        for sampler in ranks:
            sampler.set_epoch(number)
        return [list(sampler) for sampler in ranks]

    ranks = epoch(0)
    assert [len(keys) for keys in ranks] == [size // world_size] * world_size  # the epoch length of EpochSampler
    keys = [key for rank in ranks for key in rank]
    assert {e for e, _, _ in keys} == {0} and len(set(keys)) == len(keys)  # no (index, copy) twice
    copies: dict[int, list[tuple[int, int]]] = {}
    for rank, rank_keys in enumerate(ranks):
        for _, index, copy in rank_keys:
            copies.setdefault(index, []).append((rank, copy))
    full = [drawn for drawn in copies.values() if len(drawn) == reps]
    assert len(copies) - len(full) <= 1  # only the image cut at the end of the list has fewer copies
    assert all(sorted(c for _, c in drawn) == list(range(reps)) for drawn in full)
    spread = min(reps, world_size)  # copies in a row go to consecutive ranks
    assert all(len({r for r, _ in drawn}) == spread for drawn in full)
    assert epoch(0) == ranks and epoch(1) != ranks  # reproducible per (seed, epoch), new each epoch


def test_repeated_copies_of_an_image_are_augmented_differently(image_dir):
    cfg = small_config(image_dir, ra_reps=2)
    loader, sampler = build_train_loader(cfg, DistEnv(), CPU, seed=3)
    assert isinstance(sampler, RepeatedAugmentationSampler) and len(loader) == CLASSES * TRAIN_PER_CLASS // 4
    dataset = loader.dataset
    first, second = dataset[(0, 7, 0)], dataset[(0, 7, 1)]
    assert first[1] == second[1] and not torch.equal(first[0], second[0])
    assert torch.equal(first[0], dataset[(0, 7)][0])  # copy 0 is the sample without repetition
    with pytest.raises(ConfigError, match=r"data.ra_reps \(--ra-reps\) = 0: must be at least 1 \(1 is off\)"):
        validate(small_config(image_dir, ra_reps=0), ["train"])


def test_train_epoch_is_reproducible_whatever_the_workers(image_dir):
    cfg = small_config(image_dir, auto_augment="ta_wide", color_jitter=0.4, random_erase=0.5)
    loader, sampler = build_train_loader(cfg, DistEnv(), CPU, seed=3)
    assert sampler is not None and len(loader) == CLASSES * TRAIN_PER_CLASS // 4
    trainer_rng = torch.get_rng_state()
    first = epoch_batches(loader, sampler, 0)
    assert torch.equal(torch.get_rng_state(), trainer_rng)  # augmentation in this process leaves the trainer's RNG
    cfg.data.workers = 2
    loader2, sampler2 = build_train_loader(cfg, DistEnv(), CPU, seed=3)
    assert loader2.persistent_workers and loader2.prefetch_factor == cfg.data.prefetch_factor
    assert not loader2.pin_memory  # CPU only
    for epoch_run in (epoch_batches(loader2, sampler2, 0), epoch_batches(loader2, sampler2, 0)):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, epoch_run))
    other_epoch = epoch_batches(loader, sampler, 1)
    assert not torch.equal(torch.cat([t for _, t in first]), torch.cat([t for _, t in other_epoch]))
    images = torch.cat([i for i, _ in first])
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8  # the loader contract: uint8 NCHW


def test_random_erasing_fills_a_box_with_the_colour_that_normalizes_to_zero(image_dir):
    cfg = small_config(image_dir, random_erase=1.0)
    loader, sampler = build_train_loader(cfg, DistEnv(), CPU, seed=0)
    images, targets = epoch_batches(loader, sampler, 0)[0]
    normalized, _ = device_batcher(cfg, setup_precision(CPU, "none", False))(images, targets)
    near_zero = normalized.abs().amax(dim=1) < 0.02  # pixels of the mean colour (rounded to whole 0-255 values)
    assert all(n > 0.02 * 32 * 32 for n in near_zero.sum(dim=(1, 2)).tolist())  # a box in every image


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_batcher_normalizes_like_torchvision_per_sample(image_dir, channels_last):
    cfg = small_config(image_dir)
    images, targets = next(iter(build_val_loader(cfg, DistEnv(), CPU)))
    batcher = device_batcher(cfg, setup_precision(CPU, "none", channels_last))
    model_input, labels = batcher(images, targets)
    per_sample = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(v2.ToDtype(torch.float32, scale=True)(images))
    assert model_input.dtype == torch.float32 and torch.equal(model_input, per_sample)  # bit for bit
    assert model_input.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(labels, targets)


def test_mixup_cutmix_on_the_device_batch_give_soft_targets_seeded_by_the_batch_key(image_dir):
    cfg = small_config(image_dir, mixup_alpha=0.2, cutmix_alpha=1.0)
    loader, sampler = build_train_loader(cfg, DistEnv(), CPU, seed=0)
    images, labels = epoch_batches(loader, sampler, 0)[0]
    assert labels.dtype == torch.int64  # the loader yields labels; the device batch is mixed
    precision = setup_precision(CPU, "none", False)
    mixer = device_batcher(cfg, precision, mix_classes=CLASSES, seed=0, rank=0)
    trainer_rng = torch.get_rng_state()
    mixed = [mixer(images, labels, batch_key=(0, step)) for step in (0, 0, 1)]
    assert torch.equal(torch.get_rng_state(), trainer_rng)
    _, targets = mixed[0]
    assert targets.dtype == torch.float32 and targets.shape == (4, CLASSES)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert torch.equal(mixed[0][0], mixed[1][0]) and torch.equal(mixed[0][1], mixed[1][1])  # same key, same mix
    assert not torch.equal(mixed[0][1], mixed[2][1])
    other_rank = device_batcher(cfg, precision, mix_classes=CLASSES, seed=0, rank=1)
    assert not torch.equal(other_rank(images, labels, batch_key=(0, 0))[1], targets)
    assert device_batcher(cfg, precision)(images, labels)[1].dtype == torch.int64  # eval: no mix


def test_dataset_info_reads_classes_file(image_dir):
    info = dataset_info(small_config(image_dir))
    assert info.num_classes == CLASSES and len(info.wnids) == CLASSES
    assert info.wnids == sorted(info.wnids) and info.names[0] == "synthetic class 0"
    assert (info.train_size, info.val_size) == (CLASSES * TRAIN_PER_CLASS, CLASSES * VAL_PER_CLASS)


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_unreadable_val_image_is_skipped_counted_and_named(tmp_path, caplog, damage):
    root = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=3, size=(40, 36))
    bad = sorted((root / "val").rglob("*.JPEG"))[1]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"this is no JPEG")
    loader = build_val_loader(small_config(root, batch_size=2), DistEnv(), CPU)
    with caplog.at_level(logging.WARNING):
        total = sum(len(targets) for _, targets in loader)
    assert total == 2 * 3 - 1
    assert skipped_images(loader) == 1
    assert str(bad) in caplog.text


def test_unreadable_train_images_keep_batches_full_and_are_counted_across_workers(tmp_path):
    root = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=8, val_per_class=1, size=(40, 36))
    for bad in sorted((root / "train").rglob("*.JPEG"))[0:15:5]:  # not neighbours: each failed load is one file
        bad.write_bytes(b"\xff\xd8\xff garbage")
    loader, sampler = build_train_loader(small_config(root, batch_size=4, workers=2), DistEnv(), CPU, seed=0)
    batches = epoch_batches(loader, sampler, 0)
    assert [len(t) for _, t in batches] == [4] * 4
    assert skipped_images(loader) == 3  # each bad file drawn once this epoch, counted in the worker processes


def test_batch_larger_than_the_share_of_one_process_is_a_clear_error(image_dir):
    cfg = small_config(image_dir, batch_size=21)
    with pytest.raises(ConfigError, match="batch size 21 per process is larger than the 20 training images"):
        build_train_loader(cfg, DistEnv(rank=0, world_size=2), CPU, seed=0)


def make_bad_dir(tmp_path, kind: str):
    if kind == "missing":
        return tmp_path / "nowhere"
    root = tmp_path / "data"
    if kind == "no_splits":
        root.mkdir()
    elif kind == "no_images":
        for split in ("train", "val"):
            (root / split / "n01440764").mkdir(parents=True)
    elif kind == "bad_classes_file":
        root = make_image_folder(root, num_classes=2, train_per_class=1, val_per_class=1, size=(32, 32))
        (root / "classes.tsv").write_text("wnid,words\nn1,a\n")
    return root


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("no_splits", "has no train/ and val/ folders"),
    ("no_images", "no images with extensions"),
    ("bad_classes_file", "classes.tsv is malformed"),
])
def test_malformed_data_dir_says_what_is_expected(tmp_path, kind, message):
    cfg = small_config(make_bad_dir(tmp_path, kind))
    with pytest.raises(DataDirError, match=message) as err:
        dataset_info(cfg)
    assert "--stage prep" in str(err.value)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar")
    archive = make_cifar10_archive(tmp / "archives", per_class=6, test_per_class=3, seed=1)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "data", filter="data")
    return tmp / "data"


def test_cifar10_loaders_read_the_pickled_batches(cifar_dir):
    cfg = small_config(cifar_dir, batch_size=8, dataset="cifar10")
    info = dataset_info(cfg)
    assert info.num_classes == 10 and info.names[:2] == ["airplane", "automobile"]
    assert (info.train_size, info.val_size) == (60, 30)
    loader, sampler = build_train_loader(cfg, DistEnv(), CPU, seed=0)
    batches = epoch_batches(loader, sampler, 0)
    assert len(batches) == 60 // 8 and batches[0][0].shape == (8, 3, 32, 32)

    val = [(images, targets) for images, targets in build_val_loader(cfg, DistEnv(), CPU)]
    with open(cifar_dir / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    first = torch.tensor(raw["data"][0]).reshape(3, 32, 32)
    assert torch.equal(val[0][0][0], first)  # uint8 as stored
    normalized, _ = device_batcher(cfg, setup_precision(CPU, "none", False))(*val[0])
    cifar = dataset_kind("cifar10")
    expected = (first / 255 - torch.tensor(cifar.mean)[:, None, None]) / torch.tensor(cifar.std)[:, None, None]
    assert torch.allclose(normalized[0], expected, atol=1e-5)
    assert torch.cat([t for _, t in val]).tolist() == list(raw["labels"])


def test_cifar10_without_batches_is_a_clear_error(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataDirError, match="cannot read CIFAR-10 batches.*data_batch_1"):
        dataset_info(small_config(tmp_path / "data", dataset="cifar10"))


class _RunsCode:
    """A pickle payload that makes a folder when unpickled by a plain pickle.load."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cifar10_batches_with_foreign_pickle_globals_are_refused_without_running_them(cifar_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cifar_dir, data)
    marker = tmp_path / "code-ran"
    (data / "cifar-10-batches-py" / "data_batch_2").write_bytes(
        pickle.dumps({"data": _RunsCode(str(marker)), "labels": []}))
    with pytest.raises(DataDirError, match="data_batch_2 .*not a readable batch"):
        dataset_info(small_config(data, dataset="cifar10"))
    assert not marker.exists()
