"""The pipeline's stages as submitit callables, and the checks a chain must pass before anything is submitted.

download, prep and report run in one process (the job's single task); train and eval run one torchrun per node
(jobs.torchrun.TorchrunJob). Each callable imports the stage's door from pipeline/ when it runs, so the
pickle stays small and the launcher does not import training code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from jobs import download as download_entry
from jobs import prep as prep_entry
from jobs import report as report_entry
from jobs.common import run_door
from jobs.resume import AUTO, with_default_resume
from jobs.torchrun import TorchrunJob
from pipeline.core.config import Config
from pipeline.core.errors import UserError
from pipeline.core.records import CHECKPOINT_DIR

STAGES = ("download", "prep", "train", "eval", "report")
TORCHRUN_STAGES = ("train", "eval")


class StageInputError(UserError, ValueError):
    """A stage's input is missing; the message says what to run or pass instead."""


def stage_chain(stage: str, cfg: Config | None = None) -> list[str]:
    """The stages one ``--stage`` value runs, in order; 'all' is the whole pipeline, from download when ``cfg``
    has links (--url, --url-file)."""
    if stage == "all":
        links = cfg is not None and bool(cfg.download.url or cfg.download.url_file)
        return [s for s in STAGES if s != "download" or links]
    if stage not in STAGES:
        raise StageInputError(f"unknown stage {stage!r}; choose one of {[*STAGES, 'all']}")
    return [stage]


class PrepJob:
    """prep in one process; requeued after a time limit it resumes class by class (extraction is atomic)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        return run_door(prep_entry.DOOR, self.cfg)

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


class DownloadJob(PrepJob):
    """download in one process; requeued after a time limit it resumes each file from its .part (HTTP Range)."""

    def __call__(self) -> dict[str, Any]:
        return run_door(download_entry.DOOR, self.cfg)


class ReportJob:
    """report over one or more run dirs, in one process."""

    def __init__(self, run_dirs: list[str]):
        self.run_dirs = list(run_dirs)

    def __call__(self) -> list[str]:
        """The files written (the tables also go to the job's log, which the launcher streams)."""
        return [str(path) for path in run_door(report_entry.DOOR, self.run_dirs).files]


def stage_job(stage: str, cfg: Config, run_dirs: list[str]) -> Callable[[], Any]:
    """The callable a stage's job runs; training resumes from the checkpoint ``--resume`` names, else from the
    newest valid one in the run dir (jobs/resume.py: what a requeue resumes from)."""
    if stage == "download":
        return DownloadJob(cfg)
    if stage == "prep":
        return PrepJob(cfg)
    if stage == "report":
        return ReportJob(run_dirs)
    if stage == "train":
        cfg = with_default_resume(cfg)
    return TorchrunJob(stage, cfg)


def check_inputs(stages: list[str], cfg: Config, run_dirs: list[str]) -> None:
    """Fail before submitting when a stage's input is neither on disk nor made by an earlier stage."""
    made = set()
    for stage in stages:
        if stage == "prep" and "download" not in made and not Path(cfg.prep.archive_dir).is_dir():
            raise StageInputError(f"archive dir {cfg.prep.archive_dir} does not exist; pass --archive-dir with the "
                                  "official archives, give their links (--url, --url-file) to download them first, or "
                                  "make synthetic ones: python -m pipeline.prep.synthetic")
        if stage in TORCHRUN_STAGES and "prep" not in made and not Path(cfg.data.data_dir).is_dir():
            raise StageInputError(f"data dir {cfg.data.data_dir} does not exist; run --stage prep first, "
                                  "or pass --data-dir with a prepared dataset")
        if stage == "train" and cfg.train.resume not in ("", AUTO):
            from pipeline.core.checkpoint_file import check_training_checkpoint  # imports torch: only when needed

            check_training_checkpoint(cfg.train.resume)
        if stage == "eval" and "train" not in made:
            check_eval_checkpoint(cfg)
        if stage == "report" and "train" not in made:
            missing = [d for d in run_dirs if not Path(d).is_dir()]
            if missing:
                raise StageInputError(f"run dir(s) {missing} do not exist; pass the run dirs of finished or "
                                      "running trainings with --run-dir")
        made.add(stage)


def check_eval_checkpoint(cfg: Config) -> None:
    if cfg.eval.checkpoint:
        if not Path(cfg.eval.checkpoint).is_file():
            raise StageInputError(f"checkpoint {cfg.eval.checkpoint} does not exist; pass --checkpoint with a "
                                  "saved checkpoint or weights file")
    elif not (Path(cfg.train.run_dir) / CHECKPOINT_DIR).is_dir():
        raise StageInputError(f"run dir {cfg.train.run_dir} has no {CHECKPOINT_DIR}/ to evaluate; train first "
                              "(--stage train) or pass --checkpoint")
