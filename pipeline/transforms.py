"""Image transforms of the recipes, from torchvision.transforms.v2, and MixUp/CutMix for batches.

ImageNet train: RandomResizedCrop(train_crop_size, scale 0.08-1, ratio 3/4-4/3, bilinear, antialias),
horizontal flip, optional ColorJitter, optional auto-augment policy, float [0, 1], normalize, optional
RandomErasing. ImageNet eval: Resize(val_resize_size) of the shorter side, CenterCrop(val_crop_size).
CIFAR-10 train: RandomCrop(train_crop_size, padding 4), flip, the same optional augmentations, CIFAR
mean/std; CIFAR-10 eval: the 32x32 image as it is, normalized (the val sizes do not apply).
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

from pipeline.config import DataConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # per-channel over the 50k train set
CIFAR_PADDING = 4  # pixels of zero padding before the random 32x32 crop

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _auto_augment(policy: str, cifar: bool) -> list[v2.Transform]:
    interpolation = v2.InterpolationMode.BILINEAR
    if policy == "ta_wide":
        return [v2.TrivialAugmentWide(interpolation=interpolation)]
    if policy == "randaugment":
        return [v2.RandAugment(interpolation=interpolation)]
    if policy == "autoaugment":
        table = v2.AutoAugmentPolicy.CIFAR10 if cifar else v2.AutoAugmentPolicy.IMAGENET
        return [v2.AutoAugment(table, interpolation=interpolation)]
    return []


def _to_normalized_tensor(cifar: bool) -> list[v2.Transform]:
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if cifar else (IMAGENET_MEAN, IMAGENET_STD)
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def train_transform(cfg: DataConfig) -> v2.Compose:
    """Per-image training augmentation for cfg.dataset."""
    cifar = cfg.dataset == "cifar10"
    if cifar:
        crop: list[v2.Transform] = [v2.RandomCrop(cfg.train_crop_size, padding=CIFAR_PADDING)]
    else:
        crop = [v2.RandomResizedCrop(cfg.train_crop_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                     interpolation=v2.InterpolationMode.BILINEAR, antialias=True)]
    steps = crop + [v2.RandomHorizontalFlip()]
    if cfg.color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                                    saturation=cfg.color_jitter))
    steps += _auto_augment(cfg.auto_augment, cifar) + _to_normalized_tensor(cifar)
    if cfg.random_erase > 0:
        steps.append(v2.RandomErasing(p=cfg.random_erase))
    return v2.Compose(steps + [v2.ToPureTensor()])


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """Deterministic eval preprocessing for cfg.dataset."""
    cifar = cfg.dataset == "cifar10"
    resize = [] if cifar else [v2.Resize(cfg.val_resize_size, interpolation=v2.InterpolationMode.BILINEAR,
                                         antialias=True), v2.CenterCrop(cfg.val_crop_size)]
    return v2.Compose(resize + _to_normalized_tensor(cifar) + [v2.ToPureTensor()])


def batch_mix(cfg: DataConfig, num_classes: int) -> BatchTransform | None:
    """MixUp and/or CutMix over a batch (one of them, chosen per batch, when both are on); targets become soft."""
    mixes: list[v2.Transform] = []
    if cfg.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
