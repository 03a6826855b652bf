"""SIGTERM to the whole process group, as Slurm sends it at preemption or scancel: the loader workers get it too,
and the run still saves mid-epoch and stops as preempted instead of failing on a dead worker."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from pipeline.core.records import RUN_STATE_FILE
from pipeline.core.checkpoint_file import load_checkpoint
from train_helpers import REPO_ROOT, module_command, subprocess_env, tiny_argv, tiny_data


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_stops_as_preempted(tmp_path):
    data_dir = tiny_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    argv = tiny_argv(data_dir, run_dir, "--epochs", "3", "--workers", "2", "--resume", "auto")
    proc = subprocess.Popen(module_command("jobs.train", argv, 0), env=subprocess_env(), cwd=REPO_ROOT,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    assert proc.stderr is not None
    log = []
    for line in proc.stderr:
        log.append(line)
        if "Epoch: [1] [2/8]" in line:
            os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its two loader workers alike
            break
    log += proc.stderr.readlines()
    assert proc.wait(timeout=60) == 0, "".join(log[-30:])
    assert json.loads((run_dir / RUN_STATE_FILE).read_text())["state"] == "preempted"
    saved = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert saved["epoch"] == 1 and saved["step_in_epoch"] == 8  # the first agreement after the signal
    assert not any("killed by signal" in line for line in log)
