"""``launch.py --stage train --resume PATH``: the job trains on from PATH; a requeue keeps what the job saved."""
from __future__ import annotations

import argparse
import os
import time

import pytest
import torch

from jobs.resume import resume_for_this_start
from launch_helpers import no_slurm_path, run_main  # noqa: F401 (a fixture)
from pipeline.core.config import load_config
from pipeline.train.trainer import train
from train_helpers import TINY_FLAGS, read_rows, tiny_config, tiny_data


@pytest.mark.slow
def test_a_train_job_given_resume_path_trains_on_from_that_checkpoint(no_slurm_path, tmp_path, capsys):
    data = tiny_data(tmp_path / "data")
    train(tiny_config(data, tmp_path / "first", "--epochs", "1"))
    path = tmp_path / "first" / "checkpoints" / "latest.pt"
    run_dir = tmp_path / "second"
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "local", "--data-dir", data,
                              "--run-dir", run_dir, *TINY_FLAGS, "--epochs", 2, "--resume", path)
    assert code == 0, out[-3000:] + err
    assert load_config(run_dir / "config.toml").train.resume == str(path)
    assert [row["epoch"] for row in read_rows(run_dir / "epochs.csv")] == ["1"]  # epoch 0 came from PATH
    assert f"resumed from {path}" in out


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"not a checkpoint\n", "not a checkpoint (not a zip archive, as torch.save writes)"),
    ({"conv.weight": torch.zeros(2)}, "is not a training checkpoint of this pipeline (missing ['model'"),
])
def test_a_resume_path_that_is_not_a_checkpoint_is_one_line_before_anything_is_submitted(
        content, message, no_slurm_path, tmp_path, capsys):
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    (tmp_path / "data").mkdir()
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "local", "--data-dir", tmp_path / "data",
                              "--run-dir", tmp_path / "run", "--resume", path)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert str(path) in err
    assert not (tmp_path / "run").exists()


def test_a_requeued_job_resumes_from_what_it_saved_once_it_saved_something(tmp_path):
    """Before the job saves, a requeue starts from PATH again; after, from the run's newest checkpoint; a new job
    (a new job id, its own folder) from PATH, as asked."""
    path = tmp_path / "elsewhere.pt"
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", "--resume", str(path))
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"from an earlier run")
    os.utime(latest, (time.time() - 3600,) * 2)
    job_dir = tmp_path / "run" / "logs" / "42"
    assert resume_for_this_start(cfg, job_dir).train.resume == str(path)  # first start
    assert resume_for_this_start(cfg, job_dir).train.resume == str(path)  # requeued before any save
    saved_ns = (job_dir / "first_start").stat().st_mtime_ns + 1
    os.utime(latest, ns=(saved_ns, saved_ns))  # the job saved
    assert resume_for_this_start(cfg, job_dir).train.resume == "auto"
    time.sleep(0.05)  # past the file system's clock tick
    assert resume_for_this_start(cfg, tmp_path / "run" / "logs" / "43").train.resume == str(path)


def test_a_torchrun_restart_resumes_from_what_the_job_saved_not_from_path_again(tmp_path, monkeypatch):
    """torchrun restarts the processes with the same config file (resume = PATH); once the job has saved, the
    restart resumes from the run's own checkpoint, as a requeue does."""
    from jobs.train import for_this_attempt

    path = tmp_path / "elsewhere.pt"
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", "--resume", str(path))
    job_dir = tmp_path / "run" / "logs" / "42"
    args = argparse.Namespace(config=str(job_dir / "train_config.toml"))
    assert resume_for_this_start(cfg, job_dir).train.resume == str(path)  # the job's first start
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"saved by attempt 0")
    saved_ns = (job_dir / "first_start").stat().st_mtime_ns + 1
    os.utime(latest, ns=(saved_ns, saved_ns))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert for_this_attempt(cfg, args).train.resume == str(path)  # attempt 0 itself: PATH
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert for_this_attempt(cfg, args).train.resume == "auto"  # a restart: what the job saved
