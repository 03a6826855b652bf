"""Batches between the loader workers and the model: one shared buffer per device-path batch, workers that let a
failing process exit, and the look-ahead that prepares the next input while a step runs."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.core.config import Config
from pipeline.core.distributed import DistEnv
from pipeline.core.precision import setup_precision
from pipeline.data.device_decode import EncodedBatch
from pipeline.data.loaders import build_train_loader, device_batcher
from pipeline.data.prefetch import DeviceInputs
from pipeline.prep.synthetic import make_image_folder
from train_helpers import REPO_ROOT, subprocess_env

CPU = torch.device("cpu")


def run_with_train_loader(data_dir, loop: str, *, batch_size: int, timeout: float = 120,
                          open_files: int | None = None) -> subprocess.CompletedProcess:
    """``loop`` over ``loader`` (a device-path train loader, 2 workers) in a fresh interpreter, optionally under
    ``ulimit -n open_files``; a hang fails at ``timeout``."""
    limit = f"resource.setrlimit(resource.RLIMIT_NOFILE, ({open_files}, {open_files}))" if open_files else ""
    code = textwrap.dedent(f"""
        import resource
        import torch
        from pipeline.core.config import Config
        from pipeline.core.distributed import DistEnv
        from pipeline.data.loaders import build_train_loader
        {limit}
        cfg = Config()
        cfg.data.data_dir, cfg.data.decode, cfg.data.workers, cfg.train.batch_size = {str(data_dir)!r}, "device", 2, {batch_size}
        loader, sampler = build_train_loader(cfg, DistEnv(), torch.device("cpu"), seed=0)
        sampler.set_epoch(0)
    """) + textwrap.dedent(loop)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def device_config(data_dir, *, batch_size: int, workers: int) -> Config:
    cfg = Config()
    cfg.data.data_dir, cfg.data.decode, cfg.data.workers = str(data_dir), "device", workers
    cfg.data.train_crop_size, cfg.data.val_resize_size, cfg.data.val_crop_size = 24, 28, 24
    cfg.train.batch_size = batch_size
    return cfg


def test_a_device_batch_reaches_the_training_process_as_one_buffer_and_one_table(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=16, val_per_class=1, size=(40, 32))
    loader, sampler = build_train_loader(device_config(data_dir, batch_size=16, workers=1), DistEnv(), CPU, seed=0)
    sampler.set_epoch(0)
    batch, labels = next(iter(loader))
    assert isinstance(batch, EncodedBatch) and len(batch) == len(labels) == 16
    tensors = [value for value in vars(batch).values() if isinstance(value, torch.Tensor)]
    assert len(tensors) == 2  # bytes and the per-sample table: two descriptors per batch, not one per image
    first = batch.payload(0)
    assert first.untyped_storage().data_ptr() == batch.data.untyped_storage().data_ptr()  # a view, not a copy
    assert bytes(first[:2].tolist()) == b"\xff\xd8"  # a JPEG's start-of-image marker


def test_device_batches_of_128_train_under_a_low_open_file_limit(tmp_path):
    """One tensor per image crossed as one descriptor per image: 2 workers x 2 prefetched batches x 128 images ran
    out of descriptors under ``ulimit -n 300`` where the CPU path trained."""
    data_dir = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=320, val_per_class=1, size=(24, 20),
                                 vary_size=False)
    done = run_with_train_loader(data_dir, """
        alive = [batch for batch, _ in loader]  # every batch of the epoch held at once
        print("batches", len(alive), "images", sum(len(batch) for batch in alive))
    """, batch_size=128, open_files=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batches 5 images 640" in done.stdout


def test_a_script_that_raises_inside_a_loop_with_live_loader_workers_exits(tmp_path):
    """The workers ignore SIGTERM (a scheduler's stop reaches the whole process group), which multiprocessing's exit
    handler sends them before waiting for them: the process hung for good."""
    data_dir = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=8, val_per_class=1, size=(24, 20))
    done = run_with_train_loader(data_dir, """
        for batch in loader:
            raise RuntimeError("the step failed")
    """, batch_size=2, timeout=60)
    assert done.returncode == 1 and "RuntimeError: the step failed" in done.stderr
    assert "killed by signal" not in done.stderr  # the workers' end at exit is not reported as a crash


def test_the_next_input_is_prepared_when_one_is_handed_over_under_the_same_keys(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=8, val_per_class=1, size=(40, 32))
    cfg = device_config(data_dir, batch_size=4, workers=0)
    cfg.data.mixup_alpha = 0.4  # the mix is drawn per (epoch, index): the look-ahead must keep each batch's key
    loader, sampler = build_train_loader(cfg, DistEnv(), CPU, seed=0)
    sampler.set_epoch(1)
    to_device = device_batcher(cfg, setup_precision(CPU, "none", False), mix_classes=2)
    expected = [to_device(images, targets, batch_key=(1, 5 + i)) for i, (images, targets) in enumerate(loader)]

    drawn = []

    def counted():
        for batch in loader:
            drawn.append(len(batch[1]))
            yield batch

    inputs = DeviceInputs(counted(), to_device, CPU, ((1, 5 + i) for i in range(100)))
    got = []
    for images, targets in inputs:
        assert len(drawn) == min(len(got) + 2, len(expected))  # this batch and the next one are drawn already
        got.append((images, targets))
    assert len(got) == len(expected) == 4
    for (a, ta), (b, tb) in zip(expected, got):
        assert torch.equal(a, b) and torch.equal(ta, tb)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_inputs_prepared_on_a_side_stream_equal_the_same_batches_made_on_the_training_stream(tmp_path, decode):
    """The look-ahead on its own stream hands over exactly what the training stream would have made, while the
    training stream is kept busy (the hand-over must wait for the side stream, and memory must not be reused)."""
    cuda = torch.device("cuda", 0)
    data_dir = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=32, val_per_class=1, size=(96, 80))
    cfg = device_config(data_dir, batch_size=8, workers=2)
    cfg.data.decode, cfg.data.mixup_alpha = decode, 0.4
    to_device = device_batcher(cfg, setup_precision(cuda, "none", False), mix_classes=2)
    loader, sampler = build_train_loader(cfg, DistEnv(), cuda, seed=0)
    sampler.set_epoch(0)
    expected = [to_device(images, targets, batch_key=(0, i)) for i, (images, targets) in enumerate(loader)]
    busy = torch.randn(4096, 4096, device=cuda)
    got = []
    for images, targets in DeviceInputs(loader, to_device, cuda, ((0, i) for i in range(100))):
        for _ in range(4):
            busy = busy @ busy / busy.norm()  # the "step": long work on the training stream
        got.append((images.clone(), targets.clone()))
    assert len(got) == len(expected) == 8
    for (a, ta), (b, tb) in zip(expected, got):
        assert torch.equal(a, b) and torch.equal(ta, tb)
