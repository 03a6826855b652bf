"""Training process entry: ``python -m jobs.train [flags]`` or ``torchrun --nproc-per-node N -m jobs.train [flags]``.

Started by a job (jobs.torchrun) with $JOBS_PREFLIGHT_DIR set, each process runs the pre-flight first."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from jobs.common import run_stage
from jobs.preflight import before_training
from jobs.resume import resume_for_this_start
from pipeline.core.config import Config


def for_this_attempt(cfg: Config, args: argparse.Namespace) -> Config:
    """torchrun restarted this job's processes (a lost process or connection): like a requeue, a job started with
    ``--resume PATH`` resumes from what it saved since it first started, not from PATH again (jobs/resume.py). The
    job's config file lies in its folder (``<run dir>/logs/<job id>/``), where its first start is recorded."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0") or not args.config:
        return cfg
    return resume_for_this_start(cfg, Path(args.config).parent)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(argv, "train", "Train a classifier (one process, or each process under torchrun).",
                     before=before_training, adjust=for_this_attempt)


if __name__ == "__main__":
    sys.exit(main())
