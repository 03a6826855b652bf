"""What the report says instead of printing a figure as a plain result: the ``flags`` of a run or a scaling row.

- a steady-state window shorter than the run's ``min_steady_steps`` or ``min_steady_s``: too few steps after the
  warm-up to trust its img/s (and every efficiency computed from it);
- a scaling efficiency above 100%: more than linear speed-up is not a result but a sign that the base ran slowed
  (CPU runs with more threads than cores were, at 673%) or was measured too briefly;
- a straggler: the rank that waited for its input longer than the median rank by more than the run's
  ``straggler_fraction`` of the median step (pipeline/core/rank_figures.py), named with its host.

A row's flags are joined by "; " in its ``flags`` column (CSV and Markdown alike), and listed again in the report's
"Flags" section.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from pipeline.core.rank_figures import find_straggler
from pipeline.report.inputs import RunRecords

SHORT_WINDOW = "short steady-state window"
ABOVE_IDEAL = "efficiency above 100%"


def window_flag(run: RunRecords, steps: float, seconds: float) -> str:
    """The flag of a throughput measured over ``steps`` steps and ``seconds`` s (NaN: not recorded, not judged)."""
    train = run.config.train
    short = []
    if steps < train.min_steady_steps:
        short.append(f"{steps:g} steps < {train.min_steady_steps}")
    if seconds < train.min_steady_s:
        short.append(f"{seconds:g} s < {train.min_steady_s:g} s")
    if not short:
        return ""
    return (f"{SHORT_WINDOW} ({', '.join(short)}): its img/s is not a result, measure longer (more steps per epoch, "
            "--max-steps) or lower --min-steady-steps/--min-steady-s")


def straggler_flag(run: RunRecords) -> str:
    """The straggler of the run's last epoch that had one, and in how many epochs one was found."""
    if run.ranks is None:
        return ""
    fraction = run.config.train.straggler_fraction
    found = [(int(epoch), s) for epoch, rows in run.ranks.groupby("epoch", sort=True)
             if (s := find_straggler(rows.to_dict("records"), fraction)) is not None]
    if not found:
        return ""
    epochs = run.ranks["epoch"].nunique()
    epoch, last = found[-1]
    return f"{last.text} (epoch {epoch}, a straggler in {len(found)} of {epochs} epoch(s))"


def run_flags(run: RunRecords, steady: pd.DataFrame | pd.Series) -> str:
    """A run's flags, one per line: its window (over the ``steady`` rows its img/s comes from) and its straggler."""
    if isinstance(steady, pd.Series):  # a performance run's row
        steps = steady.get("steady_steps", math.nan)
        if pd.isna(steps):  # written before the window was recorded: steps less warm-up steps is the window
            steps = steady["steps"] - steady["warmup_steps"]
        window = window_flag(run, float(steps), float(steady.get("steady_s", math.nan)))
    else:
        window = window_flag(run, float(steady["steady_steps"].min()), float(steady["steady_s"].min()))
    return "; ".join(flag for flag in (window, straggler_flag(run)) if flag)


def scaling_flag(row: Any, base_flags: str) -> str:
    """A scaling row's flag: an efficiency above 100%, or its own or its base's window too short."""
    flags = []
    if row["efficiency_pct"] > 100:
        flags.append(f"{ABOVE_IDEAL} ({row['efficiency_pct']:.1f}%): not a result; the base run was held back "
                     "(e.g. more threads than cores) or measured too briefly")
    short = [who for who, text in (("this run", row["flags"]), ("the base run", base_flags)) if SHORT_WINDOW in text]
    if short:
        flags.append(f"{' and '.join(short)}: {SHORT_WINDOW}, so this efficiency is not a result")
    return "; ".join(flags)
