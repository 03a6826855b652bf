"""Shared by the train/eval/checkpoint/torchrun tests: tiny data, tiny runs, real subprocesses."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from jobs.common import get_args_parser
from pipeline.core.config import Config, config_from_args
from pipeline.prep.synthetic import make_image_folder

REPO_ROOT = Path(__file__).resolve().parents[1]

# resnet18 on 32 px crops, 8 images per step: 64 train images are 8 steps per epoch (one process).
TINY_FLAGS = ("--model", "resnet18", "--batch-size", "8", "--workers", "0", "--lr", "0.05",
              "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32",
              "--device", "cpu", "--print-freq", "1", "--save-every", "100")


def tiny_data(root: Path, **kwargs) -> Path:
    """4 classes x (16 train, 6 val) JPEGs unless told otherwise."""
    return make_image_folder(root, **kwargs)


def tiny_argv(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--run-dir", str(run_dir), *TINY_FLAGS, *extra]


def tiny_config(data_dir: Path, run_dir: Path, *extra: str) -> Config:
    """The Config the command line would give, so in-process and subprocess runs agree."""
    return config_from_args(get_args_parser("test").parse_args(tiny_argv(data_dir, run_dir, *extra)))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


def module_command(module: str, argv: Sequence[str], nproc: int = 0) -> list[str]:
    """``python -m module argv``, or under torchrun with ``nproc`` processes (standalone rendezvous)."""
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "-m", module, *argv]
    return [sys.executable, "-m", module, *argv]


def run_module(module: str, argv: Sequence[str], nproc: int = 0, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(module_command(module, argv, nproc), env=subprocess_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


def start_module(module: str, argv: Sequence[str], nproc: int = 0) -> subprocess.Popen:
    """A running process whose stderr (the log) is read line by line."""
    return subprocess.Popen(module_command(module, argv, nproc), env=subprocess_env(), cwd=REPO_ROOT,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1)


def wait_for_line(proc: subprocess.Popen, marker: str) -> list[str]:
    """Read the process's log until a line containing ``marker``; fails if it ends first."""
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"process ended (rc {proc.wait()}) before logging {marker!r}:\n{''.join(seen[-30:])}")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def bn_free_net(*, num_classes: int) -> torch.nn.Module:
    """A tiny conv net without BatchNorm or dropout (``--model train_helpers:bn_free_net``): its gradient over a
    batch is the mean of its gradients over the batch's parts, so accumulated and whole batches train alike."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, num_classes))


def interrupted_and_resumed(data_dir: Path, tmp_path: Path, flags: Sequence[str], marker: str) -> tuple[dict, Path]:
    """``jobs.train`` with ``flags`` (which hold --resume auto) once in one go (into tmp_path/reference) and once
    stopped by SIGUSR1 at the log line holding ``marker``, then resumed (tmp_path/run), whose weights must equal
    the reference's; returns the checkpoint the stop saved and the reference dir."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    done = run_module("jobs.train", tiny_argv(data_dir, reference, *flags))
    assert done.returncode == 0, done.stderr[-3000:]
    proc = start_module("jobs.train", tiny_argv(data_dir, run_dir, *flags))
    wait_for_line(proc, marker)
    proc.send_signal(signal.SIGUSR1)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, rest[-3000:]
    stopped = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    resumed = run_module("jobs.train", tiny_argv(data_dir, run_dir, *flags))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(checkpoint_weights(run_dir / "checkpoints" / "latest.pt"),
                        checkpoint_weights(reference / "checkpoints" / "latest.pt"))
    return stopped, reference
