"""Prep process entry: ``python -m jobs.prep --archive-dir A --data-dir D [--dataset cifar10] [flags]``.

Runs the prep stage in this process (what ``launch.py --stage prep`` runs inside its job). Bad input
(a missing or damaged archive, a data dir holding another dataset, a full disk) is printed as one
``error:`` line and exits with status 2.
"""
from __future__ import annotations

import sys
from typing import Sequence

from jobs.common import run_stage

def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(argv, "prep", "Prepare ImageNet (or CIFAR-10) from the official archives into a verified "
                     "data dir.")


if __name__ == "__main__":
    sys.exit(main())
