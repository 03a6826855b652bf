"""Networks that torchvision does not ship under these names, built from torchvision's own classes.

Stride placement in the ResNet-50 bottleneck, stated precisely because the names confuse:

- ResNet v1 (He et al. 2015, the original Caffe model): in the first bottleneck of stages 2-4 the
  stride 2 sits on the first 1x1 conv, so that 1x1 conv skips three quarters of its input.
  Here: ``resnet50_v1``.
- ResNet-B, also called "v1b" (GluonCV, Bag of Tricks, He et al. 2019) and "v1.5" (NVIDIA): the
  stride 2 moves to the 3x3 conv, which sees every input pixel. torchvision's ``resnet50`` IS this
  layout: its ``Bottleneck`` puts ``stride`` on ``conv2`` (the 3x3) and says so in a comment.

So ``resnet50_v1b`` has exactly the layers, strides and state-dict keys of torchvision's ``resnet50``
(torchvision weights load into it unchanged). What it adds is GluonCV's v1b recipe init
(``--last-gamma``, "zero gamma" in Bag of Tricks): the last BatchNorm of every residual branch
starts at gamma = 0, so each block starts as the identity, which helps large-batch training.
"""
from __future__ import annotations

import torch.nn as nn
from torchvision.models import DenseNet, ResNet
from torchvision.models.resnet import Bottleneck

RESNET50_BLOCKS = (3, 4, 6, 3)  # bottlenecks per stage


def resnet50_v1b(*, num_classes: int) -> nn.Module:
    """ResNet-50 B (stride on the 3x3 conv, as torchvision's resnet50) with zero-initialised last BN gamma."""
    return ResNet(Bottleneck, list(RESNET50_BLOCKS), num_classes=num_classes, zero_init_residual=True)


def resnet50_v1(*, num_classes: int) -> nn.Module:
    """The original ResNet-50 (v1): the downsampling stride on the first 1x1 conv of stages 2-4."""
    model = ResNet(Bottleneck, list(RESNET50_BLOCKS), num_classes=num_classes)
    for stage in (model.layer2, model.layer3, model.layer4):
        first = stage[0]
        first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    return model


def densenet100(*, num_classes: int) -> nn.Module:
    """DenseNet-BC-100, k=12 for 32x32 CIFAR input (Huang et al. 2017, about 0.8M parameters).

    Depth 100 = 3 blocks x 16 bottleneck layers x 2 convs + stem conv + 2 transition convs + classifier.
    torchvision's DenseNet gives the BC layers (1x1 to 4k channels, then 3x3 to k) and the transitions
    (compression 0.5, 2x2 average pool); its ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool) is
    replaced by the CIFAR stem, a single 3x3/1 conv to 2k channels, so 32x32 maps reach the first block.
    """
    growth = 12
    model = DenseNet(growth_rate=growth, block_config=(16, 16, 16), num_init_features=2 * growth, bn_size=4,
                     num_classes=num_classes)
    stem = nn.Conv2d(3, 2 * growth, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(stem.weight)
    model.features.conv0 = stem
    model.features.norm0 = nn.Identity()  # each dense layer starts with its own BN-ReLU
    model.features.relu0 = nn.Identity()
    model.features.pool0 = nn.Identity()
    return model
