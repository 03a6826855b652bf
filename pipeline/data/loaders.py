"""Train and val loaders over a prepared data dir, single process or one shard per DDP rank.

    info = dataset_info(cfg)                                   # num_classes, class names, split sizes
    train_loader, sampler = build_train_loader(cfg, env, device, seed=cfg.train.seed)
    val_loader = build_val_loader(cfg, env, device)
    to_device = device_batcher(cfg, precision, mix_classes=info.num_classes, seed=cfg.train.seed, rank=env.rank)
    for epoch in ...:
        sampler.set_epoch(epoch)                               # new order and new augmentation per epoch
        for images, targets in DeviceInputs(train_loader, to_device, device, ((epoch, i) for i in count())):
            ...                                                # the model's input, the next one prepared meanwhile

Loader contract: both loaders yield ``(images, targets)`` on the CPU (pinned when the device is not the
CPU): images uint8 N x 3 x H x W as decoded and augmented, targets int64 labels. ``DeviceBatcher`` is
the one place a batch becomes the model's input: copied to the device (non-blocking), channels_last when
asked, converted to float32 and normalized there (the same operations as torchvision's ToDtype(scale=True)
and Normalize, so the same bits as normalizing per sample in the workers), then mixed by
MixUp/CutMix when on (train only; targets become soft labels, float batch x num_classes). The model input
stays float32; autocast casts it where that is safe. Keeping the workers on uint8 moves 4x fewer bytes
through pinning and the host-to-device copy and takes the per-pixel float work off the workers.

With ``decode = "device"`` (ImageNet) the workers hand on file bytes and the random choices instead, and the
DeviceBatcher's decoder decodes and augments the batch on the device first (pipeline.data.device_decode): the same
order and crop boxes, pixels within one level of the PIL path. ``DeviceInputs`` (pipeline.data.prefetch) calls
the DeviceBatcher one batch ahead, on a stream of its own on accelerators, so the next input is made while the
current step runs.

Train: every rank draws len(train) // world_size images per epoch from a DistributedSampler (shuffled with
the run seed, tail dropped), also in a single process, so the order and the augmentation of an epoch
depend only on (seed, epoch): a resumed run sees the same images as an uninterrupted one. Batches are
full (drop_last). With ``ra_reps`` > 1 a RepeatedAugmentationSampler takes its place (same epoch
length). The mix of a batch is seeded by (seed, epoch, batch index, rank), so it is exact on resume too.

Val: ShardSampler gives rank r the indices r, r + W, r + 2W, ...: every image exactly once over all
ranks, no padding, no dropped tail. A batch can be short (the last one, or one with unreadable images
dropped); ``skipped_images(loader)`` says how many images could not be read.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from pipeline.core.config import Config, ConfigError
from pipeline.core.dataset_kinds import dataset_kind
from pipeline.data.datasets import DataDirError, SampleSet, cifar_split, sample_seed, seeded_cpu_rng
from pipeline.data.sources import layout_classes, open_split
from pipeline.core.distributed import DistEnv
from pipeline.core.precision import Precision
from pipeline.core.signals import STOP_SIGNALS
from pipeline.data.device_decode import DeviceDecoder, DrawCrop, EncodedCollate, EncodedFiles, NoDraw
from pipeline.data.transforms import (BatchTransform, batch_mix, eval_transform, mean_colour_uint8, normalization,
                                      photometric_transform, train_transform)

__all__ = ["DataDirError", "DatasetInfo", "ShardSampler", "EpochSampler", "RepeatedAugmentationSampler",
           "DeviceBatcher", "dataset_info",
           "build_train_loader", "build_val_loader", "cpu_decoded_images", "device_batcher", "skipped_images"]


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    wnids: list[str]      # folder names in label order (CIFAR-10: the label names)
    names: list[str]      # human-readable class names in label order
    train_size: int       # images in the train split
    val_size: int         # images in the val split


def _imagenet_splits(data_dir: Path, layout: str) -> tuple[Dataset, Dataset, list[str], list[str]]:
    classes = layout_classes(data_dir, layout)
    train, val = open_split(layout, data_dir, "train", classes), open_split(layout, data_dir, "val", classes)
    return train, val, list(classes.wnids), list(classes.names)


def _cifar_splits(data_dir: Path, layout: str) -> tuple[Dataset, Dataset, list[str], list[str]]:
    train, val = cifar_split(data_dir, True), cifar_split(data_dir, False)
    return train, val, list(train.classes), list(train.classes)


READERS = {"imagenet": _imagenet_splits, "cifar10": _cifar_splits}  # dataset: its data dir's reader


def _splits(cfg: Config) -> tuple[Dataset, Dataset, list[str], list[str]]:
    """(train source, val source, wnids, names) of the data dir, with DataDirError when it is not usable."""
    data_dir = Path(cfg.data.data_dir)
    if not data_dir.is_dir():
        raise DataDirError(f"data dir {data_dir} does not exist; run `python launch.py --stage prep "
                           f"--archive-dir ARCHIVES --data-dir {data_dir}` first, or pass --data-dir")
    return READERS[cfg.data.dataset](data_dir, cfg.data.layout)


def dataset_info(cfg: Config) -> DatasetInfo:
    train, val, wnids, names = _splits(cfg)
    return DatasetInfo(len(wnids), wnids, names, len(train), len(val))


class EpochSampler(DistributedSampler):
    """A DistributedSampler whose items are (epoch, index), so each sample's augmentation is seeded per epoch."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class RepeatedAugmentationSampler(EpochSampler):
    """Repeated augmentation (Hoffer et al. 2020, torchvision's RASampler): each epoch shuffles the images, repeats
    each ``reps`` times in a row and deals the list round-robin to the ranks, so the copies of an image go to
    different processes; items are (epoch, index, copy), so each copy is augmented anew. A rank draws
    len // world_size items per epoch, as without it: an epoch takes as many steps and sees about 1/reps of
    the images."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, reps: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.reps = reps

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.epoch
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        slots = range(self.rank, self.num_samples * self.num_replicas, self.num_replicas)  # of the repeated list
        return ((epoch, order[slot // self.reps], slot % self.reps) for slot in slots)


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
    """Stack (uint8 image, label, seed) samples into (images, targets), dropping failed ones."""

    def __init__(self, empty_shape: tuple[int, ...] = (0,)):
        self.empty_shape = empty_shape

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [s for s in samples if s is not None]
        if not samples:
            return torch.empty(self.empty_shape, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        return default_collate([(image, label) for image, label, _ in samples])


class DeviceBatcher:
    """A loader's batch as the model's input: on the device, float32, normalized, mixed when asked. With a
    ``decoder`` (``--decode device``) the batch is encoded files, decoded and augmented on the device first."""

    def __init__(self, device: torch.device, mean: tuple[float, ...], std: tuple[float, ...], *,
                 channels_last: bool = False, mix: BatchTransform | None = None, mix_seed: int = 0,
                 decoder: DeviceDecoder | None = None):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)  # of [0, 1] images, per channel
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.device, self.channels_last, self.mix, self.mix_seed = device, channels_last, mix, mix_seed
        self.decoder = decoder

    @property
    def skipped(self) -> int:
        """Images of the loader's batches that no decoder could read here (the device path's; the workers'
        are in ``skipped_images(loader)``)."""
        return self.decoder.skipped if self.decoder is not None else 0

    def __call__(self, images: Any, targets: torch.Tensor, *,
                 batch_key: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_key`` (epoch, batch index) seeds the mix, so a resumed epoch mixes its batches alike."""
        if self.decoder is not None:
            images, targets = self.decoder(images, targets, self.device)
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.channels_last:  # on uint8, a quarter of the bytes; float() and the arithmetic keep the layout
            images = images.contiguous(memory_format=torch.channels_last)
        # torchvision's ToDtype(scale=True) + Normalize, op for op: the same bits as per-sample normalization
        images = images.float().mul_(1.0 / 255).sub_(self.mean).div_(self.std)
        if self.mix is None:
            return images, targets
        with seeded_cpu_rng(sample_seed(self.mix_seed, *batch_key)):  # MixUp/CutMix draw on the CPU generator
            return self.mix(images, targets)


def device_batcher(cfg: Config, precision: Precision, *, mix_classes: int = 0, seed: int = 0,
                   rank: int = 0) -> DeviceBatcher:
    """The DeviceBatcher of cfg's dataset; with ``mix_classes`` the train one (MixUp/CutMix when configured),
    its mix seeded per rank so the ranks mix differently."""
    mix = batch_mix(cfg.data, mix_classes) if mix_classes else None
    decoder = None
    if cfg.data.decode == "device":
        train = bool(mix_classes)
        decoder = DeviceDecoder(train=train, crop_size=cfg.data.train_crop_size if train else cfg.data.val_crop_size,
                                resize_size=cfg.data.val_resize_size,
                                photometric=photometric_transform(cfg.data) if train else None,
                                erase_p=cfg.data.random_erase if train else 0.0,
                                erase_value=tuple(mean_colour_uint8(cfg.data.dataset)))
    return DeviceBatcher(precision.device, *normalization(cfg.data.dataset), channels_last=precision.channels_last,
                         mix=mix, mix_seed=sample_seed(seed, rank, -1), decoder=decoder)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore the stop signals: a scheduler's SIGTERM to the process group (preemption, scancel)
    reaches them too, and a worker dying of it would fail the run; the trainer gets it as well and decides
    (pipeline.train.preemption). The DataLoader still ends its workers by its own means, and at exit
    ``stop_workers_at_exit`` kills those still alive (multiprocessing's own exit handler would send them the
    SIGTERM they ignore, then wait forever)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _kill_loader_workers() -> None:
    """Kill this process's live daemonic children, the DataLoader workers among them, and reap them: they would get
    SIGTERM at exit anyway (multiprocessing ends daemonic children so), which loader workers ignore."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each killed worker as a crash
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


@functools.cache
def stop_workers_at_exit() -> None:
    """Once per process: at interpreter exit, before multiprocessing's handler (atexit runs last-registered
    first), kill loader workers still alive, so a script or test that raises inside a loop ends instead of
    hanging in multiprocessing's join."""
    atexit.register(_kill_loader_workers)


def _loader_options(cfg: Config, device: torch.device, seed: int) -> dict:
    workers = cfg.data.workers
    # the device path's batches are file bytes for the decoder to read on the host: nothing to pin
    pin = device.type != "cpu" and cfg.data.decode == "cpu"
    options = dict(batch_size=cfg.train.batch_size, num_workers=workers, pin_memory=pin,
                   generator=torch.Generator().manual_seed(seed))
    if workers > 0:
        stop_workers_at_exit()
        options.update(persistent_workers=True, prefetch_factor=cfg.data.prefetch_factor,
                       worker_init_fn=ignore_stop_signals)
    return options


def build_train_loader(cfg: Config, env: DistEnv, device: torch.device, *,
                       seed: int) -> tuple[DataLoader, DistributedSampler | None]:
    """The shuffled, augmented train loader and its sampler (call ``sampler.set_epoch(epoch)`` every epoch)."""
    source, _, _, _ = _splits(cfg)
    per_rank = len(source) // env.world_size
    if cfg.train.batch_size > per_rank:
        raise ConfigError(f"batch size {cfg.train.batch_size} per process is larger than the {per_rank} training "
                          f"images each of the {env.world_size} processes gets ({len(source)} in {cfg.data.data_dir}); "
                          "lower --batch-size or use fewer processes")
    if cfg.data.decode == "device":
        dataset = SampleSet(EncodedFiles(source), DrawCrop(), seed=seed, replace_failed=True)
        collate: Collate | EncodedCollate = EncodedCollate()
    else:
        dataset, collate = SampleSet(source, train_transform(cfg.data), seed=seed, replace_failed=True), Collate()
    sampler: EpochSampler
    if cfg.data.ra_reps > 1:
        sampler = RepeatedAugmentationSampler(dataset, num_replicas=env.world_size, rank=env.rank, seed=seed,
                                              reps=cfg.data.ra_reps)
    else:
        sampler = EpochSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                               drop_last=True)
    loader = DataLoader(dataset, sampler=sampler, drop_last=True, collate_fn=collate,
                        **_loader_options(cfg, device, seed))
    return loader, sampler


def build_val_loader(cfg: Config, env: DistEnv, device: torch.device) -> DataLoader:
    """This rank's exact shard of the val set, in order, unaugmented."""
    _, source, _, _ = _splits(cfg)
    side = dataset_kind(cfg.data.dataset).image_side or cfg.data.val_crop_size
    if cfg.data.decode == "device":
        dataset = SampleSet(EncodedFiles(source), NoDraw(), seed=cfg.train.seed,
                            replace_failed=False)
        collate: Collate | EncodedCollate = EncodedCollate()
    else:
        dataset = SampleSet(source, eval_transform(cfg.data), seed=cfg.train.seed, replace_failed=False)
        collate = Collate(empty_shape=(0, 3, side, side))
    sampler = ShardSampler(len(dataset), rank=env.rank, world_size=env.world_size)
    return DataLoader(dataset, sampler=sampler, drop_last=False, collate_fn=collate,
                      **_loader_options(cfg, device, cfg.train.seed))


def skipped_images(loader: DataLoader) -> int:
    """Unreadable images met so far by this loader's dataset, over all its worker processes."""
    return loader.dataset.skipped


def cpu_decoded_images(loader: DataLoader, to_device: DeviceBatcher) -> int:
    """With ``--decode device``: images PIL decoded so far because nvJPEG could not (CMYK, grayscale, not a JPEG,
    cut short), in the workers and in this process; 0 on the CPU path."""
    in_workers = getattr(loader.dataset.source, "cpu_decoded", 0)
    return in_workers + (to_device.decoder.cpu_decoded if to_device.decoder is not None else 0)

