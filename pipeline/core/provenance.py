"""provenance.json: which code, libraries and hardware made a run's numbers (keys in pipeline/core/records.py)."""
from __future__ import annotations

import datetime
import logging
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch
import torchvision

from pipeline.core.accelerator import Accelerator
from pipeline.core.distributed import DistEnv, gather
from pipeline.core.records import read_json

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The checked-out commit, with ``+dirty`` when tracked files changed; 'unknown' outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def all_hostnames() -> list[str]:
    """Every rank's host, in rank order; a collective: all ranks must call it."""
    return gather(socket.gethostname())


def collect_provenance(device: torch.device, env: DistEnv, seed: int, hosts: list[str]) -> dict[str, Any]:
    """The provenance record of this process (rank 0's is the one written); ``hosts`` from all_hostnames()."""
    accelerator = Accelerator.of(device)
    return {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda or "",  # the build's, whatever the device; the device's stack below
        **accelerator.versions(),
        "device_type": device.type,
        "device_name": accelerator.name(),
        "hostname": socket.gethostname(),
        "hosts": sorted(set(hosts)),
        "rank_hosts": hosts,
        "world_size": env.world_size,
        "nodes": env.nodes,
        "seed": seed,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def resumed_provenance(record: dict[str, Any], previous_file: Path) -> dict[str, Any]:
    """This job's record for a resumed run: the run's first ``started_at`` is kept (the run began then), this
    job's start becomes ``resumed_at`` and ``resumes`` counts the jobs that continued the run."""
    try:
        previous = read_json(previous_file, ValueError, "writing a new one") or {}
    except ValueError as exc:
        log.warning("%s", exc)  # a record of the past only: training goes on
        return record
    if "started_at" not in previous:
        return record
    return {**record, "started_at": previous["started_at"], "resumed_at": record["started_at"],
            "resumes": int(previous.get("resumes", 0)) + 1}
