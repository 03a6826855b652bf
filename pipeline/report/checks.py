"""What a records table may hold, checked before the report trusts it: a bounded row count, finite numbers,
accuracies in [0, 100] and epochs that only go up. A table that breaks one of these was not written by one
training (two trainers in one run dir, a hand edit, another program), so the run dir is refused with one line
naming the file, the line and what is wrong, rather than reported with numbers no training made.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import UserError

MAX_ROWS = 10_000  # one row per epoch (or performance run): no training has this many; the report stays seconds
MAX_RANK_ROWS = 1_000_000  # ranks.csv: a row per rank per epoch (1,000 ranks x 1,000 epochs)
PERCENT_COLUMNS = ("train_acc1", "train_acc5", "val_acc1", "val_acc5", "ema_val_acc1", "ema_val_acc5")


class ReportError(UserError, ValueError):
    """A run dir the report cannot use; the message names the dir or file and what was expected."""


def check_row_count(path: Path, max_rows: int = MAX_ROWS) -> None:
    """Refuse a table of more than ``max_rows`` rows before parsing it (counting stops just past the bound)."""
    lines = 0
    with open(path, "rb") as fh:
        while lines <= max_rows + 1 and (chunk := fh.read(1 << 20)):
            lines += chunk.count(b"\n")
    if lines > max_rows + 1:  # the header, then the rows
        raise ReportError(f"{path} holds more than {max_rows:,} rows; a run's records are one row per epoch (or per "
                          "performance run, or per rank and epoch), so this is not a record of one training: report "
                          "on the right run dir, or trim the file")


def line_of(table: pd.DataFrame, row: int) -> int:
    """The file line of a table row: the header is line 1."""
    return int(table.index[row]) + 2


def finite_numbers(table: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """``column`` as numbers; a value that is not one, or is NaN or infinite, is a ReportError naming its line
    (an empty cell stays empty: a column the run did not fill, e.g. the EMA's)."""
    raw = table[column]
    numbers = pd.to_numeric(raw, errors="coerce")
    bad = np.flatnonzero(raw.notna().to_numpy() & ~np.isfinite(numbers.to_numpy(dtype=float)))
    if len(bad):
        raise ReportError(f"{path} line {line_of(table, bad[0])}: {column} = {str(raw.iloc[bad[0]])!r} is not a finite "
                          "number; the pipeline writes finite numbers only")
    return numbers


def check_values(table: pd.DataFrame, path: Path) -> None:
    """Accuracies in [0, 100] (%), and epoch numbers that only go up: a resumed training drops the rows of the
    epochs it redoes, so an epoch again (0, 0, 1, 1) means two trainings wrote this file."""
    for column in PERCENT_COLUMNS:
        if column in table:
            values = table[column].to_numpy(dtype=float)
            bad = np.flatnonzero((values < 0) | (values > 100))
            if len(bad):
                raise ReportError(f"{path} line {line_of(table, bad[0])}: {column} = {values[bad[0]]:g} is not an "
                                  "accuracy in [0, 100] (%)")
    if "epoch" in table and len(table) > 1:
        epochs = table["epoch"].to_numpy()
        order = epochs
        if "rank" in table:  # ranks.csv: an epoch's rows in rank order, then the next epoch's
            order = epochs * (1 + table["rank"].max()) + table["rank"].to_numpy()
        back = np.flatnonzero(order[1:] <= order[:-1])
        if len(back):
            i = back[0] + 1
            what = (lambda j: f"epoch {epochs[j]:g} rank {table['rank'].iloc[j]:g}") if "rank" in table else \
                (lambda j: f"epoch {epochs[j]:g}")
            raise ReportError(f"{path} line {line_of(table, i)}: {what(i)} after {what(i - 1)} "
                              f"(line {line_of(table, i - 1)}): two trainings wrote this run dir (a resumed one drops "
                              "the rows of the epochs it redoes); train each run into a run dir of its own")


def check_eval_counts(record: dict | None, path: Path) -> dict | None:
    """eval.json's counts as the eval stage writes them: whole numbers with top-1 <= top-5 <= total, and
    accuracies that are those counts in % (the report prints them); else a ReportError naming what is wrong."""
    if record is None:
        return None
    counts = {key: record.get(key) for key in ("top1_correct", "top5_correct", "total")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()) or not (
            counts["top1_correct"] <= counts["top5_correct"] <= counts["total"]):
        raise ReportError(f"{path}: the counts {counts} are not whole numbers with top-1 <= top-5 <= total; the eval "
                          "stage writes them so: re-run it")
    for key, correct in (("acc1", "top1_correct"), ("acc5", "top5_correct")):
        value, total = record.get(key), counts["total"]
        expected = 100.0 * counts[correct] / total if total else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or expected is None or \
                abs(value - expected) > 1e-6:
            raise ReportError(f"{path}: {key} = {value!r} is not {correct} / total in % ({expected}); the eval stage "
                              "writes it so: re-run it")
    return record
