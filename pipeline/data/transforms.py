"""Image transforms of the recipes, from torchvision.transforms.v2, and MixUp/CutMix for batches.

The per-image transforms run in the loader workers and end in a uint8 CHW tensor: the float conversion
and the normalization by ``normalization(dataset)`` happen once per batch on the device
(pipeline.data.loaders.DeviceBatcher), which makes 4x fewer bytes to pin and copy and takes that work off the
workers. ImageNet train: RandomResizedCrop(train_crop_size, scale 0.08-1, ratio 3/4-4/3, bilinear,
antialias), horizontal flip, optional ColorJitter, optional auto-augment policy, optional RandomErasing.
ImageNet eval: Resize(val_resize_size) of the shorter side, CenterCrop(val_crop_size). CIFAR-10 train:
RandomCrop(train_crop_size, padding 4), flip, the same optional augmentations; CIFAR-10 eval: the 32x32
image as it is (the val sizes do not apply).

RandomErasing stays per image (torchvision's erases one box per call, so on a batch every image would get
the same box) and works on the uint8 image: the box is filled with the dataset's mean colour in 0-255,
which the normalization maps to ~0, the value torchvision's reference erases with after normalizing.
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

from pipeline.core.config import DataConfig
from pipeline.core.dataset_kinds import dataset_kind

IMAGENET = dataset_kind("imagenet")
IMAGENET_MEAN, IMAGENET_STD = IMAGENET.mean, IMAGENET.std
SMALL_IMAGE_PADDING = 4  # pixels of zero padding before the random crop of a small fixed-size image (CIFAR-10)

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _auto_augment(policy: str, dataset: str) -> list[v2.Transform]:
    interpolation = v2.InterpolationMode.BILINEAR
    if policy == "ta_wide":
        return [v2.TrivialAugmentWide(interpolation=interpolation)]
    if policy == "randaugment":
        return [v2.RandAugment(interpolation=interpolation)]
    if policy == "autoaugment":
        return [v2.AutoAugment(v2.AutoAugmentPolicy(dataset_kind(dataset).autoaugment_policy),
                               interpolation=interpolation)]
    return []


def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of images in [0, 1] for ``dataset``."""
    kind = dataset_kind(dataset)
    return kind.mean, kind.std


def mean_colour_uint8(dataset: str) -> list[int]:
    """The dataset's mean colour in 0-255: what normalizes to ~0."""
    return [round(255 * m) for m in normalization(dataset)[0]]


def train_transform(cfg: DataConfig) -> v2.Compose:
    """Per-image training augmentation for cfg.dataset: PIL image in, uint8 CHW tensor out."""
    if dataset_kind(cfg.dataset).image_side:
        crop: list[v2.Transform] = [v2.RandomCrop(cfg.train_crop_size, padding=SMALL_IMAGE_PADDING)]
    else:
        crop = [v2.RandomResizedCrop(cfg.train_crop_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                     interpolation=v2.InterpolationMode.BILINEAR, antialias=True)]
    steps = crop + [v2.RandomHorizontalFlip()] + _photometric(cfg) + [v2.PILToTensor()] + _erasing(cfg)
    return v2.Compose(steps + [v2.ToPureTensor()])


def _photometric(cfg: DataConfig) -> list[v2.Transform]:
    """The optional colour and auto-augment steps, after crop and flip."""
    jitter = [v2.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter, saturation=cfg.color_jitter)]
    return (jitter if cfg.color_jitter > 0 else []) + _auto_augment(cfg.auto_augment, cfg.dataset)


def _erasing(cfg: DataConfig) -> list[v2.Transform]:
    return [v2.RandomErasing(p=cfg.random_erase, value=mean_colour_uint8(cfg.dataset))] if cfg.random_erase > 0 else []


def photometric_transform(cfg: DataConfig) -> v2.Compose | None:
    """The colour and auto-augment steps after crop and flip, on a uint8 CHW tensor (the device path runs them on
    the device, image by image; its RandomErasing is batched there); None when the recipe has none."""
    steps = _photometric(cfg)
    return v2.Compose(steps) if steps else None


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """Deterministic eval preprocessing for cfg.dataset: PIL image in, uint8 CHW tensor out."""
    resize = [] if dataset_kind(cfg.dataset).image_side else [v2.Resize(cfg.val_resize_size, interpolation=v2.InterpolationMode.BILINEAR,
                                         antialias=True), v2.CenterCrop(cfg.val_crop_size)]
    return v2.Compose(resize + [v2.PILToTensor(), v2.ToPureTensor()])


def batch_mix(cfg: DataConfig, num_classes: int) -> BatchTransform | None:
    """MixUp and/or CutMix over a float batch (one of them, chosen per batch, when both are on); targets become
    soft. Their random draws come from torch's CPU generator, also for a batch on the device."""
    mixes: list[v2.Transform] = []
    if cfg.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
