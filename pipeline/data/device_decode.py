"""The device data path (``--decode device``): workers read bytes, the training device decodes and augments.

Why: on a GPU node PIL's decode and resize in the loader workers are the bottleneck (the GPU waits for data
50-80% of the time with ResNet-50 on 14 workers). Here a worker does only what is cheap on a CPU:

- reads the file's bytes and parses its header with PIL (size, mode, format; no pixel is decoded);
- draws the crop box and the flip under the sample's seeded generator, with the same draws in the same order
  as the CPU path's RandomResizedCrop and RandomHorizontalFlip, so the order, the crops and an exact mid-epoch
  resume are those of ``--decode cpu``; then one more draw seeds the recipe's extra augmentations;
- decodes with PIL itself only what nvJPEG cannot take: not a JPEG (a PNG named .JPEG), not 3-channel (CMYK,
  grayscale), or no end-of-image marker (a truncated file: PIL raises and the sample is skipped and named as
  in the CPU path). These are counted (``cpu_decoded``).

The training process then decodes the whole batch in one ``torchvision.io.decode_jpeg`` call on the device
(nvJPEG on CUDA; the same call runs on the CPU, which is how CI tests this path), crops, resizes (bilinear,
antialiased) and flips each image there; val resizes the shorter side and center-crops. A file the device
decoder still rejects is decoded by PIL on the spot; one nobody can read is skipped and named (train: another
image of the batch takes its place, so batches stay full; val: it is dropped and counted, so counts stay exact).
"""
from __future__ import annotations

import io
import logging
import multiprocessing
from dataclasses import dataclass
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.data.datasets import DECODE_ERRORS, DataDirError, ImageFiles, seeded_cpu_rng

log = logging.getLogger(__name__)

JPEG_END = b"\xff\xd9"  # end-of-image marker; a file without it near its end was cut short
END_SLACK = 1024  # bytes after the marker that writers append (padding, trailers) and decoders ignore
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's, as in pipeline.data.transforms


def _pil_rgb_tensor(image: Image.Image) -> torch.Tensor:
    return F.pil_to_tensor(image.convert("RGB"))


def _device_decodable(data: bytes, header: Image.Image) -> bool:
    return header.format == "JPEG" and header.mode == "RGB" and JPEG_END in data[-END_SLACK:]


@dataclass
class EncodedImage:
    """A file as a worker hands it on: its bytes (uint8) or, for what nvJPEG cannot take, PIL's RGB decode."""

    payload: torch.Tensor
    decoded: bool
    header: Image.Image  # header only (pixels not loaded), for the size; never leaves the worker
    name: str  # the path, to name the file if the device cannot decode it either


class EncodedFiles(ImageFiles):
    """Image files as EncodedImage; raises what PIL raises for an unreadable header or fallback decode."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray):
        super().__init__(paths, labels)
        self._cpu_decoded = multiprocessing.get_context().Value("q", 0)  # shared with the workers

    @property
    def cpu_decoded(self) -> int:
        """Images decoded by PIL in the workers so far (not JPEG, not 3-channel, or cut short)."""
        return int(self._cpu_decoded.value)

    def __getitem__(self, index: int) -> tuple[EncodedImage, int]:
        with open(self.describe(index), "rb") as fh:
            data = fh.read()
        header = Image.open(io.BytesIO(data))
        label = int(self.labels[index])
        if _device_decodable(data, header):
            payload, decoded = torch.frombuffer(bytearray(data), dtype=torch.uint8), False
        else:
            payload, decoded = _pil_rgb_tensor(header), True
            with self._cpu_decoded.get_lock():
                self._cpu_decoded.value += 1
        return EncodedImage(payload, decoded, header, self.describe(index)), label


@dataclass
class EncodedSample:
    """What a worker returns per image: the payload and the random choices for the device to apply."""

    payload: torch.Tensor
    decoded: bool
    box: tuple[int, int, int, int]  # top, left, height, width of the crop in the full image (val: unused)
    flip: bool
    extras_seed: int  # seeds the recipe's extra augmentations on the device
    name: str


class DrawCrop:
    """The train sample's random choices, drawn like RandomResizedCrop then RandomHorizontalFlip draw them."""

    def __call__(self, image: EncodedImage) -> EncodedSample:
        top, left, height, width = v1.RandomResizedCrop.get_params(image.header, list(SCALE), list(RATIO))
        flip = bool(torch.rand(1) < 0.5)
        extras_seed = int(torch.randint(0, 2 ** 62, (1,)))
        return EncodedSample(image.payload, image.decoded, (top, left, height, width), flip, extras_seed, image.name)


class NoDraw:
    """Val: nothing random; the device resizes and center-crops."""

    def __call__(self, image: EncodedImage) -> EncodedSample:
        return EncodedSample(image.payload, image.decoded, (0, 0, 0, 0), False, 0, image.name)


@dataclass
class EncodedBatch:
    """A batch of EncodedSample, as a list: payloads differ in size."""

    samples: list[EncodedSample]

    def __len__(self) -> int:
        return len(self.samples)


class EncodedCollate:
    """(EncodedSample, label, seed) samples into (EncodedBatch, labels), dropping failed ones."""

    def __call__(self, samples: list) -> tuple[EncodedBatch, torch.Tensor]:
        kept = [s for s in samples if s is not None]
        return EncodedBatch([s for s, _, _ in kept]), torch.tensor([label for _, label, _ in kept], dtype=torch.int64)


class DeviceDecoder:
    """An EncodedBatch as uint8 N x 3 x size x size images on ``device``: decoded, cropped, resized, flipped."""

    def __init__(self, *, train: bool, crop_size: int, resize_size: int, extras: v2.Compose | None = None):
        self.train, self.crop_size, self.resize_size, self.extras = train, crop_size, resize_size, extras
        self.cpu_decoded = 0  # images the device decoder rejected and PIL decoded here
        self.skipped = 0      # images nobody could decode, left out (val) or replaced (train)

    def __call__(self, batch: EncodedBatch, targets: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        full = self._decode(batch, device)
        images: list[torch.Tensor | None] = [
            None if image is None else self._augment(image, sample) for image, sample in zip(full, batch.samples)]
        good = [i for i, image in enumerate(images) if image is not None]
        if len(good) == len(images):
            return torch.stack(images), targets
        if self.train and good:  # another image of the batch takes the place, so every rank steps alike
            return torch.stack([images[i] if images[i] is not None else images[good[i % len(good)]]
                                for i in range(len(images))]), targets
        if self.train:
            raise DataDirError(f"no image of a batch of {len(images)} could be decoded (named above); check the "
                               "data dir (disk, permissions) or re-run prep")
        if not good:  # val: drop, so the counts say what was seen
            return torch.empty((0, 3, self.crop_size, self.crop_size), dtype=torch.uint8, device=device), targets[:0]
        return torch.stack([images[i] for i in good]), targets[good]

    def _decode(self, batch: EncodedBatch, device: torch.device) -> list[torch.Tensor | None]:
        """Full-size RGB images on the device, in batch order; None where no decoder can read the file."""
        out: list[torch.Tensor | None] = [s.payload.to(device, non_blocking=True) if s.decoded else None
                                          for s in batch.samples]
        encoded = [i for i, s in enumerate(batch.samples) if not s.decoded]
        if not encoded:
            return out
        if device.type != "cpu":
            # nvJPEG's hardware decoder writes its outputs without waiting for the caller's stream, so it can be
            # handed a block that queued kernels still read (pytorch/vision#9606): let that work finish first.
            torch.accelerator.current_stream(device).synchronize()
        try:
            decoded = decode_jpeg([batch.samples[i].payload for i in encoded], mode=ImageReadMode.RGB,
                                  device=device)
        except RuntimeError:  # one bad file fails the batched call: decode one by one to find it
            decoded = [self._decode_one(batch, i, device) for i in encoded]
        for i, image in zip(encoded, decoded):
            out[i] = image
        return out

    def _decode_one(self, batch: EncodedBatch, index: int, device: torch.device) -> torch.Tensor | None:
        payload = batch.samples[index].payload
        try:
            return decode_jpeg(payload, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
        try:
            with Image.open(io.BytesIO(payload.numpy().tobytes())) as image:
                decoded = _pil_rgb_tensor(image)
        except DECODE_ERRORS as exc:
            self.skipped += 1
            log.warning("skipping unreadable image %s: %s: %s", batch.samples[index].name,
                        type(exc).__name__, exc)
            return None
        self.cpu_decoded += 1
        return decoded.to(device)

    def _augment(self, image: torch.Tensor, sample: EncodedSample) -> torch.Tensor:
        size = [self.crop_size, self.crop_size]
        if not self.train:
            return F.center_crop(F.resize(image, [self.resize_size], antialias=True), size)
        image = F.resized_crop(image, *sample.box, size, antialias=True)
        if sample.flip:
            image = image.flip(-1)
        if self.extras is not None:
            with seeded_cpu_rng(sample.extras_seed):
                image = self.extras(image)
        return image

