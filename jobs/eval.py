"""Evaluation process entry: ``python -m jobs.eval [flags]`` or under torchrun; exact top-1/top-5 counts."""
from __future__ import annotations

import sys
from typing import Sequence

from jobs.common import exit_on_bad_input, parse_config


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv, "Evaluate a checkpoint on the val set (exact counts under DDP).")
    from pipeline.evaluate import evaluate

    with exit_on_bad_input("jobs.eval"):
        evaluate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
