"""The report's tables, computed from the records: per epoch of a run, one summary row per run, scaling.

Column names are snake case with their unit (``img_per_s_all_ranks``, ``epoch_time_s``, ``*_pct``);
accuracies are in %. Every table is rounded once, here (``round_table``), so the CSV, Parquet and
Markdown written from it hold the same numbers.

Steady-state throughput of a training run is the mean over its epochs of the records' steady-state
img/s, leaving out the first epoch when there are more (it includes start-up: workers, cuDNN autotune,
compilation); ``fps_basis`` says which epochs. A performance-mode run gives its perf.csv figure.

Energy (pipeline/core/energy.py) is what the counters read over the epochs' training parts (validation left out),
summed over the ranks: kWh per run, and joules per image trained; "not available" in ``energy_source`` when an
epoch (or the performance run) has no figure: nothing is estimated.

Scaling efficiency compares runs of the same model, AMP mode, batch size per process and device name
at several world sizes: efficiency(N) = FPS(N) / (N / B x FPS(B)), with B the smallest world size
present (1 when there is a one-process run; several runs at B are averaged). It is computed from the
summary's rounded img/s, so anyone can check it from the tables.
"""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from pipeline.core.records import CONFIG_FILE
from pipeline.report.flags import run_flags, scaling_flag
from pipeline.report.inputs import RunRecords

EPOCH_TABLE_COLUMNS = ("epoch", "train_loss", "train_acc1", "train_acc5", "val_loss", "val_acc1", "val_acc5",
                       "img_per_s_all_ranks", "img_per_s_per_rank", "epoch_time_s", "lr")
EMA_COLUMNS = ("ema_val_acc1", "ema_val_acc5")
SUMMARY_COLUMNS = ("run", "model", "nodes_x_procs", "world_size", "amp", "batch_per_proc", "accum_steps", "peak_lr",
                   "epochs_done", "epochs_planned", "best_epoch", "best_val_acc1", "best_val_acc5", "final_val_acc1",
                   "final_val_acc5", "eval_acc1", "eval_acc5", "eval_weights", "img_per_s_all_ranks",
                   "img_per_s_per_rank", "energy_kwh", "j_per_image", "energy_source", "data_wait_pct",
                   "device_wait_pct", "input_wait_ms", "fwd_bwd_ms", "optimizer_ms", "fps_basis", "train_time_s",
                   "status", "flags")
PROVENANCE_KEYS = ("git_commit", "torch", "torchvision", "cuda", "device_name", "hostname", "seed")
PROVENANCE_COLUMNS = ("run", *PROVENANCE_KEYS, "config")
SCALING_GROUP = ("model", "amp", "batch_per_proc", "device_name")
SCALING_COLUMNS = ("run", *SCALING_GROUP, "world_size", "img_per_s_all_ranks", "base_world_size",
                   "base_img_per_s_all_ranks", "ideal_img_per_s", "speedup", "efficiency_pct", "flags")
INTEGER_COLUMNS = ("epoch", "world_size", "batch_per_proc", "epochs_done", "epochs_planned", "best_epoch",
                   "base_world_size")
DECIMALS = {"acc": 2, "loss": 4, "img_per_s": 1, "time_s": 1, "pct": 1, "speedup": 2, "_ms": 2}  # by part of the name
SIGNIFICANT_DIGITS = 6
NOT_AVAILABLE = "not available"
SIGNIFICANT = ("lr", "peak_lr", "energy_kwh", "j_per_image")  # rounded to significant digits: tiny to huge
UNFINISHED = {"training": "running or killed", "preempted": "preempted, resumes when requeued", "failed": "failed"}
# status of a run short of its epochs, by its run_state.json; without one: "running/cut off"


def round_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as written everywhere: integers as (nullable) integers, floats rounded by DECIMALS."""
    table = table.copy()
    for column in table.columns:
        if column in INTEGER_COLUMNS:
            table[column] = table[column].astype("Int64")
        elif column in SIGNIFICANT:
            table[column] = pd.to_numeric(table[column]).astype(float).map(
                lambda value: float(f"{value:.{SIGNIFICANT_DIGITS}g}"))
        else:
            digits = decimals(column)
            if digits is not None:
                table[column] = pd.to_numeric(table[column]).astype(float).round(digits)
    return table


def decimals(column: str) -> int | None:
    """The decimals a float column is rounded to (DECIMALS), None for one that is not rounded."""
    return next((d for part, d in DECIMALS.items() if part in column), None)


def epoch_table(run: RunRecords) -> pd.DataFrame:
    """Per epoch (0-based, as recorded): loss, accuracies, steady-state img/s, data wait, time, learning rate."""
    assert run.epochs is not None
    epochs = run.epochs
    table = epochs[list(EPOCH_TABLE_COLUMNS)].copy()
    table.insert(table.columns.get_loc("epoch_time_s"), "data_wait_pct", 100 * epochs["data_wait_frac"])
    table.insert(table.columns.get_loc("epoch_time_s"), "device_wait_pct", 100 * epochs["device_wait_frac"])
    for column in reversed(EMA_COLUMNS):  # after val_acc5, in order; only where the run kept an EMA
        if epochs[column].notna().any():
            table.insert(table.columns.get_loc("val_acc5") + 1, column, epochs[column])
    return round_table(table)


def summary_table(runs: Sequence[RunRecords]) -> pd.DataFrame:
    """One row per run: SUMMARY_COLUMNS then its provenance (PROVENANCE_COLUMNS)."""
    rows = [{**run_summary(run), **run_provenance(run)} for run in runs]
    columns = list(dict.fromkeys(SUMMARY_COLUMNS + PROVENANCE_COLUMNS))
    return round_table(pd.DataFrame(rows, columns=columns))


def run_summary(run: RunRecords) -> dict[str, Any]:
    row = epochs_summary(run) if run.epochs is not None else perf_summary(run)
    world_size, nodes = int(row.pop("world_size")), int(row.pop("nodes"))
    procs = f"{nodes}x{world_size // nodes}" if world_size % nodes == 0 else f"{nodes} nodes, {world_size} procs"
    return {"run": run.name, "model": row.pop("model"), "nodes_x_procs": procs, "world_size": world_size,
            "amp": row.pop("amp"), "batch_per_proc": run.config.train.batch_size,
            "accum_steps": run.config.optim.accum_steps, "peak_lr": run.config.optim.lr,
            "eval_acc1": (run.eval or {}).get("acc1"), "eval_acc5": (run.eval or {}).get("acc5"),
            "eval_weights": (run.eval or {}).get("weights", "model" if run.eval else None), **row}


def epochs_summary(run: RunRecords) -> dict[str, Any]:
    epochs = run.epochs
    assert epochs is not None
    last = epochs.iloc[-1]
    best = epochs.loc[epochs["val_acc1"].idxmax()]  # the first epoch with the highest Acc@1, like best.pt
    steady = epochs.iloc[1:] if len(epochs) > 1 else epochs
    first, final = int(steady["epoch"].iloc[0]), int(steady["epoch"].iloc[-1])
    basis = f"epoch {first}" if first == final else f"mean of epochs {first}-{final}"
    done, planned = len(epochs), run.config.train.epochs
    unfinished = UNFINISHED.get((run.state or {}).get("state"), "running/cut off")
    status = "finished" if done >= planned else f"{unfinished} ({done} of {planned} epochs)"
    return {"model": last["model"], "world_size": last["world_size"], "nodes": last["nodes"], "amp": last["amp"],
            "epochs_done": done, "epochs_planned": planned, "best_epoch": best["epoch"],
            "best_val_acc1": best["val_acc1"], "best_val_acc5": best["val_acc5"],
            "final_val_acc1": last["val_acc1"], "final_val_acc5": last["val_acc5"],
            "img_per_s_all_ranks": steady["img_per_s_all_ranks"].mean(),
            "img_per_s_per_rank": steady["img_per_s_per_rank"].mean(),
            "data_wait_pct": 100 * steady["data_wait_frac"].mean(),
            "device_wait_pct": 100 * steady["device_wait_frac"].mean(), "fps_basis": basis,
            "train_time_s": epochs["epoch_time_s"].sum(), "status": status, "flags": run_flags(run, steady),
            **energy(epochs["energy_j"], epochs["images"], epochs["energy_source"])}


def perf_summary(run: RunRecords) -> dict[str, Any]:
    perf = run.perf
    assert perf is not None
    basis = f"perf: {perf['steps']} steps, first {perf['warmup_steps']} left out"
    return {"model": perf["model"], "world_size": perf["world_size"], "nodes": perf["nodes"], "amp": perf["amp"],
            "img_per_s_all_ranks": perf["img_per_s_all_ranks"], "img_per_s_per_rank": perf["img_per_s_per_rank"],
            "data_wait_pct": 100 * perf["data_wait_frac"], "device_wait_pct": 100 * perf["device_wait_frac"],
            **{phase: perf[phase] for phase in ("input_wait_ms", "fwd_bwd_ms", "optimizer_ms")},
            "fps_basis": basis, "status": "perf", "flags": run_flags(run, perf),
            **energy(*(pd.Series([perf[key]]) for key in ("energy_j", "images", "energy_source")))}


def energy(joules: pd.Series, images: pd.Series, sources: pd.Series) -> dict[str, Any]:
    """kWh and joules per image over the rows (epochs, or a performance run), when every row has a figure."""
    if joules.isna().any() or not len(joules):
        return {"energy_kwh": None, "j_per_image": None, "energy_source": NOT_AVAILABLE}
    total_j = joules.sum()
    return {"energy_kwh": total_j / 3.6e6, "j_per_image": total_j / images.sum(),  # 1 kWh = 3.6e6 J
            "energy_source": "+".join(dict.fromkeys("+".join(sources.astype(str)).split("+")))}


def run_provenance(run: RunRecords) -> dict[str, Any]:
    """How the run's numbers were made: code, library versions, hardware, seed, and the full config's path."""
    row = {key: run.provenance.get(key, "") for key in PROVENANCE_KEYS}
    row["seed"] = run.provenance.get("seed", run.config.train.seed)
    return {"run": run.name, **row, "config": str((run.run_dir / CONFIG_FILE).resolve())}


def scaling_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Scaling efficiency of each group (SCALING_GROUP) run at more than one world size; empty when none is."""
    groups = []
    for _, group in summary.groupby(list(SCALING_GROUP), sort=False, dropna=False):
        if group["world_size"].nunique() < 2:
            continue
        base = int(group["world_size"].min())
        at_base = group["world_size"] == base
        base_fps = group.loc[at_base, "img_per_s_all_ranks"].mean()
        ideal = group["world_size"] / base * base_fps
        group = group.assign(base_world_size=base, base_img_per_s_all_ranks=base_fps, ideal_img_per_s=ideal,
                             speedup=group["img_per_s_all_ranks"] / base_fps,
                             efficiency_pct=100 * group["img_per_s_all_ranks"] / ideal)
        base_flags = "; ".join(group.loc[at_base, "flags"])
        group["flags"] = [scaling_flag(row, "" if row["world_size"] == base else base_flags)  # a base: its own
                          for _, row in group.iterrows()]
        groups.append(group.sort_values("world_size", kind="stable"))
    if not groups:
        return pd.DataFrame(columns=list(SCALING_COLUMNS))
    return round_table(pd.concat(groups, ignore_index=True)[list(SCALING_COLUMNS)])
