"""The data layouts (folders, archives, shards) give the same samples: same bytes, same tensors for the same
(seed, epoch, index) on both decode paths, same eval counts; shards are WebDataset tars; resize is recorded."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import signal
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from layout_helpers import layout_config, prep_layouts, prepared  # noqa: F401 (a fixture)
from pipeline.core.data_manifest import files_dir, read_manifest, write_manifest
from pipeline.core.distributed import DistEnv
from pipeline.data.loaders import build_val_loader
from pipeline.data.sources import data_provenance, layout_classes, open_split
from pipeline.prep.prepare import prepare
from test_device_decode import decoded_batches
from train_helpers import (assert_same_weights, checkpoint_weights, read_rows, run_module, start_module, tiny_argv,
                           wait_for_line)


def sources(dirs, split):
    return {layout: open_split(layout, d, split, layout_classes(d, layout)) for layout, d in dirs.items()}


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_layout_reads_the_same_bytes_and_labels_in_the_same_order(prepared, split):
    _, dirs = prepared
    found = sources(dirs, split)
    folders = found["folders"]
    assert len(folders) == (64 if split == "train" else 23)  # val: 24 minus the missing one; the unlabelled is left out
    for layout in ("archives", "shards"):
        source = found[layout]
        assert np.array_equal(source.labels, folders.labels)
        assert [source.read(i) for i in range(len(source))] == [folders.read(i) for i in range(len(folders))]
        assert source.describe(0).endswith(folders.describe(0).rsplit("/", 1)[1])  # names the image


@pytest.mark.parametrize("decode", ["cpu", "device"])
@pytest.mark.parametrize("train", [True, False])
def test_the_same_seed_epoch_and_index_give_the_same_tensor_from_every_layout(prepared, decode, train):
    archives, dirs = prepared
    batches = {layout: decoded_batches(layout_config(d, archives, layout, "--decode", decode), train=train, epoch=1)
               for layout, d in dirs.items()}
    reference = batches["folders"]
    assert sum(len(t) for _, t in reference) == (64 if train else 23)
    for layout in ("archives", "shards"):
        assert len(batches[layout]) == len(reference)
        for (images, targets), (ref_images, ref_targets) in zip(batches[layout], reference):
            assert torch.equal(targets, ref_targets) and torch.equal(images, ref_images)


def test_shards_are_webdataset_tars_mixing_the_classes_and_listed_in_the_manifest(prepared):
    _, dirs = prepared
    manifest = read_manifest(dirs["shards"])
    assert manifest.layout == "shards" and manifest.extra["resize"] is None
    train_shards = [f for f in manifest.files if f.name.startswith("train-")]
    assert len(train_shards) >= 1 and all(f.size == (files_dir(dirs["shards"], manifest) / f.name).stat().st_size
                                          for f in manifest.files)
    folders = open_split("folders", dirs["folders"], "train", layout_classes(dirs["folders"], "folders"))
    by_name = {folders.describe(i).rsplit("/", 1)[1].split(".")[0]: (folders.read(i), int(folders.labels[i]))
               for i in range(len(folders))}
    seen, labels_in_order = {}, []
    for entry in train_shards:
        with tarfile.open(files_dir(dirs["shards"], manifest) / entry.name) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                seen.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for key, parts in seen.items():
        data, label = by_name[key]
        assert parts == {"jpg": data, "cls": str(label).encode()}
        labels_in_order.append(label)
    assert len(seen) == len(by_name)
    assert labels_in_order != sorted(labels_in_order)  # the seeded order mixes the classes


def test_shards_reencoded_at_a_max_side_are_smaller_and_recorded(tmp_path):
    archives, dirs = prep_layouts(tmp_path, layouts=("shards",), num_classes=2, train_per_class=4, val_per_class=2,
                                  missing_val=(), unlabelled_val=0)
    cfg = layout_config(tmp_path / "small", archives, "shards", "--shard-max-side", "20", "--shard-quality", "80")
    prepare(cfg)
    small = open_split("shards", tmp_path / "small", "train", layout_classes(tmp_path / "small", "shards"))
    full = open_split("shards", dirs["shards"], "train", layout_classes(dirs["shards"], "shards"))
    sizes = [Image.open(io.BytesIO(small.read(i))).size for i in range(len(small))]
    assert all(max(size) == 20 for size in sizes) and np.array_equal(small.labels, full.labels)
    assert [Image.open(io.BytesIO(full.read(i))).size for i in range(len(full))] != sizes
    assert read_manifest(tmp_path / "small").extra["resize"] == {"max_side": 20, "quality": 80}
    assert json.loads((tmp_path / "small" / "prep_report.json").read_text())["resize"]["max_side"] == 20
    assert data_provenance(cfg) == {"data_layout": "shards", "data_resize": {"max_side": 20, "quality": 80}}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["archives", "shards"])
def test_a_mid_epoch_resume_on_a_packed_layout_equals_an_uninterrupted_run_and_eval_agrees(tmp_path, layout):
    """As tests/test_device_decode.py's resume test, on archives and shards; eval counts equal those from folders."""
    archives, dirs = prep_layouts(tmp_path, layouts=(layout,))
    runs = {}
    for name in ("whole", "resumed"):
        runs[name] = tmp_path / name
        argv = tiny_argv(dirs[layout], runs[name], "--epochs", "2", "--resume", "auto", "--layout", layout)
        if name == "resumed":
            proc = start_module("jobs.train", argv)
            wait_for_line(proc, "Epoch: [1] [3/8]")
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=60) == 0
        done = run_module("jobs.train", argv)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(checkpoint_weights(runs["whole"] / "checkpoints" / "latest.pt"),
                        checkpoint_weights(runs["resumed"] / "checkpoints" / "latest.pt"))
    compared = ("epoch", "steps", "train_loss", "val_top1_correct", "val_top5_correct", "val_total")
    rows = {name: [{k: r[k] for k in compared} for r in read_rows(run_dir / "epochs.csv")] for name, run_dir in
            runs.items()}
    assert rows["whole"] == rows["resumed"] and rows["whole"][-1]["val_total"] == "23"
    assert json.loads((runs["whole"] / "provenance.json").read_text())["data_layout"] == layout


def test_loader_workers_open_the_large_files_themselves_and_read_what_one_process_reads(prepared):
    archives, dirs = prepared
    cfg = layout_config(dirs["shards"], archives, "shards", "--workers", "2")
    in_workers = decoded_batches(cfg, train=False)
    reference = decoded_batches(layout_config(dirs["folders"], archives, "folders"), train=False)
    assert all(torch.equal(a, b) and torch.equal(s, t) for (a, s), (b, t) in zip(in_workers, reference))
    loader = build_val_loader(cfg, DistEnv(), torch.device("cpu"))
    assert sum(len(t) for _, t in loader) == 23
    assert loader.dataset.source._fds == {}  # the parent opened nothing its forked workers could share


@pytest.mark.parametrize("layout", ["archives", "shards"])
def test_a_copy_laid_out_as_staging_makes_it_reads_the_same_samples(prepared, tmp_path, layout):
    """The contract with node-local staging: meta files beside manifest.json, the large files under files_root."""
    _, dirs = prepared
    manifest = read_manifest(dirs[layout])
    copy = tmp_path / "staged"
    (copy / "files").mkdir(parents=True)
    for name in manifest.meta:
        shutil.copy(dirs[layout] / name, copy / name)
    for entry in manifest.files:
        shutil.copy(files_dir(dirs[layout], manifest) / entry.name, copy / "files" / entry.name)
    write_manifest(copy, dataclasses.replace(manifest, files_root="files"))
    staged, source = (open_split(layout, d, "val", layout_classes(d, layout)) for d in (copy, dirs[layout]))
    assert [staged.read(i) for i in range(len(staged))] == [source.read(i) for i in range(len(source))]
    assert str(copy / "files") in staged.describe(0)
