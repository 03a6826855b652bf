"""Gradient accumulation (--accum-steps): batch b x accum_steps k trains as one batch of k x b, on one process and
under a real torchrun; a stop inside a window resumes exactly."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from pipeline.core.checkpoint_file import load_checkpoint
from pipeline.core.config import ConfigError, OptimConfig
from pipeline.core.distributed import DistEnv
from pipeline.core.validate import validate
from pipeline.prep.prepare import prepare
from pipeline.report.build import report
from pipeline.prep.synthetic import make_imagenet_archives
from pipeline.train.optim import build_scheduler
from pipeline.train.state import TrainingState
from pipeline.train.trainer import train
from train_helpers import (checkpoint_weights, interrupted_and_resumed, read_rows, run_module, tiny_argv, tiny_config,
                           tiny_data)

BN_FREE = ("--model", "tests.train_helpers:bn_free_net")  # BatchNorm's statistics per batch would tell the two apart


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"), train_per_class=20)  # 80 images: 2 batches of 32, 5 of 16


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_two_batches_of_16_accumulated_train_as_one_batch_of_32(data_dir, tmp_path):
    """The 5th batch of 16 (no whole window) is left out, as drop_last leaves out the 3rd of 32: 2 steps an epoch."""
    whole = tmp_path / "whole"
    train(tiny_config(data_dir, whole, *BN_FREE, "--epochs", "2", "--batch-size", "32", "--lr", "0.5"))
    accumulated = tmp_path / "accumulated"
    result = train(tiny_config(data_dir, accumulated, *BN_FREE, "--epochs", "2", "--batch-size", "16",
                               "--grad-accum-steps", "2", "--lr-base", "0.25", "--lr-base-batch", "16",
                               "--ema-decay", "0.5"))  # lr 0.25 x 32 / 16: the global batch counts accumulation
    assert result["global_step"] == 4  # optimizer steps: 2 epochs x 2
    assert_close_weights(checkpoint_weights(accumulated / "checkpoints" / "latest.pt"),
                         checkpoint_weights(whole / "checkpoints" / "latest.pt"))
    state = load_checkpoint(accumulated / "checkpoints" / "latest.pt")
    assert state["scheduler"]["last_epoch"] == 4 and int(state["ema"]["n_averaged"]) == 4
    rows, reference = read_rows(accumulated / "epochs.csv"), read_rows(whole / "epochs.csv")
    assert [r["steps"] for r in rows] == [r["steps"] for r in reference] == ["2", "4"]
    assert [r["val_top1_correct"] for r in rows] == [r["val_top1_correct"] for r in reference]
    assert load_checkpoint(whole / "checkpoints" / "latest.pt")["accum_steps"] == 1
    assert 'accum_steps = 2' in (accumulated / "config.toml").read_text()
    assert report([accumulated, whole], echo=False).summary["accum_steps"].tolist() == [2, 1]
    provenance = json.loads((accumulated / "provenance.json").read_text())
    assert (provenance["peak_lr"], provenance["global_batch"], provenance["accum_steps"]) == (0.5, 32, 2)


def test_an_epoch_without_a_whole_window_is_refused_in_one_line(data_dir, tmp_path):
    """In the job, by the trainer from the loader's length; before it, by the validation from a prepared data dir's
    report (16 images)."""
    with pytest.raises(ConfigError, match=r"accum_steps \(--accum-steps\) = 6 batches per optimizer step, but an "
                                          r"epoch has 5 batch\(es\) per process"):
        train(tiny_config(data_dir, tmp_path / "run", *BN_FREE, "--batch-size", "16", "--accum-steps", "6"))
    make_imagenet_archives(tmp_path / "archives", num_classes=2, train_per_class=8, val_per_class=2)
    prepared = tmp_path / "prepared"
    prepare(tiny_config(prepared, tmp_path / "run", "--archive-dir", str(tmp_path / "archives"), "--skip-checksum"))
    validate(tiny_config(prepared, tmp_path / "run", "--batch-size", "4", "--accum-steps", "4"), stages=["train"])
    with pytest.raises(ConfigError, match=r"accum_steps \(--accum-steps\) = 5 batches of 4 make a step of 20 "
                                          r"images per process, more than the 16 each of the 1 processes gets"):
        validate(tiny_config(prepared, tmp_path / "run", "--batch-size", "4", "--accum-steps", "5"), stages=["train"])


@pytest.mark.parametrize("saved, now, expected", [
    ((1, 8, 3, 24), (2, 8, 3, 36), (12, 4)),  # 24 x 8 = 192 images: 2 processes x 8 x 3 = 48 a step, 4 steps
    ((2, 8, 1, 10), (1, 8, 4, 38), (20, 5)),  # 160 images: 32 a step, 5 steps = 20 batches
    ((1, 4, 2, 6), (1, 4, 4, 36), (4, 1)),  # 24 images: 16 a step, 1 whole step = 4 batches (8 images redone)
])
def test_a_resume_on_another_sharding_starts_at_the_whole_window_of_the_images_done(data_dir, tmp_path, saved,
                                                                                    now, expected):
    """(world size, batch, accum_steps, batches done) of the checkpoint and of the resumed run (with its batches per
    epoch): the resumed run's (batches done, optimizer steps done) of epoch 1."""
    world, batch, accum, batches = now
    cfg = tiny_config(data_dir, tmp_path, "--batch-size", str(batch), "--accum-steps", str(accum))
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, OptimConfig(), epochs=90, steps_per_epoch=batches // accum)
    state = TrainingState(cfg, DistEnv(world_size=world), torch.device("cpu"), SimpleNamespace(scheduler=scheduler),
                          4, batches, "digest")
    state.position.epoch, state.position.step_in_epoch = 1, saved[3]
    state.convert_position(dict(zip(("world_size", "batch_size", "accum_steps"), saved[:3])))
    steps = batches // accum + expected[1]  # epoch 0's and the steps of epoch 1 done
    assert (state.position.step_in_epoch, state.position.global_step, scheduler.last_epoch) == (*expected[:1], steps,
                                                                                                steps)


def test_a_resume_on_a_larger_global_batch_goes_on_at_the_lr_derived_for_it(data_dir, tmp_path):
    """lr_base 0.1 for 32 images: 0.025 at batch 8; resumed at batch 16, the schedule goes on from 0.05, the lr
    config.toml and provenance.json record, not from the checkpoint's 0.025."""
    flags = ("--lr-base", "0.1", "--lr-base-batch", "32", "--scheduler", "step", "--lr-step-size", "30")
    train(tiny_config(data_dir, tmp_path, *flags, "--epochs", "1"))
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["scheduler"]["base_lrs"][0] == 0.025
    train(tiny_config(data_dir, tmp_path, *flags, "--epochs", "2", "--batch-size", "16", "--resume", "auto"))
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert state["scheduler"]["base_lrs"] == [0.05] * len(state["optimizer"]["param_groups"])
    assert {group["initial_lr"] for group in state["optimizer"]["param_groups"]} == {0.05}
    assert json.loads((tmp_path / "provenance.json").read_text())["peak_lr"] == 0.05


@pytest.mark.slow
def test_two_processes_accumulating_train_as_one_process_with_the_global_batch(data_dir, tmp_path):
    """torchrun, 2 processes x 8 images x 2 batches a step = 32 images a step, as one process with batch 32."""
    whole = tmp_path / "whole"
    train(tiny_config(data_dir, whole, *BN_FREE, "--epochs", "1", "--batch-size", "32", "--lr", "0.5"))
    run_dir = tmp_path / "ddp"
    done = run_module("jobs.train", tiny_argv(data_dir, run_dir, *BN_FREE, "--epochs", "1", "--batch-size", "8",
                                              "--accum-steps", "2", "--lr", "0.5"), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "an optimizer step takes 2 batch(es) per process: 32 images, 2 steps per epoch" in done.stderr
    assert_close_weights(checkpoint_weights(run_dir / "checkpoints" / "latest.pt"),
                         checkpoint_weights(whole / "checkpoints" / "latest.pt"))
    [row] = read_rows(run_dir / "epochs.csv")
    assert (row["steps"], row["world_size"]) == ("2", "2")


@pytest.mark.slow
def test_a_stop_inside_a_window_resumes_exactly(data_dir, tmp_path):
    """SIGUSR1 after the 1st batch of a 3-batch window: the run stops at a window's end (the stop is agreed at the
    first window's end after every 8 batches, here every 2 windows: batch 6, 12, ..., or 39 at the epoch's end), and
    the resumed run ends with the uninterrupted run's weights, bit for bit."""
    flags = ("--epochs", "1", "--batch-size", "2", "--accum-steps", "3", "--resume", "auto")  # 13 windows an epoch
    stopped, reference = interrupted_and_resumed(data_dir, tmp_path, flags, "Epoch: [0] [ 4/39]")  # a 2nd window's 1st
    assert stopped["epoch"] == 0 and stopped["step_in_epoch"] in (*range(6, 39, 6), 39)
    assert stopped["global_step"] == stopped["scheduler"]["last_epoch"] == stopped["step_in_epoch"] // 3
    assert [r["train_loss"] for r in read_rows(tmp_path / "run" / "epochs.csv")] == \
        [r["train_loss"] for r in read_rows(reference / "epochs.csv")]
