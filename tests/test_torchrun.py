"""Two processes under a real torchrun with gloo: training records, exact eval, preemption and exact resume.

The data: 3 classes x (16 train, 5 val) images, so each of the 2 ranks trains on 24 images (3 steps of 8)
and the 15 val images do not divide among the ranks.
"""
from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from jobs.torchrun import child_pids
from pipeline.eval.evaluate import evaluate
from pipeline.core.checkpoint_file import load_checkpoint
from train_helpers import (assert_same_weights, checkpoint_weights, read_rows, run_module, start_module,
                           tiny_argv, tiny_config, tiny_data, wait_for_line)

pytestmark = pytest.mark.slow
VAL_SIZE = 15


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"), num_classes=3, train_per_class=16, val_per_class=5)


@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("torchrun")
    done = run_module("jobs.train", tiny_argv(data_dir, run_dir, "--epochs", "2"), nproc=2)
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir, done.stderr


def test_two_processes_train_and_record_with_world_size_2(two_process_run):
    run_dir, log = two_process_run
    rows = read_rows(run_dir / "epochs.csv")
    assert [(r["epoch"], r["steps"], r["world_size"], r["val_total"]) for r in rows] == \
        [("0", "3", "2", str(VAL_SIZE)), ("1", "6", "2", str(VAL_SIZE))]
    for row in rows:
        assert float(row["img_per_s_all_ranks"]) == pytest.approx(2 * float(row["img_per_s_per_rank"]), rel=1e-3)
    assert "rank 1] INFO pipeline.core.distributed: joined process group: backend=gloo rank=1/2" in log
    assert "Epoch: [1] [3/3]" in log and "Traceback" not in log
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["world_size"] == 2
    assert provenance["rank_hosts"] == [socket.gethostname()] * 2 and provenance["hosts"] == [socket.gethostname()]


def test_two_process_eval_counts_every_val_image_once_as_the_training_validation_did(two_process_run, data_dir,
                                                                                     tmp_path):
    run_dir, _ = two_process_run
    best = run_dir / "checkpoints" / "best.pt"
    single = evaluate(tiny_config(data_dir, tmp_path / "single", "--checkpoint", str(best)))
    done = run_module("jobs.eval", tiny_argv(data_dir, run_dir), nproc=2)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["total"] == VAL_SIZE and record["world_size"] == 2
    assert (record["top1_correct"], record["top5_correct"]) == (single["top1_correct"], single["top5_correct"])
    assert f"top1_correct={record['top1_correct']} top5_correct={record['top5_correct']} total={VAL_SIZE} Acc@1" \
        in done.stderr
    # best.pt is the first epoch of the highest val Acc@1; its validation during training used the BatchNorm
    # statistics of every rank, which must be rank 0's, the ones saved, for the figures to be the checkpoint's
    best_row = max(read_rows(run_dir / "epochs.csv"), key=lambda row: float(row["val_acc1"]))
    assert (int(best_row["val_top1_correct"]), int(best_row["val_top5_correct"])) == \
        (record["top1_correct"], record["top5_correct"])
    assert float(best_row["val_loss"]) == pytest.approx(record["loss"], abs=1e-6)  # the csv keeps 6 decimals


def worker_with_rank(torchrun_pid: int, rank: int) -> int:
    """The pid of the training process of ``rank`` among torchrun's children (from its environment)."""
    for pid in child_pids(torchrun_pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under torchrun {torchrun_pid}")


def test_sigusr1_to_one_rank_stops_both_and_the_resume_matches_the_uninterrupted_run(two_process_run, data_dir,
                                                                                      tmp_path):
    reference, _ = two_process_run
    run_dir = tmp_path / "run"
    argv = tiny_argv(data_dir, run_dir, "--epochs", "2", "--resume", "auto", "--workers", "1")
    proc = start_module("jobs.train", argv, nproc=2)
    wait_for_line(proc, "Epoch: [1] [1/3]")
    rank1 = worker_with_rank(proc.pid, 1)
    os.kill(rank1, signal.SIGUSR1)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, rest[-4000:]
    assert "rank 1] WARNING pipeline.train.preemption: received SIGUSR1" in rest
    stopped = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert stopped["epoch"] == 1 and 1 <= stopped["step_in_epoch"] <= 3 and len(stopped["rng"]) == 2
    assert len(read_rows(run_dir / "epochs.csv")) == 1

    resumed = run_module("jobs.train", argv, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_weights(checkpoint_weights(run_dir / "checkpoints" / "latest.pt"),
                        checkpoint_weights(reference / "checkpoints" / "latest.pt"))
    compared = ("epoch", "steps", "train_loss", "train_acc1", "val_top1_correct", "val_total")
    assert [{k: r[k] for k in compared} for r in read_rows(run_dir / "epochs.csv")] == \
        [{k: r[k] for k in compared} for r in read_rows(reference / "epochs.csv")]
