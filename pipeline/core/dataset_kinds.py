"""What differs between the datasets the pipeline trains on, in one table, so no stage tests a dataset's name.

Torch-free: the login node's validation reads it. A new dataset is an entry here, its prep (pipeline/prep) and its
reader (pipeline/data/loaders.py's READERS).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetKind:
    name: str
    mean: tuple[float, float, float]  # per channel, of images in [0, 1]
    std: tuple[float, float, float]
    classes: int  # the official class count: a model is test-built for it before anything is submitted
    jpeg_files: bool  # one JPEG file per image: the device decode path (--decode device) applies
    image_side: int | None  # every image is this square side: padded random crops, eval on the image as it is
    autoaugment_policy: str  # torchvision's AutoAugmentPolicy tuned for it


DATASETS = {
    "imagenet": DatasetKind("imagenet", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), classes=1000,
                            jpeg_files=True, image_side=None, autoaugment_policy="imagenet"),
    # CIFAR-10's mean and std per channel over its 50k train images
    "cifar10": DatasetKind("cifar10", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), classes=10,
                           jpeg_files=False, image_side=32, autoaugment_policy="cifar10"),
}


def dataset_kind(name: str) -> DatasetKind:
    return DATASETS[name]
