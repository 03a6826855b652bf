"""The stages in one table: their order, what each reads and writes, how its job runs, which checks apply.

    download ──archives──▶ prep ──data dir──▶ train ──checkpoints, records──▶ eval ──counts──▶ report

Each row also holds what its job asks for by default (GPUs only for torchrun stages, CPUs, nodes, time), which
[launch.<stage>] overrides (launcher/executors.py resolves it).
The launcher (launch.py, launcher/), the validation (pipeline.core.validate) and the jobs (jobs/stages.py,
jobs/torchrun.py) read this table instead of testing stage names. Torch-free: the login node imports it.
A new stage is one row here, its door in pipeline/ and its entry point in jobs/.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal

from pipeline.core.config import Config

# What stages read and write; jobs/stages.py checks an input on disk unless an earlier stage of the chain writes it.
ARCHIVES = "archives"  # the official archives in --archive-dir
DATA_DIR = "data dir"  # the prepared data in --data-dir
RESUME = "resume checkpoint"  # a checkpoint --resume names (no stage writes one)
CHECKPOINT = "checkpoint"  # <run dir>/checkpoints/, or --checkpoint
RECORDS = "run records"  # a training's per-epoch records in its run dir
COUNTS = "eval counts"  # eval.json in the run dir
TABLES = "tables"  # the report's CSV, Markdown and plots

# Groups of checks in pipeline.core.validate, named by the stages they apply to.
OPTIM, TRACKERS, PRETRAINED, MODEL, BATCH, LINKS = "optim", "trackers", "pretrained", "model", "batch", "links"


def _always(cfg: Config) -> bool:
    return True


def _has_links(cfg: Config) -> bool:
    return bool(cfg.download.url or cfg.download.url_file)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    door: str  # ``module:function`` in pipeline/ that does the work
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    torchrun: bool = False  # one torchrun per node (nodes x processes per node); else one process on one node
    entry: str = ""  # ``python -m`` module of a torchrun stage's processes
    door_reads: Literal["cfg", "run_dirs"] = "cfg"  # the door's argument
    cpus: Literal["processes", "workers", "default"] = "default"  # CPUs a node task asks for unless --cpus-per-task:
    # processes per node x (--workers + 1), --workers + 1 (prep's writer threads and reader), the scheduler's default
    nodes: Literal["launch", "one"] = "one"  # nodes unless [launch.<stage>] nodes: --nodes (train), or one
    time_min: int = 0  # time limit unless [launch.<stage>] time, minutes; 0: [launch] time (--time)
    checks: tuple[str, ...] = ()  # groups of pipeline.core.validate that apply
    on_preemption: Literal["save", "requeue", "end"] = "requeue"  # save: training saves first, then requeues
    run_config: bool = False  # without --config, read the run dir's resolved config.toml (what the run trained with)
    in_all: Callable[[Config], bool] = _always  # part of --stage all for this config

    def door_text(self) -> str:
        """The door as the dry run shows it: ``pipeline.prep.prepare.prepare(cfg)``."""
        return f"{self.door.replace(':', '.')}({self.door_reads})"


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("download", "pipeline.prep.download:fetch", reads=(), writes=(ARCHIVES,), checks=(LINKS,),
          in_all=_has_links),
    Stage("prep", "pipeline.prep.prepare:prepare", reads=(ARCHIVES,), writes=(DATA_DIR,), cpus="workers"),
    Stage("train", "pipeline.train.trainer:train", reads=(DATA_DIR, RESUME), writes=(CHECKPOINT, RECORDS),
          torchrun=True, entry="jobs.train", cpus="processes", nodes="launch",
          checks=(OPTIM, TRACKERS, PRETRAINED, MODEL, BATCH),
          on_preemption="save"),
    Stage("eval", "pipeline.eval.evaluate:evaluate", reads=(DATA_DIR, CHECKPOINT), writes=(COUNTS,), torchrun=True,
          entry="jobs.eval", cpus="processes", checks=(MODEL,), run_config=True),
    Stage("report", "pipeline.report.build:report", reads=(RECORDS,), writes=(TABLES,), door_reads="run_dirs",
          time_min=30, on_preemption="end", run_config=True),
)}
TORCHRUN_STAGES = tuple(name for name, stage in STAGES.items() if stage.torchrun)


def checks_of(stages: tuple[str, ...] | list[str] | set[str]) -> set[str]:
    """The validation groups that apply to ``stages``."""
    return {check for name in stages for check in STAGES[name].checks}
