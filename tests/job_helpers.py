"""Shared by the tests of what runs inside a job: a stage's job run through the launcher's own local executor."""
from __future__ import annotations

import dataclasses
import io
import textwrap
import threading
from pathlib import Path
from typing import Any

from jobs.stages import stage_job
from launcher.backends import get_backend
from launcher.follow import StageFailed, Submitted, follow
from pipeline.core.config import Config


def write_module(folder: Path, name: str, body: str) -> str:
    """A worker module in ``folder`` (put it on PYTHONPATH), for ``TorchrunJob(module=...)`` or ``--model``."""
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def job_config(tmp_path: Path, nproc: int = 2, **launch_fields: Any) -> Config:
    """A CPU job of ``nproc`` processes on one node, run dir ``tmp_path/run``."""
    cfg = Config()
    cfg.train = dataclasses.replace(cfg.train, run_dir=str(tmp_path / "run"), device="cpu")
    cfg.launch = dataclasses.replace(cfg.launch, gpus_per_node=nproc, **launch_fields)
    return cfg


def submit_local(cfg: Config, job: Any, stage: str = "train") -> Submitted:
    local = get_backend("local")
    executor = local.executor(cfg, local.parameters(cfg, stage))
    return Submitted(stage, executor.submit(job), "local")


def submit_stage(cfg: Config, stage: str = "train") -> Submitted:
    """What ``launch.py --stage STAGE --executor local`` submits for ``cfg``."""
    return submit_local(cfg, stage_job(stage, cfg, [cfg.train.run_dir]), stage)


def follow_to_end(sub: Submitted, bound_s: float = 600) -> tuple[list[Any] | StageFailed, str]:
    """The job's results (or its StageFailed) and everything its log said; the job is cancelled after ``bound_s``
    (the test then fails on what it got)."""
    out = io.StringIO()
    timer = threading.Timer(bound_s, sub.job.cancel)
    timer.start()
    try:
        result: list[Any] | StageFailed = follow(sub, out, poll_s=0.5)
    except StageFailed as exc:
        result = exc
    finally:
        timer.cancel()
        sub.job.cancel()  # nothing left running if the test fails
    return result, out.getvalue()
