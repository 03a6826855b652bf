"""Every collective that training, validation and eval issue on the gloo path carries a dtype HCCL supports too
(no float64: HCCL reduces none), seen by wrapping torch.distributed in the real processes (dtype_probe/)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from train_helpers import REPO_ROOT, module_command, subprocess_env, tiny_argv, tiny_data

PROBE = Path(__file__).resolve().parent / "dtype_probe"
HCCL_DTYPES = {"torch.int8", "torch.uint8", "torch.int16", "torch.int32", "torch.int64", "torch.float16",
               "torch.float32", "torch.bfloat16", "torch.bool"}


@pytest.mark.slow
def test_training_and_eval_collectives_use_only_dtypes_hccl_supports(tmp_path):
    data_dir = tiny_data(tmp_path / "data")
    env = subprocess_env()
    env.update(DTYPE_PROBE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join([str(PROBE), env["PYTHONPATH"]]))
    for module in ("jobs.train", "jobs.eval"):
        done = subprocess.run(module_command(module, tiny_argv(data_dir, tmp_path / "run", "--epochs", "1"), 2),
                              env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    calls = [line.split() for path in tmp_path.glob("*.txt") for line in path.read_text().splitlines()]
    names = {call[0] for call in calls}
    assert {"all_reduce", "broadcast", "all_gather"} <= names, names  # the probe saw the run's collectives
    assert {dtype for call in calls for dtype in call[1:]} <= HCCL_DTYPES, calls
