"""Training process entry: ``python -m jobs.train [flags]`` or ``torchrun --nproc-per-node N -m jobs.train [flags]``.

Started by a job (jobs.torchrun) with $JOBS_PREFLIGHT_DIR set, each process runs the pre-flight first."""
from __future__ import annotations

import sys
from typing import Sequence

from jobs.common import run_stage
from jobs.preflight import before_training


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(argv, "train", "Train a classifier (one process, or each process under torchrun).",
                     before=before_training)


if __name__ == "__main__":
    sys.exit(main())
