"""Crop, resize and flip a batch of differently sized images in a fixed number of kernels.

Why: per image, a crop, an antialiased resize and a flip launch about five kernels each, about 1,300 for a batch
of 256, and on an accelerator the host's launches, not the arithmetic, then set the pace. The resize that PIL and
torchvision compute (bilinear, antialiased) makes each output pixel a mean of the input pixels under it weighted by
a triangle, widened by the downscale factor; per axis that is a matrix (output x input), so a resized image is
``Ry @ image @ Rx^T``. A crop box is zero weights outside it, a flip is Rx's rows in reverse order, and a center
crop after a resize is a window of the rows. So a whole batch is one padded tensor and two batched matrix products,
whatever its boxes. The weights are computed in floating point with no rounding between the two axes (PIL rounds
to 8 bits after the first), so pixels may differ from PIL's by one level.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PADDED_ELEMENTS_PER_CHUNK = 2 ** 28  # float32 elements of one padded chunk (1 GiB): bounds memory for huge images


@dataclass(frozen=True)
class AxisPlan:
    """Per sample, along one axis: the box in the image (``start``, ``extent`` pixels), the length the box is
    resized to (``resized``), and the first resized pixel kept (``offset``); ``flip`` reverses the output."""

    start: torch.Tensor
    extent: torch.Tensor
    resized: torch.Tensor
    offset: torch.Tensor
    flip: torch.Tensor

    def select(self, index: torch.Tensor) -> "AxisPlan":
        return AxisPlan(*(getattr(self, name).index_select(0, index) for name in self.__dataclass_fields__))


def axis_weights(plan: AxisPlan, out_size: int, padded: int) -> torch.Tensor:
    """(n, out_size, padded) float32 weights: output pixel o of sample i as a weighted sum of its input pixels."""
    device = plan.start.device
    out = torch.arange(out_size, device=device, dtype=torch.float32).view(1, -1, 1)
    out = torch.where(plan.flip.view(-1, 1, 1), out_size - 1 - out, out)
    resized_index = out + plan.offset.view(-1, 1, 1)
    scale = (plan.extent / plan.resized).float().view(-1, 1, 1)  # input pixels per output pixel
    support = scale.clamp(min=1.0)  # the triangle's half-width: 1 pixel, widened when shrinking (antialias)
    centre = (resized_index + 0.5) * scale  # in box coordinates
    box_index = torch.arange(padded, device=device, dtype=torch.float32).view(1, 1, -1) - plan.start.view(-1, 1, 1)
    weights = (1 - ((box_index + 0.5 - centre) / support).abs()).clamp(min=0)
    inside = (box_index >= 0) & (box_index < plan.extent.view(-1, 1, 1)) & (resized_index >= 0) & (
        resized_index < plan.resized.view(-1, 1, 1))
    weights = weights * inside
    return (weights / weights.sum(dim=2, keepdim=True).clamp(min=1e-12)).float()  # no input pixel: black (padding)


def _chunks(heights: list[int], widths: list[int]) -> list[list[int]]:
    """Sample indices in groups whose padded float32 tensor stays under PADDED_ELEMENTS_PER_CHUNK (largest first);
    linear in the batch, with each group's largest height and width kept as it grows."""
    chunks: list[list[int]] = []
    height = width = 0
    for i in sorted(range(len(heights)), key=lambda i: -heights[i] * widths[i]):
        grown_h, grown_w = max(height, heights[i]), max(width, widths[i])
        if chunks and 3 * (len(chunks[-1]) + 1) * grown_h * grown_w <= PADDED_ELEMENTS_PER_CHUNK:
            chunks[-1].append(i)
            height, width = grown_h, grown_w
        else:
            chunks.append([i])
            height, width = heights[i], widths[i]
    return chunks


def resample(images: list[torch.Tensor], rows: AxisPlan, cols: AxisPlan, out_size: int) -> torch.Tensor:
    """uint8 (n, 3, out_size, out_size) of the uint8 3 x H x W ``images`` by the per-sample plans (tensors on the
    images' device): one copy per image into a padded batch, then a fixed number of kernels per chunk."""
    n = len(images)
    device = images[0].device if images else rows.start.device
    out = torch.empty((n, 3, out_size, out_size), dtype=torch.uint8, device=device)
    heights, widths = [int(im.shape[1]) for im in images], [int(im.shape[2]) for im in images]
    for chunk in _chunks(heights, widths):
        height, width = max(heights[i] for i in chunk), max(widths[i] for i in chunk)
        padded = torch.zeros((len(chunk), 3, height, width), dtype=torch.float32, device=device)
        for slot, i in enumerate(chunk):
            padded[slot, :, :heights[i], :widths[i]].copy_(images[i])
        index = torch.tensor(chunk, device=device)
        ry, rx = axis_weights(rows.select(index), out_size, height), axis_weights(cols.select(index), out_size, width)
        resized = ry.unsqueeze(1) @ (padded @ rx.transpose(1, 2).unsqueeze(1))  # (c, 3, out, out)
        out.index_copy_(0, index, resized.round_().clamp_(0, 255).to(torch.uint8))
    return out


def train_plans(boxes: torch.Tensor, flips: torch.Tensor, crop: int) -> tuple[AxisPlan, AxisPlan]:
    """RandomResizedCrop then an optional horizontal flip: ``boxes`` (n, 4) top, left, height, width, each
    resized to ``crop`` x ``crop``."""
    full = torch.full_like(boxes[:, 0], crop)
    zero, no_flip = torch.zeros_like(full), torch.zeros_like(flips)
    return (AxisPlan(boxes[:, 0], boxes[:, 2], full, zero, no_flip),
            AxisPlan(boxes[:, 1], boxes[:, 3], full, zero, flips))


def eval_plans(sizes: torch.Tensor, resize: int, crop: int) -> tuple[AxisPlan, AxisPlan]:
    """Resize of the shorter side to ``resize`` (the longer one as torchvision's Resize truncates it), then a
    center crop of ``crop`` (offsets rounded as torchvision's CenterCrop rounds them); ``sizes`` (n, 2) is H, W."""
    height, width = sizes[:, 0], sizes[:, 1]
    short, long = torch.minimum(height, width), torch.maximum(height, width)
    resized_long = (resize * long.float() / short.float()).floor().long()
    resized_h = torch.where(height <= width, torch.full_like(height, resize), resized_long)
    resized_w = torch.where(height <= width, resized_long, torch.full_like(width, resize))
    zero, no_flip = torch.zeros_like(height), torch.zeros_like(height, dtype=torch.bool)
    return (AxisPlan(zero, height, resized_h, _centred(resized_h, crop), no_flip),
            AxisPlan(zero, width, resized_w, _centred(resized_w, crop), no_flip))


def _centred(length: torch.Tensor, crop: int) -> torch.Tensor:
    return ((length - crop).float() / 2).round().long()  # half to even, as Python's round in CenterCrop
