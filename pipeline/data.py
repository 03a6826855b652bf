"""Train and val loaders over a prepared data dir, single process or one shard per DDP rank.

    info = dataset_info(cfg)                                   # num_classes, class names, split sizes
    train_loader, sampler = build_train_loader(cfg, env, device, seed=cfg.train.seed)
    val_loader = build_val_loader(cfg, env, device)
    for epoch in ...:
        sampler.set_epoch(epoch)                               # new order and new augmentation per epoch
        for images, targets in train_loader: ...               # CPU tensors; the trainer moves them

Train: every rank draws len(train) // world_size images per epoch from a DistributedSampler (shuffled with
the run seed, tail dropped), also in a single process, so the order and the augmentation of an epoch
depend only on (seed, epoch): a resumed run sees the same images as an uninterrupted one. Batches are
full (drop_last); MixUp/CutMix, when on, mix them in the collate and the targets become soft labels
(float, batch x num_classes); otherwise targets are int64 labels.

Val: ShardSampler gives rank r the indices r, r + W, r + 2W, ...: every image exactly once over all
ranks, no padding, no dropped tail. A batch can be short (the last one, or one with unreadable images
dropped); ``skipped_images(loader)`` says how many images could not be read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from pipeline.config import Config, ConfigError
from pipeline.datasets import (DataDirError, SampleSet, cifar_split, imagenet_classes, imagenet_split,
                               sample_seed, seeded_cpu_rng)
from pipeline.distributed import DistEnv
from pipeline.transforms import BatchTransform, batch_mix, eval_transform, train_transform

__all__ = ["DataDirError", "DatasetInfo", "ShardSampler", "EpochSampler", "dataset_info", "build_train_loader",
           "build_val_loader", "skipped_images"]


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    wnids: list[str]      # folder names in label order (CIFAR-10: the label names)
    names: list[str]      # human-readable class names in label order
    train_size: int       # images in the train split
    val_size: int         # images in the val split


def _splits(cfg: Config) -> tuple[Dataset, Dataset, list[str], list[str]]:
    """(train source, val source, wnids, names) of the data dir, with DataDirError when it is not usable."""
    data_dir = Path(cfg.data.data_dir)
    if not data_dir.is_dir():
        raise DataDirError(f"data dir {data_dir} does not exist; run `python launch.py --stage prep "
                           f"--archive-dir ARCHIVES --data-dir {data_dir}` first, or pass --data-dir")
    if cfg.data.dataset == "cifar10":
        train, val = cifar_split(data_dir, True), cifar_split(data_dir, False)
        return train, val, list(train.classes), list(train.classes)
    classes = imagenet_classes(data_dir)
    train, val = imagenet_split(data_dir, "train", classes), imagenet_split(data_dir, "val", classes)
    return train, val, list(classes.wnids), list(classes.names)


def dataset_info(cfg: Config) -> DatasetInfo:
    train, val, wnids, names = _splits(cfg)
    return DatasetInfo(len(wnids), wnids, names, len(train), len(val))


class EpochSampler(DistributedSampler):
    """A DistributedSampler whose items are (epoch, index), so each sample's augmentation is seeded per epoch."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class ShardSampler(Sampler[int]):
    """Rank r of W gets indices r, r + W, r + 2W, ...: every index exactly once over the ranks."""

    def __init__(self, size: int, *, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class Collate:
    """Stack (image, label, seed) samples into (images, targets), dropping failed ones; mix when asked."""

    def __init__(self, mix: BatchTransform | None = None, empty_shape: tuple[int, ...] = (0,)):
        self.mix, self.empty_shape = mix, empty_shape

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [s for s in samples if s is not None]
        if not samples:
            return torch.empty(self.empty_shape), torch.empty(0, dtype=torch.int64)
        images, targets = default_collate([(image, label) for image, label, _ in samples])
        if self.mix is None:
            return images, targets
        with seeded_cpu_rng(sample_seed(samples[0][2], len(samples), 0)):  # seeded by the batch's first sample
            return self.mix(images, targets)


def _loader_options(cfg: Config, device: torch.device, seed: int) -> dict:
    workers = cfg.data.workers
    options = dict(batch_size=cfg.train.batch_size, num_workers=workers, pin_memory=device.type != "cpu",
                   generator=torch.Generator().manual_seed(seed))
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=cfg.data.prefetch_factor)
    return options


def build_train_loader(cfg: Config, env: DistEnv, device: torch.device, *,
                       seed: int) -> tuple[DataLoader, DistributedSampler | None]:
    """The shuffled, augmented train loader and its sampler (call ``sampler.set_epoch(epoch)`` every epoch)."""
    source, _, wnids, _ = _splits(cfg)
    per_rank = len(source) // env.world_size
    if cfg.train.batch_size > per_rank:
        raise ConfigError(f"batch size {cfg.train.batch_size} per process is larger than the {per_rank} training "
                          f"images each of the {env.world_size} processes gets ({len(source)} in {cfg.data.data_dir}); "
                          "lower --batch-size or use fewer processes")
    dataset = SampleSet(source, train_transform(cfg.data), seed=seed, replace_failed=True)
    sampler = EpochSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                           drop_last=True)
    loader = DataLoader(dataset, sampler=sampler, drop_last=True, collate_fn=Collate(batch_mix(cfg.data, len(wnids))),
                        **_loader_options(cfg, device, seed))
    return loader, sampler


def build_val_loader(cfg: Config, env: DistEnv, device: torch.device) -> DataLoader:
    """This rank's exact shard of the val set, in order, unaugmented."""
    _, source, _, _ = _splits(cfg)
    dataset = SampleSet(source, eval_transform(cfg.data), seed=cfg.train.seed, replace_failed=False)
    side = 32 if cfg.data.dataset == "cifar10" else cfg.data.val_crop_size
    sampler = ShardSampler(len(dataset), rank=env.rank, world_size=env.world_size)
    return DataLoader(dataset, sampler=sampler, drop_last=False, collate_fn=Collate(empty_shape=(0, 3, side, side)),
                      **_loader_options(cfg, device, cfg.train.seed))


def skipped_images(loader: DataLoader) -> int:
    """Unreadable images met so far by this loader's dataset, over all its worker processes."""
    return loader.dataset.skipped

