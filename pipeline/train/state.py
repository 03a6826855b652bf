"""The training state: what a checkpoint saves and a resume restores, in one object (pipeline.train.checkpoint
writes, verifies and finds the files; the trainer runs the epochs).

A checkpoint is a dict of tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it::

    model, optimizer, scheduler, scaler, ema   state dicts (model unwrapped: no DDP/compile prefixes)
    model_name, num_classes, config_digest     what must match to resume
    epoch, step_in_epoch, global_step          where training stands (step_in_epoch: batches of that epoch done)
    best_acc1, finished
    epoch_sums, epoch_elapsed_s                the epoch's train sums (all ranks) and wall clock before a stop
    rng                                        every rank's RNG states: Python, numpy, torch, its accelerator
    world_size, batch_size, accum_steps        the sharding that step_in_epoch refers to
    copies                                     the files that must hold this state (added by the trainer's save)
"""
from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core import distributed
from pipeline.core.config import Config
from pipeline.train.checkpoint import capture_rng_state, check_compatible, restore_rng_state
from pipeline.train.loop import Stepper

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclasses.dataclass
class Position:
    """Where training stands: ``epoch`` in progress and the batches of it done."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_acc1: float = float("-inf")
    carried: torch.Tensor | None = None  # train sums of the epoch's part done before a resume
    carried_s: float = 0.0  # wall clock of that part, s
    resumed_from: str = ""


@dataclasses.dataclass
class TrainingState:
    """The objects a checkpoint captures (through ``stepper``: model, optimizer, schedule, scaler, EMA), the
    position, and what must match for a resume."""

    cfg: Config
    env: distributed.DistEnv
    device: torch.device
    stepper: Stepper
    num_classes: int
    steps_per_epoch: int  # batches per epoch and process: whole accumulation windows
    digest: str  # pipeline.train.checkpoint.config_digest of cfg
    position: Position = dataclasses.field(default_factory=Position)

    def state_dict(self, step_in_epoch: int, epoch: int, sums: torch.Tensor | None) -> dict[str, Any]:
        """Everything a resume needs; gathers the RNG states of all ranks (a collective)."""
        s, pos = self.stepper, self.position
        return {
            "model": s.raw_model.state_dict(), "model_name": self.cfg.model.model, "num_classes": self.num_classes,
            "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
            "scaler": s.precision.scaler.state_dict() if s.precision.scaler is not None else None,
            "ema": s.ema.state_dict() if s.ema is not None else None,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": pos.global_step,
            "best_acc1": pos.best_acc1, "finished": epoch >= self.cfg.train.epochs,
            "epoch_sums": sums, "epoch_elapsed_s": pos.carried_s,
            "rng": distributed.gather(capture_rng_state(self.device)),
            "config_digest": self.digest, "world_size": self.env.world_size, "batch_size": self.cfg.train.batch_size,
            "accum_steps": self.cfg.optim.accum_steps,
        }

    def load_state_dict(self, path: Path, state: dict[str, Any]) -> None:
        """Restore a checkpoint of this run (CheckpointError when it belongs to another model or recipe)."""
        check_compatible(state, path, model_name=self.cfg.model.model, num_classes=self.num_classes,
                         digest=self.digest)
        s = self.stepper
        s.raw_model.load_state_dict(state["model"])
        s.precision.weights_loaded()
        s.optimizer.load_state_dict(state["optimizer"])
        s.scheduler.load_state_dict(state["scheduler"])
        self.follow_this_runs_lr(path)
        if s.precision.scaler is not None and state.get("scaler"):
            s.precision.scaler.load_state_dict(state["scaler"])
        if s.ema is not None and state.get("ema"):
            s.ema.load_state_dict(state["ema"])
        elif s.ema is not None:
            log.warning("%s has no EMA weights; the EMA starts from the current weights", path)
        self.position = Position(epoch=state["epoch"], step_in_epoch=state["step_in_epoch"],
                                 global_step=state["global_step"], best_acc1=state["best_acc1"],
                                 carried=state.get("epoch_sums"), carried_s=state.get("epoch_elapsed_s", 0.0),
                                 resumed_from=str(path))
        if self.sharding(state) != self.sharding():
            self.convert_position(state)
        rng = state.get("rng") or []
        if len(rng) == self.env.world_size:
            restore_rng_state(rng[self.env.rank], self.device)
        else:
            seed_everything(self.cfg.train.seed + self.env.rank + 1000 * self.position.epoch)
        pos = self.position
        log.info("resumed from %s: epoch %d, %d of its %d batches done, step %d, best Acc@1 %.3f", path, pos.epoch,
                 pos.step_in_epoch, self.steps_per_epoch, pos.global_step, pos.best_acc1)

    def follow_this_runs_lr(self, path: Path) -> None:
        """The checkpoint's schedule, rescaled to this run's peak lr: a resume on another global batch derives
        another lr (lr_base), which config.toml, provenance.json and the report show; the restored optimizer and
        schedule would otherwise go on at the old one."""
        s, lr = self.stepper, self.cfg.optim.lr
        saved = list(s.scheduler.base_lrs)
        if all(abs(base - lr) <= 1e-12 * max(abs(lr), 1.0) for base in saved):
            return
        for group, base in zip(s.optimizer.param_groups, saved):
            group["lr"] *= lr / base if base else 0.0
            group["initial_lr"] = lr
        s.scheduler.base_lrs = [lr] * len(saved)
        s.scheduler._last_lr = [group["lr"] for group in s.optimizer.param_groups]  # what get_last_lr() reports
        log.warning("%s was trained at peak lr %g; this run's is %g (its global batch or recipe differs): the "
                    "schedule goes on at this run's rate", path, saved[0], lr)

    def sharding(self, state: dict[str, Any] | None = None) -> tuple[int, int, int]:
        """(world size, batch per process, batches per optimizer step) of a checkpoint's run, or of this one."""
        if state is None:
            return self.env.world_size, self.cfg.train.batch_size, self.cfg.optim.accum_steps
        return state.get("world_size", 1), state.get("batch_size", self.cfg.train.batch_size), \
            state.get("accum_steps", 1)

    def convert_position(self, state: dict[str, Any]) -> None:
        """Another world size, batch size or accumulation: the same images done, as near as whole windows allow."""
        (old_world, old_batch, old_accum), (world, batch, accum) = self.sharding(state), self.sharding()
        pos = self.position
        images_done = pos.step_in_epoch * old_world * old_batch  # global images of the epoch done before the stop
        pos.step_in_epoch = min(images_done // (world * batch * accum) * accum, self.steps_per_epoch)
        pos.global_step = (pos.epoch * self.steps_per_epoch + pos.step_in_epoch) // accum  # optimizer steps
        self.stepper.scheduler.last_epoch = pos.global_step
        log.warning("resuming with world size %d x batch %d x %d accumulated instead of %d x %d x %d: the epoch "
                    "resumes at batch %d (%d images were done), the schedule at step %d; the result will not match "
                    "an uninterrupted run exactly", world, batch, accum, old_world, old_batch, old_accum,
                    pos.step_in_epoch, images_done, pos.global_step)
