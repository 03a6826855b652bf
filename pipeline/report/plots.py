"""The report's plots as PNG bytes, one figure per kind comparing the runs; headless (matplotlib's Agg).

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot: no GUI backend, no global
figure list to leak, safe in a batch job without a display.
"""
from __future__ import annotations

import io
from typing import Mapping

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator, NullLocator

DPI = 110
COLORS = [f"C{i}" for i in range(10)]  # the default colour cycle, one colour per run or group


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _by_epoch(ax: Axes, epochs: Mapping[str, pd.DataFrame], column: str, *, label: str, style: str) -> None:
    """One line per run of ``column`` against the epoch, each run in its own colour."""
    for i, (name, table) in enumerate(epochs.items()):
        ax.plot(table["epoch"], table[column], style, color=COLORS[i % len(COLORS)], label=f"{name} {label}".strip(),
                markersize=4)
    ax.set_xlabel("epoch (0-based)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def _train_val(epochs: Mapping[str, pd.DataFrame], metric: str, title: str, ylabel: str) -> Figure:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    _by_epoch(ax, epochs, f"val_{metric}", label="val", style="o-")
    _by_epoch(ax, epochs, f"train_{metric}", label="train", style="s--")
    ax.set_title(title + " (val: solid, train: dashed)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", ncols=2)
    return fig


def plot_accuracy(epochs: Mapping[str, pd.DataFrame]) -> Figure:
    return _train_val(epochs, "acc1", "Top-1 accuracy by epoch", "Acc@1 (%)")


def plot_loss(epochs: Mapping[str, pd.DataFrame]) -> Figure:
    return _train_val(epochs, "loss", "Loss by epoch", "cross-entropy loss")


def plot_fps(epochs: Mapping[str, pd.DataFrame]) -> Figure:
    """Steady-state training throughput by epoch: all ranks together, and per process."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    all_ranks, per_rank = fig.subplots(1, 2)
    _by_epoch(all_ranks, epochs, "img_per_s_all_ranks", label="", style="o-")
    _by_epoch(per_rank, epochs, "img_per_s_per_rank", label="", style="o-")
    all_ranks.set(title="All processes", ylabel="training images/s")
    per_rank.set(title="Per process", ylabel="training images/s per process")
    for ax in (all_ranks, per_rank):
        ax.set_ylim(bottom=0)
    all_ranks.legend(fontsize="small")
    fig.suptitle("Throughput by epoch (steady state; the first epoch includes start-up)")
    return fig


def plot_scaling(scaling: pd.DataFrame) -> Figure:
    """Throughput against world size with the ideal (linear from the base) line, and the efficiency."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    fps_ax, eff_ax = fig.subplots(1, 2)
    groups = scaling.groupby(["model", "amp", "batch_per_proc", "device_name"], sort=False, dropna=False)
    for i, ((model, amp, batch, device), group) in enumerate(groups):
        color = COLORS[i % len(COLORS)]
        label = ", ".join(part for part in (model, f"AMP {amp}", f"batch {batch}/proc", device) if part)
        by_size = group.groupby("world_size", sort=True)
        sizes = list(by_size.groups)
        fps_ax.plot(group["world_size"], group["img_per_s_all_ranks"], "o", color=color, label=label)
        fps_ax.plot(sizes, by_size["ideal_img_per_s"].first(), "--", color=color, alpha=0.6)
        eff_ax.plot(sizes, by_size["efficiency_pct"].mean(), "o-", color=color)
    flagged = scaling[scaling["flags"].astype(bool)]
    if len(flagged):  # crossed out: an efficiency the report does not give as a result
        eff_ax.plot(flagged["world_size"], flagged["efficiency_pct"], "x", color="red", markersize=12,
                    label="flagged: not a result (see the report's Flags)")
        eff_ax.legend(fontsize="small")
    fps_ax.set(title="Throughput against world size (dashed: ideal, linear from the smallest)",
               xlabel="world size (processes)", ylabel="training images/s, all processes")
    fps_ax.set_yscale("log")  # log-log: the ideal line is straight, every world size gets room
    fps_ax.yaxis.set_major_formatter(LogFormatter())  # 200, not 2 x 10^2
    fps_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    eff_ax.set(title="Scaling efficiency", xlabel="world size (processes)", ylabel="efficiency (%)")
    eff_ax.axhline(100, color="grey", linestyle=":")
    eff_ax.set_ylim(0, max(110, float(scaling["efficiency_pct"].max()) + 10))
    sizes = sorted(scaling["world_size"].unique())
    for ax in (fps_ax, eff_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())  # only the world sizes present
        ax.grid(True, which="both", alpha=0.3)
    fps_ax.legend(fontsize="small", loc="best")  # the colours are the same groups on both sides
    return fig
