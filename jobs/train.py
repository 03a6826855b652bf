"""Training process entry: ``python -m jobs.train [flags]`` or ``torchrun --nproc-per-node N -m jobs.train [flags]``."""
from __future__ import annotations

import sys
from typing import Sequence

from jobs.common import parse_config


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv, "Train a classifier (one process, or each process under torchrun).")
    from pipeline.train import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
