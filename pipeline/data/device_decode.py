"""The device data path (``--decode device``): workers read bytes, the training device decodes and augments.

Why: on a GPU node PIL's decode and resize in the loader workers are the bottleneck (the GPU waits for data
50-80% of the time with ResNet-50 on 14 workers). Here a worker does only what is cheap on a CPU:

- reads the file's bytes and parses its header with PIL (size, mode, format; no pixel is decoded); a header
  claiming more than MAX_IMAGE_PIXELS is skipped and named as an unreadable file;
- draws the crop box and the flip under the sample's seeded generator, with the same draws in the same order
  as the CPU path's RandomResizedCrop and RandomHorizontalFlip, so the order, the crops and an exact mid-epoch
  resume are those of ``--decode cpu``; then one more draw seeds the recipe's extra augmentations;
- decodes with PIL itself only what nvJPEG cannot take: not a JPEG (a PNG named .JPEG), not 3-channel (CMYK,
  grayscale), or no end-of-image marker (a truncated file: PIL raises and the sample is skipped and named as
  in the CPU path). These are counted (``cpu_decoded``).

A batch crosses from the worker to the training process as two tensors (one shared-memory file descriptor
each), whatever its size: every sample's bytes one after another, and one row of integers per sample (offsets,
sizes, box, flip, seed); the training process splits the bytes into views. One tensor per image cost a
descriptor per image: a batch of 256 took 100 ms of the main thread to receive, and nodes whose ``ulimit -n``
is 1024 ran out of descriptors.

The training process then decodes the whole batch in one ``torchvision.io.decode_jpeg`` call on the device
(nvJPEG on CUDA; the same call runs on the CPU, which is how CI tests this path). Crop, resize and flip (val:
resize of the shorter side and center crop) run for the whole batch in a few kernels on an accelerator
(pipeline.data.batched_geometry); on the CPU, where kernel launches cost nothing, image by image with
torchvision's resize. The recipe's colour and auto-augment steps run image by image; RandomErasing is one
masked fill for the batch, with the fill colour already on the device. A file the device decoder still rejects
is decoded by PIL on the spot; one nobody can read is skipped and named (train: another image of the batch, with
its own label, takes its place, so batches stay full; val: it is dropped and counted, so counts stay exact).
"""
from __future__ import annotations

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

from pipeline.core.accelerator import Accelerator
from pipeline.data.batched_geometry import eval_plans, resample, train_plans
from pipeline.data.datasets import DECODE_ERRORS, DataDirError, Source, open_header, seeded_cpu_rng

log = logging.getLogger(__name__)

JPEG_END = b"\xff\xd9"  # end-of-image marker; a file without it near its end was cut short
END_SLACK = 1024  # bytes after the marker that writers append (padding, trailers) and decoders ignore
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's, as in pipeline.data.transforms
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)  # RandomErasing's defaults, as the CPU path uses them


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).transpose(2, 0, 1)  # 3 x H x W


def _device_decodable(data: bytes, header: Image.Image) -> bool:
    return header.format == "JPEG" and header.mode == "RGB" and JPEG_END in data[-END_SLACK:]


@dataclass
class EncodedImage:
    """A file as a worker reads it: its bytes or, for what nvJPEG cannot take, PIL's RGB pixels (3 x H x W)."""

    payload: bytes
    decoded: bool
    header: Image.Image  # header only (pixels not loaded), for the size; never leaves the worker
    name: str  # the path, to name the file if the device cannot decode it either


class EncodedFiles(Source):
    """A source's images as EncodedImage, whatever its layout; raises what PIL raises for an unreadable header or
    fallback decode."""

    def __init__(self, source: Source):
        self.source, self.labels = source, source.labels
        self._cpu_decoded = multiprocessing.get_context().Value("q", 0)  # shared with the workers

    @property
    def cpu_decoded(self) -> int:
        """Images decoded by PIL in the workers so far (not JPEG, not 3-channel, or cut short)."""
        return int(self._cpu_decoded.value)

    def describe(self, index: int) -> str:
        return self.source.describe(index)

    def __getitem__(self, index: int) -> tuple[EncodedImage, int]:
        name = self.describe(index)
        data = self.source.read(index)
        header = open_header(data, name)
        label = int(self.labels[index])
        if _device_decodable(data, header):
            return EncodedImage(data, False, header, name), label
        pixels = _rgb_pixels(header)
        with self._cpu_decoded.get_lock():
            self._cpu_decoded.value += 1
        return EncodedImage(pixels.tobytes(), True, header, name), label


@dataclass
class EncodedSample:
    """What a worker makes of one image: the payload and the random choices for the device to apply."""

    image: EncodedImage
    box: tuple[int, int, int, int]  # top, left, height, width of the crop in the full image (val: unused)
    flip: bool
    extras_seed: int  # seeds the recipe's extra augmentations on the device

    def meta_row(self, start: int) -> list[int]:
        width, height = self.image.header.size
        return [start, start + len(self.image.payload), height, width, int(self.image.decoded), *self.box,
                int(self.flip), self.extras_seed]


class DrawCrop:
    """The train sample's random choices, drawn like RandomResizedCrop then RandomHorizontalFlip draw them."""

    def __call__(self, image: EncodedImage) -> EncodedSample:
        top, left, height, width = v1.RandomResizedCrop.get_params(image.header, list(SCALE), list(RATIO))
        flip = bool(torch.rand(1) < 0.5)
        extras_seed = int(torch.randint(0, 2 ** 62, (1,)))
        return EncodedSample(image, (top, left, height, width), flip, extras_seed)


class NoDraw:
    """Val: nothing random; the device resizes and center-crops."""

    def __call__(self, image: EncodedImage) -> EncodedSample:
        return EncodedSample(image, (0, 0, 0, 0), False, 0)


META_COLUMNS = ("start", "end", "height", "width", "decoded", "top", "left", "box_height", "box_width", "flip",
                "extras_seed")
SIZE, BOX = slice(2, 4), slice(5, 9)  # height, width; top, left, box_height, box_width


def meta_column(meta: torch.Tensor, name: str) -> torch.Tensor:
    return meta[:, META_COLUMNS.index(name)]


@dataclass
class EncodedBatch:
    """A batch of encoded samples as one byte buffer and one int64 row per sample (META_COLUMNS)."""

    data: torch.Tensor  # uint8, every payload one after another
    meta: torch.Tensor  # int64, n x len(META_COLUMNS)
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def column(self, name: str) -> torch.Tensor:
        return meta_column(self.meta, name)

    def payload(self, i: int) -> torch.Tensor:
        """Sample i's bytes (a view of the buffer), or its pixels as 3 x H x W when the worker decoded it."""
        start, end, height, width, decoded = self.meta[i, :5].tolist()
        view = self.data[start:end]
        return view.view(3, height, width) if decoded else view


class EncodedCollate:
    """(EncodedSample, label, seed) samples into (EncodedBatch, labels), dropping failed ones."""

    def __call__(self, samples: list) -> tuple[EncodedBatch, torch.Tensor]:
        kept = [s for s in samples if s is not None]
        rows, start = [], 0
        for sample, _, _ in kept:
            rows.append(sample.meta_row(start))
            start += len(sample.image.payload)
        data = torch.frombuffer(bytearray(b"".join(s.image.payload for s, _, _ in kept)) or bytearray(1),
                                dtype=torch.uint8)
        meta = torch.tensor(rows, dtype=torch.int64).reshape(len(kept), len(META_COLUMNS))
        labels = torch.tensor([label for _, label, _ in kept], dtype=torch.int64)
        return EncodedBatch(data, meta, [s.image.name for s, _, _ in kept]), labels


class DeviceDecoder:
    """An EncodedBatch as uint8 N x 3 x size x size images on ``device``: decoded, cropped, resized, flipped.

    ``batched`` picks the batched geometry (default: on accelerators); ``photometric`` runs per image, and
    RandomErasing with probability ``erase_p`` fills its box with ``erase_value`` (0-255 per channel)."""

    def __init__(self, *, train: bool, crop_size: int, resize_size: int, photometric: v2.Compose | None = None,
                 erase_p: float = 0.0, erase_value: tuple[int, ...] = (0, 0, 0), batched: bool | None = None):
        self.train, self.crop_size, self.resize_size = train, crop_size, resize_size
        self.photometric, self.erase_p, self.erase_value, self.batched = photometric, erase_p, erase_value, batched
        self.cpu_decoded = 0  # images the device decoder rejected and PIL decoded here
        self.skipped = 0      # images nobody could decode, left out (val) or replaced (train)

    def __call__(self, batch: EncodedBatch, targets: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        full = self._decode(batch, device)
        good = [i for i, image in enumerate(full) if image is not None]
        if self.train and not good:
            raise DataDirError(f"no image of a batch of {len(full)} could be decoded (named above); check the "
                               "data dir (disk, permissions) or re-run prep")
        # train: another image of the batch, with its own label, box and flip, takes a failed one's place, so every
        # rank steps alike; val: failed images are dropped, so the counts say what was seen
        order = [i if full[i] is not None else good[i % len(good)] for i in range(len(full))] if self.train else good
        index = torch.tensor(order, dtype=torch.int64)
        images = self._geometry([full[i] for i in order], batch.meta.index_select(0, index), device)
        if self.train:
            images = self._extras(images, batch.column("extras_seed")[index].tolist())
        return images, targets[index]

    def _decode(self, batch: EncodedBatch, device: torch.device) -> list[torch.Tensor | None]:
        """Full-size RGB images on the device, in batch order; None where no decoder can read the file."""
        decoded_flags = batch.column("decoded").tolist()
        out: list[torch.Tensor | None] = [batch.payload(i).to(device, non_blocking=True) if flag else None
                                          for i, flag in enumerate(decoded_flags)]
        encoded = [i for i, flag in enumerate(decoded_flags) if not flag]
        if not encoded:
            return out
        accelerator = Accelerator.of(device)
        # nvJPEG's hardware decoder writes its outputs without waiting for the stream it is called on, so it can be
        # handed a block that this stream's queued kernels still read (pytorch/vision#9606): let this stream's own
        # work finish first. The caller runs this on a stream of its own (pipeline.data.prefetch), so the wait is
        # for the last batch's augmentation, not for the training step.
        accelerator.synchronize_current_stream()
        try:
            decoded = decode_jpeg([batch.payload(i) for i in encoded], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batched call: decode one by one to find it
            accelerator.synchronize()  # and let the failed call's writes land before its memory is handed out again
            decoded = [self._decode_one(batch, i, device) for i in encoded]
        for i, image in zip(encoded, decoded):
            out[i] = image
        return out

    def _decode_one(self, batch: EncodedBatch, index: int, device: torch.device) -> torch.Tensor | None:
        payload = batch.payload(index)
        try:
            return decode_jpeg(payload, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
        try:
            with open_header(payload.numpy().tobytes(), batch.names[index]) as image:
                decoded = torch.from_numpy(_rgb_pixels(image).copy())
        except DECODE_ERRORS as exc:
            self.skipped += 1
            log.warning("skipping unreadable image %s: %s: %s", batch.names[index], type(exc).__name__, exc)
            return None
        self.cpu_decoded += 1
        return decoded.to(device)

    def _geometry(self, images: list[torch.Tensor], meta: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Crop, resize and flip (val: resize and center crop) into one uint8 batch."""
        size = self.crop_size
        if not images:
            return torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)
        if self.batched if self.batched is not None else device.type != "cpu":
            on_device = meta.to(device, non_blocking=True)
            rows, cols = (train_plans(on_device[:, BOX], meta_column(on_device, "flip").bool(), size) if self.train
                          else eval_plans(on_device[:, SIZE], self.resize_size, size))
            return resample(images, rows, cols, size)
        if not self.train:
            return torch.stack([F.center_crop(F.resize(image, [self.resize_size], antialias=True), [size, size])
                                for image in images])
        boxes, flips = meta[:, BOX].tolist(), meta_column(meta, "flip").tolist()
        cropped = [F.resized_crop(image, *box, [size, size], antialias=True) for image, box in zip(images, boxes)]
        return torch.stack([image.flip(-1) if flip else image for image, flip in zip(cropped, flips)])

    def _extras(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """The recipe's photometric steps image by image, then RandomErasing for the batch, each sample's draws
        under its own seed (exact on resume)."""
        if self.photometric is None and self.erase_p <= 0:
            return images
        boxes = []
        for i, seed in enumerate(seeds):
            with seeded_cpu_rng(seed):
                if self.photometric is not None:
                    images[i] = self.photometric(images[i])
                boxes.append(self._erase_box() if self.erase_p > 0 else (0, 0, 0, 0))
        return self._erase(images, boxes) if self.erase_p > 0 else images

    def _erase_box(self) -> tuple[int, int, int, int]:
        """RandomErasing's draws (torchvision's v1 parameters): top, left, height, width, or an empty box."""
        if torch.rand(1) >= self.erase_p:
            return 0, 0, 0, 0
        size = self.crop_size
        shape_only = torch.empty((1, 1, 1)).expand(3, size, size)  # get_params reads the shape only
        top, left, height, width, value = v1.RandomErasing.get_params(shape_only, ERASE_SCALE, ERASE_RATIO, [0])
        return (0, 0, 0, 0) if value is shape_only else (top, left, height, width)  # no box fit: nothing erased

    def _erase(self, images: torch.Tensor, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """Fill each image's box with the erase colour: one masked fill for the batch, all operands on the device."""
        device, size = images.device, images.shape[-1]
        box = torch.tensor(boxes, dtype=torch.int64).to(device, non_blocking=True).view(-1, 4, 1, 1)
        ys = torch.arange(size, device=device).view(1, -1, 1)
        xs = torch.arange(size, device=device).view(1, 1, -1)
        inside = ((ys >= box[:, 0]) & (ys < box[:, 0] + box[:, 2]) & (xs >= box[:, 1]) & (xs < box[:, 1] + box[:, 3]))
        colour = torch.tensor(self.erase_value, dtype=torch.uint8).to(device, non_blocking=True).view(1, 3, 1, 1)
        return torch.where(inside.unsqueeze(1), colour, images)
