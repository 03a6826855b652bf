"""The report's paper tables as LaTeX (booktabs): the main results and, with several world sizes, the scaling.

The numbers are the CSV's, printed with the decimals they were rounded to (76.10, not 76.1) so that columns
line up; text is escaped, and columns empty for every run (eval Acc@1 without an eval stage) are left out.
Paste a table into a paper that loads ``\\usepackage{booktabs}``.
"""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from pipeline.report.markdown import TITLES, is_missing
from pipeline.report.tables import decimals

RESULT_COLUMNS = ("run", "model", "nodes_x_procs", "amp", "batch_per_proc", "best_val_acc1", "best_val_acc5",
                  "eval_acc1", "eval_acc5", "img_per_s_all_ranks")
SCALING_COLUMNS = ("model", "amp", "world_size", "img_per_s_all_ranks", "ideal_img_per_s", "speedup",
                   "efficiency_pct")
SPECIALS = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
            "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def escape(text: str) -> str:
    return "".join(SPECIALS.get(ch, ch) for ch in text)


def latex_cell(column: str, value: Any) -> str:
    if is_missing(value):
        return "--"
    digits = decimals(column)
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"
    return escape(str(value))


def latex_table(table: pd.DataFrame, columns: Sequence[str], caption: str, label: str) -> str:
    shown = [c for c in columns if c in table.columns and table[c].notna().any()]
    align = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l" for c in shown)
    header = " & ".join(escape(TITLES.get(c, c)) for c in shown) + r" \\"
    rows = [" & ".join(latex_cell(c, v) for c, v in zip(shown, row)) + r" \\"
            for row in table[shown].itertuples(index=False)]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{escape(caption)}}}", rf"\label{{{label}}}",
                      rf"\begin{{tabular}}{{{align}}}", r"\toprule", header, r"\midrule", *rows, r"\bottomrule",
                      r"\end{tabular}", r"\end{table}"])


def render_latex(summary: pd.DataFrame, scaling: pd.DataFrame) -> str:
    """The results table, then the scaling table when there is one."""
    parts = [latex_table(summary, RESULT_COLUMNS, "Top-1/top-5 accuracy (%) on the validation set and training "
                         "throughput (images/s, all processes).", "tab:results")]
    if len(scaling):
        parts.append(latex_table(scaling, SCALING_COLUMNS, "Training throughput (images/s) and scaling efficiency "
                                 "(%) by world size.", "tab:scaling"))
    return "\n\n".join(parts) + "\n"
