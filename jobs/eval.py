"""Evaluation process entry: ``python -m jobs.eval [flags]`` or under torchrun; exact top-1/top-5 counts."""
from __future__ import annotations

import sys
from typing import Sequence

from jobs.common import run_stage


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(argv, "eval", "Evaluate a checkpoint on the val set (exact counts under DDP).")


if __name__ == "__main__":
    sys.exit(main())
