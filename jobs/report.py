"""Report process entry: tables and plots of one or more runs, finished, still training, or cut off.

    python -m jobs.report --run-dir runs/r50-1x1 runs/r50-1x4 runs/r50-2x4
    python -m jobs.report --run-dir runs/r50-1x1 --run-dir runs/r50-1x4 --out results/

Without --out each run dir gets report/ (its per-epoch table, the summary and scaling of all runs given,
plots); a sweep dir (launch.py --sweep) stands for its points and gets the one report/ of them all. The Markdown
goes to stdout. A run dir it cannot read exits with status 2 and says why.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jobs.common import exit_status, run_door
from pipeline.core.stages import STAGES

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Tables (CSV, Markdown) and plots (PNG) of training runs.",
                                     add_help=add_help)
    parser.add_argument("--run-dir", dest="run_dirs", nargs="+", action="extend", required=True, metavar="RUN_DIR",
                        help="run dir(s) of the train stage, compared side by side, or a sweep dir; repeatable")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write every file into DIR instead of each run dir's report/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return exit_status("jobs.report", lambda: run_door(STAGES["report"].door, args.run_dirs, args.out))


if __name__ == "__main__":
    sys.exit(main())
