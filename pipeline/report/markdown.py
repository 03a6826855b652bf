"""The report as Markdown: the same rounded tables as the CSV files, with readable headers and footnotes.

Cells are written as the CSV writes them (Python's shortest round-trip form of each float), so a
number read from the Markdown equals the one in the CSV; missing values are empty cells.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import pandas as pd

from pipeline.report.tables import PROVENANCE_COLUMNS, SUMMARY_COLUMNS

TITLES = {
    "run": "run", "model": "model", "nodes_x_procs": "nodes x procs/node", "world_size": "world size",
    "amp": "AMP", "batch_per_proc": "batch/proc", "accum_steps": "accum steps", "peak_lr": "peak lr", "epochs_done": "epochs done", "epochs_planned": "epochs planned",
    "best_epoch": "best epoch", "best_val_acc1": "best Acc@1 %", "best_val_acc5": "best Acc@5 %",
    "final_val_acc1": "final Acc@1 %", "final_val_acc5": "final Acc@5 %", "eval_acc1": "eval Acc@1 %",
    "eval_acc5": "eval Acc@5 %", "eval_weights": "eval weights", "img_per_s_all_ranks": "img/s all ranks",
    "img_per_s_per_rank": "img/s per process", "energy_kwh": "energy kWh", "j_per_image": "J/image",
    "energy_source": "energy from", "flags": "flags",
    "fps_basis": "img/s from", "train_time_s": "train time s", "status": "status",
    "git_commit": "git commit", "torch": "torch", "torchvision": "torchvision", "cuda": "CUDA",
    "device_name": "device", "hostname": "host", "seed": "seed", "config": "resolved config",
    "epoch": "epoch", "train_loss": "train loss", "train_acc1": "train Acc@1 %", "train_acc5": "train Acc@5 %",
    "val_loss": "val loss", "val_acc1": "val Acc@1 %", "val_acc5": "val Acc@5 %",
    "ema_val_acc1": "EMA val Acc@1 %", "ema_val_acc5": "EMA val Acc@5 %",
    "data_wait_pct": "data wait %", "device_wait_pct": "device input wait %", "input_wait_ms": "input ms/step",
    "fwd_bwd_ms": "fwd+bwd ms/step", "optimizer_ms": "optimizer ms/step", "epoch_time_s": "epoch time s", "lr": "lr",
    "base_world_size": "base world size", "base_img_per_s_all_ranks": "base img/s",
    "ideal_img_per_s": "ideal img/s", "speedup": "speedup", "efficiency_pct": "efficiency %",
}
SUMMARY_NOTE = (
    "Accuracies in % on the val set; best: the epoch with the highest val Acc@1 (the one in best.pt); eval: the "
    "eval stage's exact counts (eval.json) of the model's weights or their EMA ('eval weights'). img/s: training "
    "images per second, steady state (warm-up steps left out), the mean over the epochs in 'img/s from': the "
    "first epoch is left out when there are more, as it includes start-up; a performance-mode run gives its "
    "perf.csv figure. Data wait: the host blocked on the loader; device input wait: the accelerator idle between "
    "one step's end and the next step's input (decoding on the device included; on the CPU, the host's time to make "
    "the input); a performance run splits its step into input, forward+backward and optimizer. Train time: the "
    "training part of the epochs, validation left out. Energy: what the hardware's counters read over the training "
    "parts (NVML: the GPUs; RAPL: each node's CPU packages and DRAM, whatever else ran on them), all ranks; J/image: "
    "per image trained; 'not available' where no counter could be read, never estimated. Flags: figures not to take "
    "as results (see Flags below). Epochs are 0-based.")
SCALING_NOTE = (
    "Runs of the same model, AMP mode, batch per process and device at several world sizes. Base: the smallest "
    "world size present (its runs averaged). ideal = world size / base world size x base img/s; "
    "efficiency = img/s / ideal; speedup = img/s / base img/s.")


def is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def cell(value: Any) -> str:
    """A value as the CSV holds it; missing values are empty."""
    if is_missing(value):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value).replace("|", "\\|")


def markdown_table(table: pd.DataFrame) -> str:
    """A pipe table; numeric columns right-aligned, numbers exactly as in the CSV."""
    cells = pd.DataFrame({TITLES.get(c, c): [cell(v) for v in table[c].tolist()] for c in table.columns})
    align = ["right" if pd.api.types.is_numeric_dtype(table[c]) else "left" for c in table.columns]
    return cells.to_markdown(index=False, disable_numparse=True, colalign=align)


def flag_lines(summary: pd.DataFrame, scaling: pd.DataFrame) -> str:
    """One line per flagged run and scaling row: what not to read as a result, and why."""
    lines = [f"- {row['run']}: {row['flags']}" for row in summary.to_dict("records") if row["flags"]]
    lines += [f"- scaling, {row['run']} at world size {row['world_size']}: {row['flags']}"
              for row in scaling.to_dict("records") if row["flags"]]
    return "\n".join(lines)


def render(summary: pd.DataFrame, scaling: pd.DataFrame, epochs: Mapping[str, pd.DataFrame],
           plots: Sequence[str] = ()) -> str:
    """The whole report: summary, provenance, scaling (when there is one), per-epoch tables, plot links."""
    parts = [f"# Training report: {len(summary)} run(s)", "## Summary", markdown_table(summary[list(SUMMARY_COLUMNS)]),
             SUMMARY_NOTE, "## Provenance", markdown_table(summary[list(PROVENANCE_COLUMNS)])]
    if len(scaling):
        parts += ["## Scaling efficiency", markdown_table(scaling), SCALING_NOTE]
    flagged = flag_lines(summary, scaling)
    if flagged:
        parts += ["## Flags", flagged]
    for name, table in epochs.items():
        parts += [f"## Per epoch: {name}", markdown_table(table)]
    if plots:
        parts += ["## Plots", "\n".join(f"![{plot.removesuffix('.png')}]({plot})" for plot in plots)]
    return "\n\n".join(parts) + "\n"
