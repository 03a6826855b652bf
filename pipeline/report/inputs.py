"""The report stage's input: a run dir's records (the contract of pipeline/core/records.py), checked, as pandas.

Only the report stage reads records with pandas; training writes them with the csv module. A run still
training or cut off has fewer epoch rows than its config plans, and is read as it is. What cannot be
read (no records at all, other columns than the contract's, a broken file) is a ReportError that names
the file and says what was expected.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from pipeline.core.config import Config, ConfigError, load_config
from pipeline.core.records import (CONFIG_FILE, EPOCH_COLUMNS, EPOCHS_FILE, EVAL_FILE, PERF_COLUMNS, PERF_FILE,
                                   PROVENANCE_FILE, RANK_COLUMNS, RANKS_FILE, RUN_STATE_FILE, TABLE_VERSIONS,
                                   newer_schema, read_json, read_sweep_points)
from pipeline.report.checks import (MAX_RANK_ROWS, MAX_ROWS, ReportError, check_eval_counts, check_row_count,
                                    check_values, finite_numbers)

log = logging.getLogger(__name__)

TEXT_COLUMNS = {"amp", "model", "finished_at", "device", "channels_last", "energy_source", "host"}


@dataclass
class RunRecords:
    """What one run dir holds; ``epochs`` is None for a performance-mode run, ``perf`` for a training run."""

    name: str
    run_dir: Path
    config: Config
    provenance: dict[str, Any]
    epochs: pd.DataFrame | None   # EPOCH_COLUMNS, one row per epoch, sorted by epoch
    perf: pd.Series | None        # the newest perf.csv row: the one config.toml was written for
    eval: dict[str, Any] | None   # eval.json, EVAL_KEYS
    state: dict[str, Any] | None = None  # run_state.json; None for runs made before it existed
    ranks: pd.DataFrame | None = None  # ranks.csv, RANK_COLUMNS; None for runs made before it existed


def expand_sweeps(run_dirs: Sequence[str | Path]) -> list[tuple[Path, Path | None]]:
    """(run dir, the sweep dir that listed it or None) for each run dir given, a sweep dir (one holding sweep.json)
    standing for its points that have records; the others (failed, pending, in their first epoch) are named in a
    warning."""
    found: list[tuple[Path, Path | None]] = []
    for run_dir in map(Path, run_dirs):
        points = read_sweep_points(run_dir, ReportError)
        if points is None:
            found.append((run_dir, None))
            continue
        names = [point["name"] for point in points]
        ready = [name for name in names if has_records(run_dir / name)]
        if not ready:
            raise ReportError(f"sweep dir {run_dir}: none of its {len(names)} point(s) has records yet (each run dir "
                              f"gets {EPOCHS_FILE} or {PERF_FILE} when its training has finished an epoch or its "
                              "steps); report once one has")
        if len(ready) < len(names):
            log.warning("sweep dir %s: %d of %d point(s) have no records yet (failed, pending, or in their first "
                        "epoch) and are left out: %s", run_dir, len(names) - len(ready), len(names),
                        ", ".join(name for name in names if name not in ready))
        found += [(run_dir / name, run_dir) for name in ready]
    return found


def has_records(run_dir: Path) -> bool:
    """A row in epochs.csv or perf.csv (a header alone is left when a resume forgets the only epoch)."""
    for name in (EPOCHS_FILE, PERF_FILE):
        try:
            with open(run_dir / name, "rb") as fh:
                if len(fh.read(1 << 16).splitlines()) > 1:
                    return True
        except OSError:
            continue
    return False


def load_runs(run_dirs: Sequence[str | Path]) -> list[RunRecords]:
    """Read every run dir given; names are the dirs' names (their parents too where names repeat)."""
    paths = [Path(d) for d in run_dirs]
    if not paths:
        raise ReportError("no run dirs given; pass one or more with --run-dir")
    resolved = [p.resolve() for p in paths]
    repeated = sorted({str(p) for p in paths if resolved.count(p.resolve()) > 1})
    if repeated:
        raise ReportError(f"run dir(s) {repeated} given more than once; give each run dir once")
    return [load_run(path, name) for path, name in zip(paths, run_names(resolved))]


def run_names(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing parts of the paths that tell them apart: ``r50-1node``, or ``a/run`` and ``b/run``."""
    depth = max(len(p.parts) for p in paths)
    for keep in range(1, depth + 1):
        names = ["/".join(p.parts[-keep:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def load_run(run_dir: Path, name: str) -> RunRecords:
    if not run_dir.is_dir():
        raise ReportError(f"run dir {run_dir} does not exist or is not a directory; pass the --run-dir of a "
                          "training (the folder holding config.toml and epochs.csv)")
    epochs = read_table(run_dir / EPOCHS_FILE, EPOCH_COLUMNS)
    perf = read_table(run_dir / PERF_FILE, PERF_COLUMNS)
    if epochs is None and perf is None:
        raise ReportError(f"run dir {run_dir} holds no records: expected {EPOCHS_FILE} (one row per finished "
                          f"epoch, written by the train stage) or {PERF_FILE} (performance mode, --max-steps). "
                          "Has the training finished its first epoch? Is it the right --run-dir?")
    if epochs is not None:
        if perf is not None:
            log.info("%s: both %s and %s; the report shows the epochs", run_dir, EPOCHS_FILE, PERF_FILE)
            perf = None
    elif len(perf) > 1:
        log.info("%s holds %d performance runs; the report shows the newest", run_dir / PERF_FILE, len(perf))
    return RunRecords(name=name, run_dir=run_dir, config=read_config(run_dir),
                      provenance=read_json_file(run_dir / PROVENANCE_FILE) or {},
                      epochs=epochs, perf=None if perf is None else perf.iloc[-1],
                      eval=check_eval_counts(read_json_file(run_dir / EVAL_FILE), run_dir / EVAL_FILE),
                      state=read_json_file(run_dir / RUN_STATE_FILE),
                      ranks=None if epochs is None else read_table(run_dir / RANKS_FILE, RANK_COLUMNS, MAX_RANK_ROWS))


def read_table(path: Path, columns: Sequence[str], max_rows: int = MAX_ROWS) -> pd.DataFrame | None:
    """A records CSV with exactly ``columns``, numbers as numbers; None when absent or without rows."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    check_row_count(path, max_rows)
    try:
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not a readable CSV table ({exc}); it should hold the columns "
                          f"{list(columns)} of pipeline/core/records.py") from None
    found = list(table.columns)
    if "schema" in found:
        problem = newer_schema(path, pd.to_numeric(table["schema"], errors="coerce").max())
        if problem:
            raise ReportError(problem)
    if found in [list(earlier) for earlier in TABLE_VERSIONS[path.name].values()]:  # missing columns: empty
        table = table.reindex(columns=list(columns))
        found = list(columns)
    if found != list(columns):
        missing = [c for c in columns if c not in found]
        unexpected = [c for c in found if c not in columns]
        what = f"missing {missing}, unexpected {unexpected}" if missing or unexpected else "in another order"
        raise ReportError(f"{path} has other columns than the pipeline writes ({what}); expected exactly "
                          f"{list(columns)} (pipeline/core/records.py). Was it written by another version of the "
                          "pipeline? Re-run the training into a new run dir, or fix the header.")
    for column in found:
        if column not in TEXT_COLUMNS:
            table[column] = finite_numbers(table, column, path)
    check_values(table, path)
    return table if len(table) else None


def read_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ReportError(f"run dir {run_dir} has records but no {CONFIG_FILE} (the resolved config the train "
                          "stage writes first); copy it back beside the records to report on this run")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise ReportError(f"{path} cannot be read as this pipeline's config: {exc}") from None


def read_json_file(path: Path) -> dict[str, Any] | None:
    """An optional JSON record: None (with a warning for provenance) when absent, an error when broken."""
    data = read_json(path, ReportError, "re-run the stage that writes it")
    problem = newer_schema(path, (data or {}).get("schema"))
    if problem:
        raise ReportError(problem)
    if data is None and path.name == PROVENANCE_FILE:
        log.warning("%s is missing: the report's provenance columns for this run stay empty", path)
    return data
