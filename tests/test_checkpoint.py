"""Checkpoints: atomic under a real SIGKILL, weights-only loads, the newest valid one for --resume auto."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline.core.checkpoint_file import CheckpointError, load_checkpoint, save_checkpoint

from pipeline.train.checkpoint import capture_rng_state, config_digest, newest_valid_checkpoint, restore_rng_state
from pipeline.core.config import Config
from pipeline.train.trainer import train
from train_helpers import REPO_ROOT, read_rows, subprocess_env, tiny_config, tiny_data


def minimal_state(epoch: int, weight: torch.Tensor | None = None) -> dict:
    return {"model": {"w": torch.full((4,), float(epoch)) if weight is None else weight}, "model_name": "m",
            "num_classes": 4, "epoch": epoch, "step_in_epoch": 0, "global_step": 10 * epoch}


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    state = capture_rng_state(torch.device("cpu"))
    expected = draws()
    torch.save(state, tmp_path / "rng.pt")
    draws()  # move every generator on
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    assert draws() == expected


def test_a_failed_save_leaves_the_previous_file_whole_and_no_temporary(tmp_path):
    path = tmp_path / "latest.pt"
    save_checkpoint(minimal_state(1), path)
    broken = minimal_state(2, weight=torch.zeros(1_000_000))
    broken["unpicklable"] = lambda: None  # torch.save fails after writing part of the file
    with pytest.raises(Exception):
        save_checkpoint(broken, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


SAVE_LOOP = """
import sys, torch
from pipeline.core.checkpoint_file import save_checkpoint
for epoch in range(1, 1000):
    state = {"model": {"w": torch.full((8_000_000,), float(epoch))}, "model_name": "m", "num_classes": 4,
             "epoch": epoch, "step_in_epoch": 0, "global_step": epoch}
    save_checkpoint(state, sys.argv[1])
    print(epoch, flush=True)
"""


def test_a_process_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "latest.pt"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path)], env=subprocess_env(), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = int(proc.stdout.readline())
    time.sleep(0.15)  # 32 MB per save: likely in the middle of one
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    state = load_checkpoint(path)
    assert state["epoch"] >= first
    assert torch.equal(state["model"]["w"], torch.full((8_000_000,), float(state["epoch"])))
    found = newest_valid_checkpoint(tmp_path)
    assert found is not None and found[0] == path


def test_resume_auto_skips_a_corrupt_newest_checkpoint(tmp_path, capsys):
    data_dir = tiny_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "1", "--save-every", "1"))
    folder = run_dir / "checkpoints"
    latest = folder / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a full disk
    future = time.time() + 60
    os.utime(latest, (future, future))  # and the newest
    (folder / ".latest.pt.x1.tmp").write_bytes(b"left by a killed save")

    result = train(tiny_config(data_dir, run_dir, "--epochs", "2", "--resume", "auto"))
    assert result["finished"]
    err = capsys.readouterr().err
    assert f"skipping checkpoint: checkpoint {latest} is corrupt or truncated" in err
    assert "resumed from" in err and "epoch 1, 0 of its 8 batches done" in err
    assert [r["epoch"] for r in read_rows(run_dir / "epochs.csv")] == ["0", "1"]
    assert load_checkpoint(latest)["epoch"] == 2
    assert not list(folder.glob(".*.tmp"))


class NotAllowed:
    """Any class outside torch's weights-only allow list: loading it would run arbitrary code."""


@pytest.mark.parametrize("content, message", [
    (b"not a zip or pickle", "is corrupt or truncated"),
    ({"conv.weight": torch.zeros(2)}, "is not a training checkpoint of this pipeline"),
    ({**minimal_state(1), "extra": NotAllowed()}, "is corrupt or truncated"),
    (None, "does not exist"),
])
def test_loading_refuses_what_is_not_a_safe_checkpoint(tmp_path, content, message):
    path = tmp_path / "c.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_newest_valid_checkpoint_is_none_in_an_empty_run_dir(tmp_path):
    assert newest_valid_checkpoint(tmp_path) is None


def test_config_digest_follows_the_recipe_not_the_machinery():
    base = Config()
    changed_machinery, changed_recipe = Config(), Config()
    changed_machinery.data.workers, changed_machinery.train.run_dir = 16, "elsewhere"
    changed_recipe.optim.lr = 0.2
    assert config_digest(base) == config_digest(changed_machinery)
    assert config_digest(base) != config_digest(changed_recipe)
