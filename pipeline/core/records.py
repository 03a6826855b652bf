"""The files a run dir holds, and the small atomic writers for them.

Contract between the stages (train and eval write, report reads):

- ``config.toml``: the resolved config (pipeline.core.config.save_config).
- ``provenance.json``: how the numbers were made; keys ``git_commit``, ``python``, ``torch``,
  ``torchvision``, ``cuda``, ``cudnn``, ``device_type``, ``device_name``, ``hostname`` (rank 0), ``hosts``
  (every node), ``rank_hosts`` (host of each rank), ``world_size``,
  ``nodes``, ``seed``, ``started_at`` (ISO 8601, the run's first start); after a resume also ``resumed_at``
  (this job's start) and ``resumes`` (how many jobs continued the run); a job that read a staged copy
  (--stage-data-to) adds ``data_dir`` (the data dir staged) and ``staged_data_dir`` (the copy), as does eval.json.
- ``epochs.csv``: one row per finished epoch, rank 0 only, columns ``EPOCH_COLUMNS``.
- ``perf.csv``: one row per performance-mode run (``--max-steps``), columns ``PERF_COLUMNS``.
- ``ranks.csv``: one row per rank per finished epoch, rank 0 writes, columns ``RANK_COLUMNS``: each rank's own
  step time, input wait, threads and energy (pipeline/core/rank_figures.py), for naming stragglers.
- ``eval.json``: exact counts of the eval stage, keys ``EVAL_KEYS``.
- ``run_state.json``: where training stands, rank 0 only: ``state`` (training, preempted, finished or
  failed), ``epochs_done``, ``at`` (ISO 8601) and, when failed, ``error``. A job killed outright (SIGKILL,
  node crash) leaves "training".
- ``checkpoints/``: ``latest.pt``, ``best.pt``, ``epoch_NNNN.pt``.

Versions: every record says which version of this contract wrote it (``SCHEMA_VERSION``): a ``schema`` column in
each table row and a ``schema`` key in each JSON record; a record without one is version 1. Readers take every
version up to theirs (a column a version did not write is empty) and refuse a newer one; a run resumed on newer
code goes on in the same files (``append_row`` gives an older table the new columns). Users keep run dirs for
months and upgrade in between.

A sweep dir (``launch.py --sweep``) holds one run dir per point and ``sweep.json``: key ``points``, a list of
``name`` (the point's run dir, inside the sweep dir) and ``values`` (swept key -> value as typed).

Throughput is global images per second over all processes (``img_per_s_all_ranks``) and per process
(``img_per_s_per_rank``), by wall clock including the wait for data, after device synchronization,
excluding the warm-up steps at the start of each epoch.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Sequence

from pipeline.core.atomic import atomic_write_text

CONFIG_FILE = "config.toml"
PROVENANCE_FILE = "provenance.json"
EPOCHS_FILE = "epochs.csv"
PERF_FILE = "perf.csv"
EVAL_FILE = "eval.json"
RANKS_FILE = "ranks.csv"
RUN_STATE_FILE = "run_state.json"
CHECKPOINT_DIR = "checkpoints"
SWEEP_FILE = "sweep.json"
POINT_NAME_CHARS = "A-Za-z0-9._=,+-"  # a sweep point's run dir name: launcher.sweep.point_name makes no other

SCHEMA_VERSION = 3  # 1: before versions were recorded; 2: device_wait_frac, perf.csv's step phases, schema;
# 3: the steady-state window and energy in epochs.csv and perf.csv, ranks.csv

EPOCH_COLUMNS_V1 = (
    "epoch",                # 0-based epoch index
    "steps",                # optimizer steps taken so far in the run
    "train_loss", "train_acc1", "train_acc5",  # means over the epoch's samples, all ranks; acc in %
    "val_loss", "val_acc1", "val_acc5",        # over the whole val set, exact; acc in %
    "val_top1_correct", "val_top5_correct", "val_total",
    "lr",                   # learning rate at the end of the epoch
    "epoch_time_s",         # wall clock of the training part of the epoch, s
    "img_per_s_all_ranks",  # training images/s summed over all processes, steady state
    "img_per_s_per_rank",   # the same divided by the world size
    "data_wait_frac",       # share of the steady-state step time the host spent blocked on the loader, 0..1
    "world_size", "nodes", "amp", "model",
    "peak_mem_mib",         # peak device memory of rank 0, MiB (max RSS on CPU)
    "finished_at",          # ISO 8601 time the epoch's record was written
    "ema_val_acc1", "ema_val_acc5",  # the model EMA over the whole val set, %; empty when EMA is off
)
EPOCH_COLUMNS_V2 = EPOCH_COLUMNS_V1 + (
    "device_wait_frac",     # share of the steady-state step time the device waited for its input (decode included)
    "schema",               # SCHEMA_VERSION of the code that wrote the row
)
SPAN_COLUMNS = (
    "steady_steps",         # steps the throughput was measured over (after the warm-up steps)
    "steady_s",             # the wall clock of those steps, s (mean over ranks)
    "images",               # images trained in the span (warm-up included), all ranks: the energy's span
    "energy_j",             # joules the ranks' counters read over that span, summed; empty: none, or not all read
    "energy_source",        # which counters: nvml, rapl, nvml+rapl (pipeline/core/energy.py); empty: none
)
EPOCH_COLUMNS = EPOCH_COLUMNS_V2[:-1] + SPAN_COLUMNS + ("schema",)
PERF_COLUMNS_V1 = ("steps", "warmup_steps", "batch_size", "img_per_s_all_ranks", "img_per_s_per_rank",
                   "data_wait_frac", "world_size", "nodes", "amp", "model", "channels_last", "device", "finished_at")
PERF_COLUMNS_V2 = PERF_COLUMNS_V1 + ("device_wait_frac",
                                     "input_wait_ms", "fwd_bwd_ms", "optimizer_ms",  # ms per step on the device's clock
                                     "schema")
PERF_COLUMNS = PERF_COLUMNS_V2[:-1] + SPAN_COLUMNS + ("schema",)
RANK_COLUMNS = ("epoch", "rank", "host", "threads",
                "step_ms", "data_wait_ms", "input_wait_ms",  # steady-state means per step, this rank's own clock
                "compute_ms",  # forward, backward and optimizer per step (waiting for the other ranks included)
                "images", "energy_j", "energy_source",  # this rank's span and counters, as in epochs.csv
                "schema")
TABLE_VERSIONS = {EPOCHS_FILE: {1: EPOCH_COLUMNS_V1, 2: EPOCH_COLUMNS_V2, 3: EPOCH_COLUMNS},
                  PERF_FILE: {1: PERF_COLUMNS_V1, 2: PERF_COLUMNS_V2, 3: PERF_COLUMNS},
                  RANKS_FILE: {3: RANK_COLUMNS}}  # file: version -> its columns
EVAL_KEYS = ("checkpoint", "weights", "top1_correct", "top5_correct", "total", "acc1", "acc5", "loss", "world_size")


def append_row(path: str | Path, row: dict[str, Any], columns: Sequence[str]) -> None:
    """Add one row to a CSV table (append_rows)."""
    append_rows(path, [row], columns)


def append_rows(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Add rows to a CSV table, rewriting it atomically (tables are small: a row or a row per rank per epoch). A table
    written by an earlier version with fewer columns gets the new ones (empty in its old rows), so a run resumed on
    newer code goes on in the same file. Each row records SCHEMA_VERSION where the table has a ``schema`` column."""
    path = Path(path)
    if "schema" in columns:
        rows = [{**row, "schema": SCHEMA_VERSION} for row in rows]
    unknown = set().union(*rows) - set(columns)
    if unknown:
        raise ValueError(f"columns {sorted(unknown)} are not in the table's columns")
    existing = path.read_text() if path.exists() else ""
    old_rows: list[dict[str, str]] = []
    if existing:
        reader = csv.DictReader(io.StringIO(existing))
        if not set(reader.fieldnames or ()) <= set(columns):
            raise ValueError(f"{path} has other columns than {list(columns)}; use a new run dir")
        old_rows = list(reader)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(old_rows + list(rows))
    atomic_write_text(path, out.getvalue())


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_record(path: str | Path, data: dict[str, Any]) -> None:
    """A run dir's JSON record (provenance, run state, eval counts) with the SCHEMA_VERSION that wrote it."""
    write_json(path, {**data, "schema": SCHEMA_VERSION})


def newer_schema(path: Path, version: Any) -> str:
    """'' when ``version`` (of a record's ``schema``; None, empty or NaN: 1) is one this code reads, else what to do."""
    try:
        number: float | None = float(version)
    except (TypeError, ValueError):
        number = None
    if version in (None, "") or (number is not None and (number != number or (
            number.is_integer() and 1 <= number <= SCHEMA_VERSION))):
        return ""
    shown = int(number) if number is not None and number.is_integer() else version
    return (f"{path} was written by a newer version of the pipeline (record schema {shown}; this one reads up "
            f"to {SCHEMA_VERSION}): upgrade the pipeline to read it")


def read_json(path: Path, error: type[Exception], hint: str) -> dict[str, Any] | None:
    """A JSON object record (data dir report, eval.json, provenance.json): None when the file is absent; a broken
    one raises ``error`` naming the file and what is wrong, followed by ``hint`` (what to do)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); {hint}") from None
    if not isinstance(data, dict):
        raise error(f"{path} should hold a JSON object, not {type(data).__name__}; {hint}")
    return data


def read_sweep_points(sweep_dir: Path, error: type[Exception]) -> list[dict[str, Any]] | None:
    """The points sweep.json lists (None without one), each checked to name one folder of the sweep dir; a broken
    file raises ``error`` saying what is wrong."""
    path = sweep_dir / SWEEP_FILE
    hint = "fix or remove it (launch.py --sweep writes it anew), or report on the point run dirs one by one"
    manifest = read_json(path, error, hint)
    if manifest is None:
        return None
    points = manifest.get("points")
    if not isinstance(points, list) or not points or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and re.fullmatch(f"[{POINT_NAME_CHARS}]+", p["name"])
            and p["name"].strip(".") for p in points):
        raise error(f'{path} should list the sweep\'s points as {{"points": [{{"name": RUN_DIR_NAME, ...}}, ...]}}, '
                    f"each name one folder of the sweep dir (letters, digits, . _ = , + -); {hint}")
    return points
