"""Prep process entry: ``python -m jobs.prep --archive-dir A --data-dir D [--dataset cifar10] [flags]``.

Runs the prep stage in this process (what ``launch.py --stage prep`` runs inside its job). Bad input
(a missing or damaged archive, a data dir holding another dataset, a full disk) is printed as one
``error:`` line and exits with status 1.
"""
from __future__ import annotations

import sys
from typing import Sequence

from jobs.common import parse_config


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv, "Prepare ImageNet (or CIFAR-10) from the official archives into a verified data dir.")
    from pipeline.archives import PrepError
    from pipeline.logs import setup_logging
    from pipeline.prep import prepare

    setup_logging()
    try:
        prepare(cfg)
    except PrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
