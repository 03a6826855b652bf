"""Training process entry: ``python -m jobs.train [flags]`` or ``torchrun --nproc-per-node N -m jobs.train [flags]``."""
from __future__ import annotations

import sys
from typing import Sequence

from jobs.common import exit_on_bad_input, parse_config


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv, "Train a classifier (one process, or each process under torchrun).")
    from pipeline.train import train

    with exit_on_bad_input("jobs.train"):
        train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
