"""Shared by the launcher tests: this machine as one without Slurm, and launch.py's main with its output."""
from __future__ import annotations

import pytest

import launch


@pytest.fixture
def no_slurm_path(tmp_path, monkeypatch):
    """A PATH without sbatch, srun or squeue: this machine as one without Slurm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def run_main(capsys, *argv):
    code = launch.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
