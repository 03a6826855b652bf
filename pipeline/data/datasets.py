"""The prepared data dir as datasets: ImageNet folders or CIFAR-10 batches, with seeded augmentation.

ImageNet: ``data_dir/train/<wnid>/*.JPEG``, ``data_dir/val/<wnid>/*.JPEG`` and ``classes.tsv`` (label order;
without it, the sorted train folder names). The files come from each split's file index, which prep writes
(pipeline.core.file_index), so no rank lists the tree; a data dir without one is scanned, with a warning. Both splits use the same wnid -> label map, so a class missing
from val does not shift the labels. Paths are kept in numpy arrays, not lists of Python strings, so forked
loader workers do not copy them page by page as reference counts change.

CIFAR-10: ``data_dir/cifar-10-batches-py/`` as in the official archive, read with the restricted unpickler of
pipeline.prep.cifar; the prep stage checks the archive's MD5, so the per-file MD5 check of torchvision (which would reject a
subset or the synthetic test archive) is left out here.

Augmentation randomness comes from the sample key ``(epoch, index)``: each sample's transform runs under a
torch seed made of (seed, epoch, index), so an epoch's images are the same whatever the number of workers,
their persistence, or a resume from a checkpoint.

Unreadable images (a corrupt or truncated JPEG) never stop an epoch: each failure is logged with the file's
path (once per file per process) and counted in a counter shared with the worker processes
(``SampleSet.skipped``). In training the next image takes the place of the failed one, so every batch stays
full (under DDP all ranks take the same number of steps); in eval the sample is dropped (``None``), so the
eval counts only images actually seen and ``total`` says how many.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pipeline.core.file_index import IMAGE_EXTENSIONS, FileIndexError, index_path, list_split, read_index
from pipeline.prep.cifar import META_FILE, TEST_BATCH, TRAIN_BATCHES, load_batch
from pipeline.prep.classes import CLASSES_FILE, read_classes
from pipeline.prep.datadir import CIFAR_FOLDER, DataDirError

log = logging.getLogger(__name__)

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files
# Pixels an image may have (about 8200 x 8200); ILSVRC2012's largest are far below. A few KB of JPEG can claim
# 9000 x 9000 and decode to 243 MB, under PIL's own bomb limit (89 M pixels): such a file is skipped and named.
MAX_IMAGE_PIXELS = 64 * 2 ** 20
MAX_CONSECUTIVE_FAILURES = 50  # more unreadable images in a row than this means a broken data dir, not bad luck
PREP_HINT = "prepare it with `python launch.py --stage prep --archive-dir ARCHIVES --data-dir {data_dir}`"
SampleKey = int | tuple[int, int] | tuple[int, int, int]  # index, (epoch, index) or (epoch, index, copy)


def data_dir_error(data_dir: str | Path, problem: str, expected: str) -> DataDirError:
    return DataDirError(f"{problem}; expected {expected}; {PREP_HINT.format(data_dir=data_dir)}")


IMAGENET_LAYOUT = "train/<wnid>/*.JPEG, val/<wnid>/*.JPEG and classes.tsv"
CIFAR_LAYOUT = f"{CIFAR_FOLDER}/ with data_batch_1..5, test_batch and batches.meta"


@dataclass(frozen=True)
class ClassList:
    wnids: tuple[str, ...]
    names: tuple[str, ...]


def imagenet_classes(data_dir: Path, packed: bool = False) -> ClassList:
    """The label order: classes.tsv when present, else the sorted folder names under train/ (``packed``: a data dir
    of the archives or shards layout, which has no folders and always a classes.tsv)."""
    train = data_dir / "train"
    if not packed and (not train.is_dir() or not (data_dir / "val").is_dir()):
        raise data_dir_error(data_dir, f"data dir {data_dir} has no train/ and val/ folders", IMAGENET_LAYOUT)
    if packed or (data_dir / CLASSES_FILE).is_file():
        try:
            entries = read_classes(data_dir)
        except (OSError, ValueError) as exc:
            raise data_dir_error(data_dir, f"{data_dir / CLASSES_FILE} is malformed ({exc})", IMAGENET_LAYOUT) from exc
        if [e.index for e in entries] != list(range(len(entries))):
            raise data_dir_error(data_dir, f"{data_dir / CLASSES_FILE} indices are not 0..N-1 in order",
                                 IMAGENET_LAYOUT)
        return ClassList(tuple(e.wnid for e in entries), tuple(e.words for e in entries))
    wnids = tuple(sorted(p.name for p in train.iterdir() if p.is_dir()))
    return ClassList(wnids, wnids)


@functools.lru_cache(maxsize=4)
def split_files(data_dir: str, split: str, wnids: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(paths as bytes, labels) of the images under data_dir/split/<wnid>/ from the split's file index
    (pipeline.core.file_index), or a scan of the tree without one; cached so info and loader read it once."""
    try:
        names = read_index(data_dir, split)
    except FileIndexError as exc:
        raise data_dir_error(data_dir, str(exc), "the index prep writes") from None
    if names is None:
        log.warning("%s has no file index (%s): listing the tree instead, which costs minutes per process on a "
                    "parallel file system; run prep on the data dir again to write the index (nothing is extracted "
                    "again)", data_dir, index_path(data_dir, split).name)
        names = list_split(Path(data_dir) / split)
    label_of = {w: i for i, w in enumerate(wnids)}
    kept = [(name, label_of[name.split("/", 1)[0]]) for name in names if name.split("/", 1)[0] in label_of]
    root = f"{data_dir}/{split}/"
    paths = np.array([(root + name).encode() for name, _ in kept], dtype=np.bytes_)
    return paths, np.array([label for _, label in kept], dtype=np.int64)


class TooManyPixelsError(ValueError):
    """An image header claiming more than MAX_IMAGE_PIXELS (a decompression bomb, or not a photo)."""


def check_pixels(header: Image.Image) -> None:
    """Raise TooManyPixelsError before decoding an image whose header claims too many pixels."""
    width, height = header.size
    if width * height > MAX_IMAGE_PIXELS:
        raise TooManyPixelsError(f"its header claims {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS} "
                                 "allowed (a decompression bomb or not a photo)")


def open_header(data: bytes, name: str) -> Image.Image:
    """PIL's view of a file's bytes (header parsed, no pixel decoded); the error names the file, not a buffer."""
    try:
        header = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {name!r}") from None
    check_pixels(header)
    return header


class Source(Dataset):
    """The seam every data layout implements (pipeline.data.sources picks one by name): random access by sample
    index to a file's encoded bytes (``read``), its label (``labels``) and a name for messages (``describe``).
    ``[i]`` is (RGB PIL image, label) decoded from those bytes and raises what PIL raises on an unreadable file."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, index: int) -> str:
        raise NotImplementedError

    def read(self, index: int) -> bytes:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with open_header(self.read(index), self.describe(index)) as img:
            return img.convert("RGB"), int(self.labels[index])


class ImageFiles(Source):
    """The ``folders`` layout: one file per image, named by path."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray):
        self.paths, self.labels = paths, labels

    def describe(self, index: int) -> str:
        return self.paths[index].decode()

    def read(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as fh:
            return fh.read()


def imagenet_split(data_dir: Path, split: str, classes: ClassList) -> ImageFiles:
    paths, labels = split_files(str(data_dir), split, classes.wnids)
    if len(labels) == 0:
        raise data_dir_error(data_dir, f"no images with extensions {IMAGE_EXTENSIONS} in {data_dir / split} for the "
                             f"{len(classes.wnids)} classes", IMAGENET_LAYOUT)
    return ImageFiles(paths, labels)


class CifarBatches(Dataset):
    """CIFAR-10's pickled batches, read with prep's restricted unpickler.

    torchvision's CIFAR10 runs a plain ``pickle.load``, which would execute code planted in a changed data
    dir in every training process; pipeline.prep.cifar.load_batch only admits numpy arrays.
    """

    def __init__(self, root: Path, train: bool):
        folder = Path(root) / CIFAR_FOLDER
        batches = [load_batch(folder / name) for name in (TRAIN_BATCHES if train else (TEST_BATCH,))]
        self.data = np.vstack([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = [int(label) for b in batches for label in b["labels"]]
        self.classes = list(load_batch(folder / META_FILE)["label_names"])

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self, index: int) -> str:
        return f"{CIFAR_FOLDER} image {index}"

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index]), self.targets[index]


@functools.lru_cache(maxsize=2)
def cifar_split(data_dir: Path, train: bool) -> CifarBatches:
    try:
        return CifarBatches(data_dir, train=train)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as exc:
        raise data_dir_error(data_dir, f"cannot read CIFAR-10 batches in {data_dir / CIFAR_FOLDER} ({exc})",
                             CIFAR_LAYOUT) from exc


def sample_seed(seed: int, epoch: int, index: int, copy: int = 0) -> int:
    """A distinct torch seed per (run seed, epoch, sample, copy); arithmetic, so every process derives the same
    one. ``copy`` tells apart the draws of one image in an epoch under repeated augmentation; its step is odd,
    as torch's CPU generator keeps only the low 32 bits of a seed."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index + copy * 0x9E3779B1) % (2 ** 63)


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Run a block under torch's CPU generator seeded with ``seed``, then restore it (80x cheaper than fork_rng)."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


class SampleSet(Dataset):
    """Transformed samples of a source dataset, seeded per (epoch, index, copy), surviving unreadable images."""

    def __init__(self, source: Dataset, transform: Callable, *, seed: int, replace_failed: bool):
        self.source, self.transform, self.seed = source, transform, seed
        self.replace_failed = replace_failed
        self._skipped = multiprocessing.get_context().Value("q", 0)  # shared with fork and spawn workers
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    @property
    def skipped(self) -> int:
        """Image loads that failed so far, in all processes (a file drawn again in a later epoch counts again)."""
        return int(self._skipped.value)

    def _skip(self, index: int, exc: Exception) -> None:
        with self._skipped.get_lock():
            self._skipped.value += 1
        if index not in self._reported:
            self._reported.add(index)
            log.warning("skipping unreadable image %s: %s: %s", self.source.describe(index), type(exc).__name__, exc)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int, int] | None:
        """(image tensor, label, sample seed), or None for an unreadable image in eval."""
        epoch, index, *copy = key if isinstance(key, tuple) else (0, key)
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            i = (index + attempt) % len(self.source)
            try:
                image, label = self.source[i]
            except DECODE_ERRORS as exc:
                self._skip(i, exc)
                if not self.replace_failed:
                    return None
                continue
            seed = sample_seed(self.seed, epoch, i, *copy)
            with seeded_cpu_rng(seed):
                return self.transform(image), label, seed
        raise DataDirError(f"{MAX_CONSECUTIVE_FAILURES} images in a row could not be read, the last "
                           f"{self.source.describe(i)}; check the data dir (disk, permissions) or re-run prep")
