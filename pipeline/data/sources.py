"""Data sources chosen by name (``[data] layout``), in the spirit of timm's ``create_reader``.

    classes = layout_classes(data_dir, layout)
    train = open_split(layout, data_dir, "train", classes)   # a pipeline.data.datasets.Source
    data, label = train.read(i), train.labels[i]              # or train[i]: (RGB PIL image, label)

Every layout gives random access by sample index in the same order (by label, then by file name), so the samplers,
the per-(seed, epoch, index) augmentation, the device decode path (which wants the bytes), exact resume and exact
eval never learn which layout they read:

- ``folders``: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``, listed by the file index prep writes;
- ``archives``: the official ILSVRC2012 tars read in place, by offset (pipeline.data.packed);
- ``shards``: WebDataset tar shards written by prep, by offset (pipeline.data.packed).

A new layout is one module with a function ``(data_dir, split, classes) -> Source`` and one line in SOURCES.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from pipeline.core.config import Config
from pipeline.core.data_manifest import DataManifestError, read_manifest
from pipeline.data.datasets import ClassList, Source, imagenet_classes, imagenet_split
from pipeline.data.packed import packed_split

Opener = Callable[[Path, str, ClassList], Source]
SOURCES: dict[str, Opener] = {
    "folders": imagenet_split,
    "archives": functools.partial(packed_split, layout="archives"),
    "shards": functools.partial(packed_split, layout="shards"),
}


def layout_classes(data_dir: Path, layout: str) -> ClassList:
    return imagenet_classes(data_dir, packed=layout != "folders")


def open_split(layout: str, data_dir: Path, split: str, classes: ClassList) -> Source:
    return SOURCES[layout](data_dir, split, classes)


def data_provenance(cfg: Config) -> dict[str, Any]:
    """What a run's provenance.json says of its data: the layout and, for re-encoded shards, their resize."""
    record: dict[str, Any] = {"data_layout": cfg.data.layout}
    if cfg.data.layout != "folders":
        try:
            manifest = read_manifest(cfg.data.data_dir)
        except DataManifestError:
            manifest = None  # the loaders have said so already
        record["data_resize"] = manifest.extra.get("resize") if manifest else None
    return record
