"""Shared by the layout tests: one set of official-shaped archives prepared as folders, archives and shards."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import Config
from pipeline.prep.prepare import prepare
from pipeline.prep.synthetic import make_imagenet_archives
from train_helpers import tiny_config

LAYOUTS = ("folders", "archives", "shards")


def layout_config(data_dir: Path, archive_dir: Path, layout: str, *extra: str) -> Config:
    """The tiny training config of train_helpers, reading (or prepping) ``layout``; shards of 0.1 MB (several)."""
    return tiny_config(data_dir, data_dir.parent / f"run-{layout}", "--layout", layout, "--archive-dir",
                       str(archive_dir), "--skip-checksum", "--shard-size-mb", "1", *extra)


def prep_layouts(root: Path, layouts=LAYOUTS, **archive_args) -> tuple[Path, dict[str, Path]]:
    """Archives of 4 classes x (16 train, 6 val) JPEGs (val 3 missing, one unlabelled) and a data dir per layout."""
    args = dict(num_classes=4, train_per_class=16, val_per_class=6, missing_val=(3,), unlabelled_val=1,
                size=(64, 48), seed=3)
    archives = make_imagenet_archives(root / "archives", **{**args, **archive_args}).archive_dir
    dirs = {}
    for layout in layouts:
        dirs[layout] = root / layout
        prepare(layout_config(dirs[layout], archives, layout))
    return archives, dirs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The archives and one data dir per layout, made once per test module (import this fixture by name)."""
    return prep_layouts(tmp_path_factory.mktemp("layouts"))
