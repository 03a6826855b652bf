"""What a train job resumes from: ``--resume PATH`` honoured, ``auto`` where the user named nothing.

A job started with ``--resume PATH`` begins from PATH. When that job starts again (a Slurm requeue after
preemption, a time limit or a node failure: the same job id, so the same ``<run dir>/logs/<job id>/``), the
run's own newest checkpoint wins once it exists, written since the job first started; before that, PATH again.
Starting from PATH on every requeue would throw away what the job trained. A new launch (a new job id) with
``--resume PATH`` begins from PATH again, as asked.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.records import CHECKPOINT_DIR

log = logging.getLogger("jobs.node")

FIRST_START_FILE = "first_start"  # in the job's folder; its mtime is when the job first started
AUTO = "auto"


def with_default_resume(cfg: Config) -> Config:
    """A train job resumes from the newest valid checkpoint of its run dir unless the user named a checkpoint."""
    if cfg.train.resume:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=AUTO))


def first_start_ns(job_dir: Path) -> int:
    """When this job (this job id) first started, by the file system's clock (the one that stamps checkpoints);
    recorded by whichever node gets there first."""
    marker = job_dir / FIRST_START_FILE
    job_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        pass
    return marker.stat().st_mtime_ns


def resume_for_this_start(cfg: Config, job_dir: Path) -> Config:
    """``cfg`` with the resume this start of a train job runs (see the module docstring)."""
    resume = cfg.train.resume
    started_ns = first_start_ns(job_dir)
    if resume in ("", AUTO):
        return cfg
    own = [p for p in (Path(cfg.train.run_dir) / CHECKPOINT_DIR).glob("*.pt") if p.stat().st_mtime_ns > started_ns]
    if not own:
        return cfg
    log.info("--resume %s: this job already wrote %s since it first started; resuming from the run's newest "
             "checkpoint instead (resume = auto)", resume, ", ".join(sorted(p.name for p in own)))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=AUTO))
