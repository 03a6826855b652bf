"""The pipeline's stages as submitit callables, and the checks a chain must pass before anything is submitted.

download, prep and report run in one process (the job's single task); train and eval run one torchrun per node
(jobs.torchrun.TorchrunJob). Each callable imports the stage's door from pipeline/ when it runs, so the
pickle stays small and the launcher does not import training code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from jobs.common import run_door
from jobs.resume import AUTO, with_default_resume
from jobs.torchrun import TorchrunJob
from pipeline.core.config import Config
from pipeline.core.errors import UserError
from pipeline.core.records import CHECKPOINT_DIR
from pipeline.core.stages import ARCHIVES, CHECKPOINT, DATA_DIR, RECORDS, RESUME, STAGES


class StageInputError(UserError, ValueError):
    """A stage's input is missing; the message says what to run or pass instead."""


def stage_chain(stage: str, cfg: Config | None = None) -> list[str]:
    """The stages one ``--stage`` value runs, in order; 'all' is the whole pipeline, each stage whose row says it
    belongs for ``cfg`` (download: when it has links, --url or --url-file)."""
    if stage == "all":
        return [name for name, row in STAGES.items() if row.in_all(cfg or Config())]
    if stage not in STAGES:
        raise StageInputError(f"unknown stage {stage!r}; choose one of {[*STAGES, 'all']}")
    return [stage]


class ProcessJob:
    """A stage in one process (download, prep); requeued after a time limit it resumes (download each file from its
    .part by HTTP Range, prep class by class: extraction is atomic)."""

    def __init__(self, stage: str, cfg: Config):
        self.stage = stage
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        return run_door(STAGES[self.stage].door, self.cfg)

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


class ReportJob:
    """report over one or more run dirs, in one process."""

    def __init__(self, run_dirs: list[str]):
        self.run_dirs = list(run_dirs)

    def __call__(self) -> list[str]:
        """The files written (the tables also go to the job's log, which the launcher streams)."""
        return [str(path) for path in run_door(STAGES["report"].door, self.run_dirs).files]


def stage_job(stage: str, cfg: Config, run_dirs: list[str]) -> Callable[[], Any]:
    """The callable a stage's job runs; training resumes from the checkpoint ``--resume`` names, else from the
    newest valid one in the run dir (jobs/resume.py: what a requeue resumes from)."""
    row = STAGES[stage]
    if row.torchrun:
        return TorchrunJob(stage, with_default_resume(cfg) if row.on_preemption == "save" else cfg)
    return ReportJob(run_dirs) if row.door_reads == "run_dirs" else ProcessJob(stage, cfg)


def check_inputs(stages: list[str], cfg: Config, run_dirs: list[str]) -> None:
    """Fail before submitting when a stage's input is neither on disk nor made by an earlier stage."""
    made: set[str] = set()
    for stage in stages:
        for what in STAGES[stage].reads:
            if what not in made:
                INPUT_CHECKS[what](cfg, run_dirs)
        made.update(STAGES[stage].writes)


def check_archives(cfg: Config, run_dirs: list[str]) -> None:
    if not Path(cfg.prep.archive_dir).is_dir():
        raise StageInputError(f"archive dir {cfg.prep.archive_dir} does not exist; pass --archive-dir with the "
                              "official archives, give their links (--url, --url-file) to download them first, or "
                              "make synthetic ones: python -m pipeline.prep.synthetic")


def check_data_dir(cfg: Config, run_dirs: list[str]) -> None:
    if not Path(cfg.data.data_dir).is_dir():
        raise StageInputError(f"data dir {cfg.data.data_dir} does not exist; run --stage prep first, "
                              "or pass --data-dir with a prepared dataset")
    if cfg.data.stage_data_to:
        check_stageable(cfg.data.data_dir)


def check_stageable(data_dir: str) -> None:
    """--stage-data-to copies what a data manifest lists: a data dir without one would fail on every node."""
    from pipeline.data.staging import StagingError, stageable

    try:
        stageable(data_dir)
    except StagingError as exc:
        raise StageInputError(str(exc)) from None


def check_resume(cfg: Config, run_dirs: list[str]) -> None:
    if cfg.train.resume not in ("", AUTO):
        from pipeline.core.checkpoint_file import check_training_checkpoint  # imports torch: only when needed

        check_training_checkpoint(cfg.train.resume)


def check_eval_checkpoint(cfg: Config, run_dirs: list[str] | None = None) -> None:
    if cfg.eval.checkpoint:
        if not Path(cfg.eval.checkpoint).is_file():
            raise StageInputError(f"checkpoint {cfg.eval.checkpoint} does not exist; pass --checkpoint with a "
                                  "saved checkpoint or weights file")
    elif not (Path(cfg.train.run_dir) / CHECKPOINT_DIR).is_dir():
        raise StageInputError(f"run dir {cfg.train.run_dir} has no {CHECKPOINT_DIR}/ to evaluate; train first "
                              "(--stage train) or pass --checkpoint")


def check_run_dirs_exist(cfg: Config, run_dirs: list[str]) -> None:
    missing = [d for d in run_dirs if not Path(d).is_dir()]
    if missing:
        raise StageInputError(f"run dir(s) {missing} do not exist; pass the run dirs of finished or "
                              "running trainings with --run-dir")


# each input of the stage table: how to tell it is on disk (pipeline.core.stages names them)
INPUT_CHECKS: dict[str, Callable[[Config, list[str]], None]] = {
    ARCHIVES: check_archives, DATA_DIR: check_data_dir, RESUME: check_resume, CHECKPOINT: check_eval_checkpoint,
    RECORDS: check_run_dirs_exist}
