"""The report's paper tables as LaTeX (booktabs): the main results and, with several world sizes, the scaling.

The numbers are the CSV's, printed with the decimals they were rounded to (76.10, not 76.1) so that columns
line up; text is escaped, and columns empty for every run (eval Acc@1 without an eval stage) are left out.
Paste a table into a paper that loads ``\\usepackage{booktabs}``.
"""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from pipeline.report.flags import SHORT_WINDOW
from pipeline.report.markdown import TITLES, is_missing
from pipeline.report.tables import decimals

RESULT_COLUMNS = ("run", "model", "nodes_x_procs", "amp", "batch_per_proc", "best_val_acc1", "best_val_acc5",
                  "eval_acc1", "eval_acc5", "img_per_s_all_ranks")
SCALING_COLUMNS = ("model", "amp", "world_size", "img_per_s_all_ranks", "ideal_img_per_s", "speedup",
                   "efficiency_pct")
SPECIALS = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
            "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


FLAG_MARK = r"$^\dagger$"
FLAG_NOTE = "Marked: flagged, not a result (the report's Flags say why)."


def escape(text: str) -> str:
    return "".join(SPECIALS.get(ch, ch) for ch in text)


def latex_cell(column: str, value: Any) -> str:
    if is_missing(value):
        return "--"
    digits = decimals(column)
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"
    return escape(str(value))


def latex_table(table: pd.DataFrame, columns: Sequence[str], caption: str, label: str,
                flagged: Sequence[str] = (), flagged_by: str = "") -> str:
    """``columns`` of ``table``; the ``flagged`` columns marked in a row whose flags (pipeline/report/flags.py)
    hold ``flagged_by`` (any flag when empty)."""
    shown = [c for c in columns if c in table.columns and table[c].notna().any()]
    align = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l" for c in shown)
    header = " & ".join(escape(TITLES.get(c, c)) for c in shown) + r" \\"
    flags = [bool(f) and flagged_by in f for f in table["flags"]] if "flags" in table else [False] * len(table)
    rows = [" & ".join(latex_cell(c, v) + (FLAG_MARK if flag and c in flagged else "") for c, v in zip(shown, row))
            + r" \\" for row, flag in zip(table[shown].itertuples(index=False), flags)]
    if any(flags) and set(flagged) & set(shown):
        caption += f" {FLAG_NOTE}"
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{escape(caption)}}}", rf"\label{{{label}}}",
                      rf"\begin{{tabular}}{{{align}}}", r"\toprule", header, r"\midrule", *rows, r"\bottomrule",
                      r"\end{tabular}", r"\end{table}"])


def render_latex(summary: pd.DataFrame, scaling: pd.DataFrame) -> str:
    """The results table, then the scaling table when there is one."""
    parts = [latex_table(summary, RESULT_COLUMNS, "Top-1/top-5 accuracy (%) on the validation set and training "
                         "throughput (images/s, all processes).", "tab:results", flagged=("img_per_s_all_ranks",),
                         flagged_by=SHORT_WINDOW)]
    if len(scaling):
        parts.append(latex_table(scaling, SCALING_COLUMNS, "Training throughput (images/s) and scaling efficiency "
                                 "(%) by world size.", "tab:scaling", flagged=("speedup", "efficiency_pct")))
    return "\n\n".join(parts) + "\n"
