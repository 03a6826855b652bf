"""Live metrics where people look: TensorBoard event files in ``<run dir>/tensorboard/`` (on by default) and, with
``--wandb``, Weights & Biases (``WANDB_MODE=offline`` logs without an account; ``wandb sync`` uploads later).

Rank 0 writes; the other ranks get a tracker without sinks. Every point's step is the optimizer steps done (what
the scheduler counts, restored on resume), so per-step and per-epoch curves share one x axis:

- ``train/loss``, ``train/acc1``, ``train/acc5``, ``train/lr``, ``train/img_per_s`` (rank 0's rate),
  ``train/data_wait_s`` (mean wait per step) at the log lines, every ``print_freq`` steps: figures the log line
  reads anyway, so no extra host sync;
- ``epoch/<column>`` of the epochs.csv row (EPOCH_SCALARS) at the epoch's last step.

A resumed run opens a new event file in the same folder with ``purge_step`` just after the step it resumes from,
so TensorBoard drops what the stopped run wrote after its checkpoint and a curve never runs back. epochs.csv stays the
source of the report; these are for watching.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Mapping, Protocol

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from pipeline.core import distributed
from pipeline.core.config import Config, dumps
from pipeline.core.validate import check_trackers_installed

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "run_id"  # in WANDB_DIR: the run a resume continues
FLUSH_S = 30  # how stale TensorBoard may be between epochs
EPOCH_SCALARS = ("train_loss", "train_acc1", "train_acc5", "val_loss", "val_acc1", "val_acc5", "ema_val_acc1",
                 "ema_val_acc5", "epoch_time_s", "peak_mem_mib", "img_per_s_all_ranks", "data_wait_frac", "lr")


class Sink(Protocol):
    def log(self, scalars: Mapping[str, float], step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, run_dir: Path, purge_from: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step writes a restart marker: TensorBoard drops the folder's earlier points at or after that step
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_from, flush_secs=FLUSH_S)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per run dir (its id kept in the run dir), so a resume continues it."""

    def __init__(self, run_dir: Path, cfg: Config):
        import wandb

        folder = run_dir / WANDB_DIR
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / WANDB_ID_FILE
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12] + "\n")
        config = tomllib.loads(dumps(cfg))  # as config.toml has it: links and headers without their tokens
        self.run = wandb.init(id=id_file.read_text().strip(), resume="allow", dir=str(run_dir),
                              name=run_dir.resolve().name, config=config)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)  # W&B drops steps below its last: a resume never runs back

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Where the scalars go: the sinks of rank 0 (none elsewhere, and none when every tracker is off)."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        for sink in self.sinks:
            sink.log(scalars, step)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """One epochs.csv row at its step (its ``steps`` column); empty cells (no EMA) are left out."""
        self.log_step(int(row["steps"]), {f"epoch/{k}": float(row[k]) for k in EPOCH_SCALARS if row.get(k, "") != ""})
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_tracker(cfg: Config, run_dir: Path, purge_from: int) -> Tracker:
    """The trackers the config asks for (rank 0); TensorBoard hides the points earlier runs wrote at ``purge_from``
    or later."""
    check_trackers_installed(cfg)
    if not distributed.is_main_process():
        return Tracker([])
    sinks: list[Sink] = []
    if cfg.train.tensorboard:
        sinks.append(TensorBoardSink(run_dir, purge_from))
        log.info("TensorBoard: tensorboard --logdir %s", run_dir / TENSORBOARD_DIR)
    if cfg.train.wandb:
        sinks.append(WandbSink(run_dir, cfg))
    return Tracker(sinks)
