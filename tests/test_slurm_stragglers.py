"""A straggler on the real two-node Slurm test cluster: rank 1 (node2) has its data path slowed by a test-only
``sitecustomize`` on PYTHONPATH (sbatch passes the environment on); the follow output and the report name it."""
from __future__ import annotations

import os
import socket
import textwrap

import pytest

from pipeline.core.records import RANKS_FILE
from pipeline.prep.synthetic import make_image_folder
from pipeline.report.build import report
from test_rank_figures import SLOW_RANK_HOOK
from test_slurm import REPO, TINY, launcher, slurm_cluster  # noqa: F401 (fixtures)
from train_helpers import read_rows

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_the_slowed_rank_on_the_second_node_is_named_while_it_runs_and_in_the_report(launcher, tmp_path,
                                                                                       monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SLOW_RANK_HOOK))
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{REPO}")
    data = make_image_folder(tmp_path / "data", num_classes=4, train_per_class=32, val_per_class=2, size=(36, 36))
    run_dir = tmp_path / "run"
    result = launcher("--stage", "train", "--nodes", 2, "--procs-per-node", 1, "--data-dir", data,
                      "--run-dir", run_dir, "--epochs", 1, "--preflight-timeout-s", 0, "--no-tensorboard", *TINY,
                      "--workers", 1, timeout_s=420)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    (job_id,) = launcher.job_ids
    host = socket.gethostname()  # both CI nodes run on this machine
    rows = read_rows(run_dir / RANKS_FILE)
    assert [(r["rank"], r["host"]) for r in rows] == [("0", host), ("1", host)]
    assert f"[train {job_id}] epoch 0: straggler: rank 1 on {host} waited" in result.stdout
    summary = report([run_dir], echo=False).summary.iloc[0]
    assert f"straggler: rank 1 on {host}" in summary["flags"] and summary["nodes_x_procs"] == "2x1"
