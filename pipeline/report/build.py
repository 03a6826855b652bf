"""The report stage: tables and plots of one or more runs, finished, still training, or cut off.

    python -m jobs.report --run-dir runs/r50-1x1 runs/r50-1x4 runs/r50-2x4 [--out results/]
    python launch.py --stage report --run-dir runs/r50-1x1 runs/r50-1x4

``report(run_dirs)`` reads each run dir's records (pipeline/core/records.py) and writes into
``<run_dir>/report/`` of every run (or into ``out_dir`` alone, when given); a sweep dir given stands for its
points, and the report goes into ``<sweep dir>/report/`` alone:

- ``summary.csv``: one row per run given: numbers, status, provenance (pipeline/report/tables.py);
- ``scaling.csv``: scaling efficiency, when runs of one model ran at several world sizes;
- ``epochs-<run>.csv``: the per-epoch table of that run (of every run in ``out_dir``);
- ``*.parquet`` beside each CSV when pyarrow is importable;
- ``report.md``: all of it as Markdown, with footnotes and links to the plots;
- ``tables.tex``: the results and scaling tables as LaTeX (booktabs), to paste into a paper;
- ``accuracy.png``, ``loss.png``, ``fps.png`` (runs with epochs), ``scaling.png``: the runs compared.

The Markdown is also printed to stdout. Files are written atomically; report files of an earlier
report that no longer apply (a scaling table, another run's epochs) are removed.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from pipeline.core.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from pipeline.report import plots
from pipeline.report.inputs import ReportError, expand_sweeps, load_runs
from pipeline.report.latex import render_latex
from pipeline.report.markdown import render
from pipeline.report.tables import epoch_table, scaling_table, summary_table

__all__ = ["ReportError", "ReportResult", "report"]

log = logging.getLogger(__name__)

REPORT_DIR = "report"
MARKDOWN_FILE = "report.md"
LATEX_FILE = "tables.tex"
EPOCHS_PREFIX = "epochs-"
TABLE_FORMATS = (".csv", ".parquet")
FIXED_FILES = {MARKDOWN_FILE, LATEX_FILE, "accuracy.png", "loss.png", "fps.png", "scaling.png",
               *(stem + ext for stem in ("summary", "scaling") for ext in TABLE_FORMATS)}


@dataclass
class ReportResult:
    """The report's tables, its Markdown and every file written."""

    summary: pd.DataFrame                    # one row per run (summary.csv)
    scaling: pd.DataFrame                    # may have no rows (scaling.csv)
    epochs: dict[str, pd.DataFrame]          # run name -> per-epoch table; performance-mode runs have none
    markdown: str                            # what was printed: every table, as in report.md
    files: list[Path] = field(default_factory=list)


def report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, *, echo: bool = True) -> ReportResult:
    """The report stage's door; raises ReportError for a run dir it cannot read (nothing is written then)."""
    sources = expand_sweeps(run_dirs)
    runs = load_runs([run_dir for run_dir, _ in sources])
    epochs = {run.name: epoch_table(run) for run in runs if run.epochs is not None}
    summary = summary_table(runs)
    scaling = scaling_table(summary)
    pngs = render_plots(epochs, scaling)
    result = ReportResult(summary, scaling, epochs, render(summary, scaling, epochs))
    destinations: dict[Path, list[str]] = {}
    for run, (_, sweep_dir) in zip(runs, sources):
        dest = Path(out_dir) if out_dir is not None else (sweep_dir or run.run_dir) / REPORT_DIR
        destinations.setdefault(dest, []).extend([run.name] if run.name in epochs else [])
    for dest, names in destinations.items():
        result.files += write_report(dest, summary, scaling, {name: epochs[name] for name in names}, pngs)
        log.info("report of %d run(s) written into %s", len(runs), dest)
    if echo:
        sys.stdout.write(result.markdown)
        sys.stdout.flush()
    return result


def render_plots(epochs: Mapping[str, pd.DataFrame], scaling: pd.DataFrame) -> dict[str, bytes]:
    """Each plot that has data, once, as PNG bytes (the same figures go to every destination)."""
    pngs = {}
    if epochs:
        pngs["accuracy.png"] = plots.png_bytes(plots.plot_accuracy(epochs))
        pngs["loss.png"] = plots.png_bytes(plots.plot_loss(epochs))
        pngs["fps.png"] = plots.png_bytes(plots.plot_fps(epochs))
    if len(scaling):
        pngs["scaling.png"] = plots.png_bytes(plots.plot_scaling(scaling))
    return pngs


def write_report(dest: Path, summary: pd.DataFrame, scaling: pd.DataFrame, epochs: Mapping[str, pd.DataFrame],
                 pngs: Mapping[str, bytes]) -> list[Path]:
    """Every file of one destination, each atomically; stale report files there are removed."""
    tables = {"summary": summary, **{EPOCHS_PREFIX + file_stem(name): table for name, table in epochs.items()}}
    if len(scaling):
        tables["scaling"] = scaling
    written = [path for stem, table in tables.items() for path in write_table(dest, stem, table)]
    for name, data in pngs.items():
        atomic_write_bytes(dest / name, data)
        written.append(dest / name)
    atomic_write_text(dest / MARKDOWN_FILE, render(summary, scaling, epochs, plots=list(pngs)))
    atomic_write_text(dest / LATEX_FILE, render_latex(summary, scaling))
    written += [dest / MARKDOWN_FILE, dest / LATEX_FILE]
    remove_stale(dest, written)
    return written


def file_stem(run_name: str) -> str:
    """A run name as part of a file name (``a/run`` -> ``a_run``)."""
    return run_name.replace("/", "_")


def write_table(dest: Path, stem: str, table: pd.DataFrame) -> list[Path]:
    """``<stem>.csv`` always, ``<stem>.parquet`` when pyarrow is importable."""
    paths = [dest / f"{stem}.csv"]
    atomic_write_text(paths[0], table.to_csv(index=False))
    if parquet_available():
        paths.append(dest / f"{stem}.parquet")
        with atomic_path(paths[1]) as tmp:
            table.to_parquet(tmp, index=False)
    return paths


def parquet_available() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def remove_stale(dest: Path, written: Sequence[Path]) -> None:
    """Remove report files of an earlier report in ``dest`` that this one did not write."""
    keep = {path.name for path in written}
    for path in dest.iterdir():
        ours = path.name in FIXED_FILES or (path.name.startswith(EPOCHS_PREFIX) and path.suffix in TABLE_FORMATS)
        if ours and path.name not in keep and path.is_file():
            log.info("removing %s of an earlier report", path)
            path.unlink()
