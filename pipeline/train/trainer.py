"""The train stage: ``train(cfg)`` in one process, or in each process under torchrun (DDP).

    python -m jobs.train --data-dir DATA --run-dir RUN --model resnet18 --epochs 90 --amp bf16
    torchrun --nproc-per-node 8 -m jobs.train --config configs/resnet50.toml --resume auto
    python -m jobs.train ... --max-steps 100        # performance mode: steady-state img/s only

What a run leaves in the run dir (rank 0 writes, the others compute): ``config.toml``,
``provenance.json``, ``epochs.csv`` (one row per epoch, EPOCH_COLUMNS), ``run_state.json`` (training,
preempted, finished or failed), ``perf.csv`` (performance mode, PERF_COLUMNS),
``checkpoints/{latest,best,epoch_NNNN}.pt`` (pipeline/train/checkpoint.py).

Preemption contract (used by the launcher's requeue):

- SIGUSR1 or SIGTERM to any training process sets a flag; after the current step all ranks agree (an
  all-reduce of the flags), rank 0 saves ``latest.pt`` holding the position inside the epoch (epoch,
  batches done; with --accum-steps always at a window's end, so no gradients are saved) and every process
  returns ``{"finished": False, "preempted": True, ...}``, so
  ``python -m jobs.train`` exits 0. A signal during validation stops the run at the end of that epoch.
- ``--resume auto`` (or ``--resume PATH``) continues from that position: the batches already done in
  that epoch are skipped (the sampler's order and the augmentation depend only on seed and epoch), the
  train loss/accuracy sums of the epoch's first part are carried, and model, optimizer, scheduler,
  GradScaler, EMA and the RNG states of every rank are restored, so the run ends with the same weights
  as one never interrupted (bit-exact with the same world size and deterministic kernels).
- A completed run returns ``{"finished": True, ...}``; resuming a finished run does nothing and says so.

Throughput in the records is steady state over all processes (pipeline.core.metrics.ThroughputTimer).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.core import distributed
from pipeline.core.atomic import atomic_write_text
from pipeline.core.checkpoint_file import BEST, LATEST, checkpoint_dir, epoch_file, save_checkpoint
from pipeline.core.config import Config, ConfigError, ema_update_decay, save_config
from pipeline.core.dir_lock import locked_by_main_process
from pipeline.core.metrics import Throughput, peak_memory_mib
from pipeline.core.precision import setup_precision
from pipeline.core.provenance import all_hostnames, collect_provenance, resumed_provenance
from pipeline.core.rank_figures import write_rank_rows
from pipeline.core.records import (CONFIG_FILE, EPOCH_COLUMNS, EPOCHS_FILE, PERF_COLUMNS, PERF_FILE, PROVENANCE_FILE,
                                   RANKS_FILE, RUN_STATE_FILE, append_row, write_record)
from pipeline.core.stage_process import stage_process
from pipeline.core.validate import check_trackers_installed
from pipeline.data.sources import data_provenance
from pipeline.data.loaders import build_train_loader, build_val_loader, dataset_info, device_batcher
from pipeline.data.staging import as_given
from pipeline.eval.evaluate import EvalResult, validate
from pipeline.models.registry import build_model
from pipeline.train import tracking, watchdog
from pipeline.train.checkpoint import config_digest, finish_copies, remove_stale_temporaries, resolve_resume
from pipeline.train.loop import EpochResult, Stepper, run_epoch, run_perf
from pipeline.train.optim import build_optimizer, build_scheduler, lr_for_batch
from pipeline.train.preemption import PreemptionFlag
from pipeline.train.state import TrainingState, seed_everything

log = logging.getLogger(__name__)

# What training writes in the run dir beside checkpoints/ (their temporaries are cleaned on start).
RUN_FILES = (CONFIG_FILE, PROVENANCE_FILE, EPOCHS_FILE, PERF_FILE, RANKS_FILE, RUN_STATE_FILE)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def forget_epochs_from(path: Path, epoch: int) -> None:
    """Drop the rows of epochs a resumed run redoes (written after the checkpoint it resumes from was saved)."""
    if not path.exists():
        return
    header, *rows = path.read_text().splitlines(keepends=True)
    kept = [row for row in rows if int(row.split(",", 1)[0]) < epoch]  # the first column is the epoch
    if len(kept) < len(rows):
        log.warning("%s: dropping %d row(s) of epoch %d and later, which this run redoes", path,
                    len(rows) - len(kept), epoch)
        atomic_write_text(path, header + "".join(kept))


def broadcast_buffers_from_rank0(*models: nn.Module) -> None:
    """Rank 0's floating-point buffers (BatchNorm running statistics) on every rank (a collective).

    DDP broadcasts the buffers from rank 0 at the start of each forward, then every rank updates them with
    its own batch, so after the last step they differ; validating with them would count with other weights
    than the checkpoint rank 0 saves. (Under SyncBatchNorm they are equal already.)
    """
    if not dist.is_initialized():
        return
    for buffer in (b for model in models for b in model.buffers()):
        if buffer.is_floating_point():
            dist.broadcast(buffer, src=0)


def rounded(value: float, digits: int) -> float | str:
    """A figure for the records: rounded, or empty when nothing was measured (NaN), as the report reads it."""
    return round(value, digits) if math.isfinite(value) else ""


def global_batch_of(cfg: Config, world_size: int) -> int:
    """Images per optimizer step: processes x images per process per batch x batches per step (accumulation)."""
    return world_size * cfg.train.batch_size * cfg.optim.accum_steps


def optimizer_steps_per_epoch(cfg: Config, batches: int) -> int:
    """Whole accumulation windows in an epoch of ``batches`` (the tail is left out, see loop.run_epoch)."""
    steps = batches // cfg.optim.accum_steps
    if steps < 1:
        raise ConfigError(f"optim.accum_steps (--accum-steps) = {cfg.optim.accum_steps} batches per optimizer step, "
                          f"but an epoch has {batches} batch(es) per process; lower --accum-steps or --batch-size")
    return steps


def with_lr_for_batch(cfg: Config, world_size: int) -> Config:
    """``cfg`` with the peak lr derived from its global batch when the recipe gives ``lr_base`` (said once, and saved
    in config.toml, as every value that made the numbers)."""
    if cfg.optim.lr_base <= 0:
        return cfg
    global_batch = global_batch_of(cfg, world_size)
    lr = lr_for_batch(cfg.optim, global_batch)
    distributed.on_main_process(log.info, "lr %.6g: lr_base %g for %d images per step, scaled (%s) to this run's "
                                "%d (%d processes x %d x %d accumulated)", lr, cfg.optim.lr_base,
                                cfg.optim.lr_base_batch, cfg.optim.lr_base_scale, global_batch, world_size,
                                cfg.train.batch_size, cfg.optim.accum_steps)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))


class Trainer:
    """The objects of one training process, built from the config (and a checkpoint when resuming)."""

    def __init__(self, cfg: Config, env: distributed.DistEnv, device: torch.device):
        cfg = with_lr_for_batch(cfg, env.world_size)
        self.env, self.device = env, device
        # the run's config as recorded: a staged copy's data dir gives way to its source (the loaders below read cfg)
        self.cfg, self.staged = as_given(cfg)
        self.run_dir = Path(cfg.train.run_dir)
        self.info = dataset_info(cfg)
        self.perf_mode = cfg.train.max_steps > 0
        seed_everything(cfg.train.seed)  # the same initial weights on every rank, whatever the world size
        model = build_model(cfg.model.model, num_classes=self.info.num_classes, pretrained=cfg.model.pretrained)
        if cfg.model.sync_bn and env.distributed:
            if device.type == "cpu":
                raise ConfigError("--sync-bn needs accelerators (torch's SyncBatchNorm has no CPU kernel); "
                                  "on CPU use --no-sync-bn")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.precision = setup_precision(device, cfg.train.amp, cfg.model.channels_last, cfg.train.loss_scale)
        self.raw_model = self.precision.prepare_model(model)
        self.loader, self.sampler = build_train_loader(cfg, env, device, seed=cfg.train.seed)
        self.val_loader = None if self.perf_mode else build_val_loader(cfg, env, device)
        self.val_to_device = device_batcher(cfg, self.precision)
        steps_per_epoch = optimizer_steps_per_epoch(cfg, len(self.loader))
        report = log.info if cfg.optim.accum_steps > 1 else log.debug  # bad input keeps its one line first
        distributed.on_main_process(report, "an optimizer step takes %d batch(es) per process: %d images, %d steps "
                                    "per epoch", cfg.optim.accum_steps, global_batch_of(cfg, env.world_size),
                                    steps_per_epoch)
        try:
            optimizer = build_optimizer(self.raw_model, cfg.optim)
            scheduler = build_scheduler(optimizer, cfg.optim, epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch)
        except ValueError as exc:  # a recipe that cannot run: bad input, not a bug
            raise ConfigError(str(exc)) from exc
        ema = None
        ema_decay = ema_update_decay(cfg, env.world_size)
        if ema_decay is not None:
            ema = AveragedModel(self.raw_model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay),
                                use_buffers=True)
        self.stepper = Stepper(model=self.raw_model, raw_model=self.raw_model,
                               criterion=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing),
                               optimizer=optimizer, scheduler=scheduler, precision=self.precision,
                               to_device=device_batcher(cfg, self.precision, mix_classes=self.info.num_classes,
                                                        seed=cfg.train.seed, rank=env.rank),
                               ema=ema, ema_steps=cfg.model.ema_steps,
                               ema_warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch,
                               clip_grad_norm=cfg.optim.clip_grad_norm, accum_steps=cfg.optim.accum_steps)
        self.state = TrainingState(cfg, env, device, self.stepper, self.info.num_classes,
                                   steps_per_epoch * cfg.optim.accum_steps, config_digest(cfg))
        found = None if self.perf_mode else resolve_resume(cfg.train.resume, self.run_dir)
        if found is None:
            seed_everything(cfg.train.seed + env.rank)  # dropout and the like differ per rank
        else:
            self.state.load_state_dict(*found)
        distributed.on_main_process(self.tidy_checkpoints, found)
        model = self.precision.training_copy(self.raw_model)  # the raw model itself but under O2
        if env.distributed:
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type != "cpu" else None)
        if cfg.model.compile:
            model = torch.compile(model)
        self.stepper.model = model
        # points after the checkpoint's step were written by a run that stopped later: hidden from here on
        self.tracker = tracking.open_tracker(cfg, self.run_dir, purge_from=self.state.position.global_step + 1)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save(self, state: dict[str, Any], *, keep_epoch: bool = False, best: bool = False) -> None:
        """latest.pt naming the copies it owes, then those copies: epoch_NNNN.pt and best.pt when asked (rank 0)."""
        latest = checkpoint_dir(self.run_dir) / LATEST
        copies = [LATEST] + [epoch_file(state["epoch"])] * keep_epoch + [BEST] * best
        save_checkpoint({**state, "copies": copies}, latest)
        finish_copies(latest, copies)

    def tidy_checkpoints(self, found: tuple[Path, dict[str, Any]] | None) -> None:
        """Before anything uses the run dir (rank 0): drop temporaries left by a kill; finish the copies the run's newest
        state owes (auto, or its latest.pt; not an older one named by path), else best.pt may stay stale for good."""
        remove_stale_temporaries(self.run_dir, RUN_FILES)
        latest = checkpoint_dir(self.run_dir) / LATEST
        if found is not None and (self.cfg.train.resume == "auto" or found[0].resolve() == latest.resolve()):
            finish_copies(found[0], found[1].get("copies", []))

    # ---- records ----------------------------------------------------------------------------------------
    def write_run_metadata(self) -> None:
        """Called on every rank (the host list is a collective); rank 0 writes."""
        hosts = all_hostnames()
        if distributed.is_main_process():
            save_config(self.cfg, self.run_dir / CONFIG_FILE)
            record = collect_provenance(self.device, self.env, self.cfg.train.seed, hosts)
            record.update(data_provenance(self.cfg))
            if self.state.position.resumed_from:
                record = resumed_provenance(record, self.run_dir / PROVENANCE_FILE)
            write_record(self.run_dir / PROVENANCE_FILE, {**record, **self.staged, **self.recipe_record()})

    def recipe_record(self) -> dict[str, Any]:
        """What provenance.json keeps of the step: the derived peak lr and the global batch it was derived for."""
        return {"peak_lr": self.cfg.optim.lr, "global_batch": global_batch_of(self.cfg, self.env.world_size),
                "accum_steps": self.cfg.optim.accum_steps}

    def common_columns(self, tp: Throughput) -> dict[str, Any]:
        return {"img_per_s_all_ranks": rounded(tp.img_per_s_all_ranks, 2),
                "img_per_s_per_rank": rounded(tp.img_per_s_per_rank, 2),
                "data_wait_frac": rounded(tp.data_wait_frac, 4), "device_wait_frac": rounded(tp.device_wait_frac, 4),
                "world_size": self.env.world_size, "nodes": self.env.nodes, "amp": self.cfg.train.amp,
                "model": self.cfg.model.model, "finished_at": now_iso(), "steady_steps": tp.measured_steps,
                "steady_s": rounded(tp.steady_s, 3), "images": tp.images, "energy_j": rounded(tp.energy_j, 3),
                "energy_source": tp.energy_source}

    def epoch_row(self, epoch: int, result: EpochResult, val: EvalResult, ema_val: EvalResult | None,
                  elapsed_s: float) -> dict[str, Any]:
        train = result.totals
        return {"epoch": epoch, "steps": self.state.position.global_step, "train_loss": round(train.loss, 6),
                "train_acc1": round(train.acc1, 4), "train_acc5": round(train.acc5, 4),
                "val_loss": round(val.loss, 6), "val_acc1": round(val.acc1, 4), "val_acc5": round(val.acc5, 4),
                "val_top1_correct": val.top1_correct, "val_top5_correct": val.top5_correct,
                "val_total": val.total, "lr": self.stepper.lr, "epoch_time_s": round(elapsed_s, 3),
                "peak_mem_mib": round(peak_memory_mib(self.device), 1), **self.common_columns(result.throughput),
                "ema_val_acc1": round(ema_val.acc1, 4) if ema_val else "",
                "ema_val_acc5": round(ema_val.acc5, 4) if ema_val else ""}

    def outcome(self, *, finished: bool, preempted: bool, **extra: Any) -> dict[str, Any]:
        pos = self.state.position
        return {"finished": finished, "preempted": preempted, "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch,
                "global_step": pos.global_step, "best_acc1": pos.best_acc1, "run_dir": str(self.run_dir), **extra}

    # ---- the two modes ----------------------------------------------------------------------------------
    def fit(self, flag: PreemptionFlag) -> dict[str, Any]:
        """Train the remaining epochs; validate, record and checkpoint after each."""
        epochs, pos = self.cfg.train.epochs, self.state.position
        if pos.epoch >= epochs:
            log.info("%s already finished its %d epochs; nothing to do (raise --epochs to train on)",
                     pos.resumed_from, epochs)
            return self.outcome(finished=True, preempted=False, already_finished=True)
        self.write_run_metadata()
        self.record_state("training")
        for table in (EPOCHS_FILE, RANKS_FILE):
            distributed.on_main_process(forget_epochs_from, self.run_dir / table, pos.epoch)
        log.info("training %s on %d process(es) of %d intra-op thread(s), %d batches of %d per process per epoch, "
                 "epochs %d..%d", self.cfg.model.model, self.env.world_size, torch.get_num_threads(), len(self.loader),
                 self.cfg.train.batch_size, pos.epoch, epochs - 1)
        while pos.epoch < epochs:
            epoch = pos.epoch
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            start_step = pos.step_in_epoch
            result = run_epoch(self.stepper, self.loader, epoch=epoch, start_step=start_step,
                               print_freq=self.cfg.train.print_freq, stop=flag.stop_agreed, carried=pos.carried,
                               on_log=self.tracker.log_step)
            pos.global_step += (result.step_in_epoch - start_step) // self.cfg.optim.accum_steps  # optimizer steps
            pos.step_in_epoch, pos.carried = result.step_in_epoch, result.sums
            pos.carried_s += result.elapsed_s
            if result.stopped:
                state = self.state.state_dict(result.step_in_epoch, epoch, result.sums)
                distributed.on_main_process(self.save, state)
                self.record_state("preempted")
                return self.outcome(finished=False, preempted=True)
            self.end_epoch(epoch, result)
            if pos.epoch < epochs and flag.stop_agreed():
                self.record_state("preempted")
                return self.outcome(finished=False, preempted=True)
        self.record_state("finished")
        return self.outcome(finished=True, preempted=False)

    def record_state(self, state: str, error: str = "") -> None:
        """run_state.json (pipeline/core/records.py), so the report tells a stopped run from a failed one."""
        record = {"state": state, "epochs_done": self.state.position.epoch, "at": now_iso()}
        if error:
            record["error"] = error
        distributed.on_main_process(write_record, self.run_dir / RUN_STATE_FILE, record)

    def end_epoch(self, epoch: int, result: EpochResult) -> None:
        """Validate (the EMA too), append the epoch's row, write the checkpoints."""
        assert self.val_loader is not None
        ema = self.stepper.ema
        if not self.cfg.model.sync_bn:  # validate and save the statistics every rank has: rank 0's
            broadcast_buffers_from_rank0(self.raw_model, *([ema.module] if ema is not None else []))
        val = validate(self.raw_model, self.val_loader, self.precision, self.val_to_device,
                       expected_total=self.info.val_size)
        ema_val = None
        if ema is not None:
            ema_val = validate(ema.module, self.val_loader, self.precision, self.val_to_device,
                               expected_total=self.info.val_size, desc="val (EMA)")
        pos = self.state.position
        is_best = val.acc1 > pos.best_acc1
        pos.best_acc1 = max(pos.best_acc1, val.acc1)
        row = self.epoch_row(epoch, result, val, ema_val, pos.carried_s)
        pos.epoch, pos.step_in_epoch, pos.carried, pos.carried_s = epoch + 1, 0, None, 0.0
        distributed.on_main_process(append_row, self.run_dir / EPOCHS_FILE, row, EPOCH_COLUMNS)
        tp = result.throughput
        distributed.on_main_process(write_rank_rows, self.run_dir / RANKS_FILE, epoch, tp.ranks, tp.measured_steps,
                                    self.cfg.train.straggler_fraction)
        self.tracker.log_epoch(row)
        self.record_state("training")
        train = result.totals
        distributed.on_main_process(
            log.info, "Epoch %d trained in %.1f s: train loss %.4f Acc@1 %.3f Acc@5 %.3f | val %s%s | %.1f img/s all "
            "ranks (%.1f per rank), loader wait %.1f%%, device waiting for input %.1f%%", epoch, row["epoch_time_s"],
            train.loss, train.acc1, train.acc5, val.line(), f" | EMA {ema_val.line()}" if ema_val else "",
            row["img_per_s_all_ranks"], row["img_per_s_per_rank"], 100 * result.throughput.data_wait_frac,
            100 * result.throughput.device_wait_frac)
        keep = pos.epoch % self.cfg.train.save_every == 0 or pos.epoch == self.cfg.train.epochs
        state = self.state.state_dict(0, pos.epoch, None)
        distributed.on_main_process(self.save, state, keep_epoch=keep, best=is_best)

    def perf(self, flag: PreemptionFlag) -> dict[str, Any]:
        """Performance mode: max_steps steps, one perf.csv row; no validation, no checkpoints."""
        self.write_run_metadata()
        cfg = self.cfg
        tp = run_perf(self.stepper, self.loader, self.sampler, max_steps=cfg.train.max_steps,
                      print_freq=cfg.train.print_freq, stop=flag.stop_agreed, on_log=self.tracker.log_step)
        if tp is None:
            log.warning("performance run stopped by a signal before its %d steps; nothing recorded",
                        cfg.train.max_steps)
            return self.outcome(finished=False, preempted=True)
        row = {"steps": cfg.train.max_steps, "warmup_steps": tp.warmup_steps, "batch_size": cfg.train.batch_size,
               "channels_last": cfg.model.channels_last, "device": self.device.type, **self.common_columns(tp),
               "input_wait_ms": rounded(tp.input_wait_ms, 3), "fwd_bwd_ms": rounded(tp.fwd_bwd_ms, 3),
               "optimizer_ms": rounded(tp.optimizer_ms, 3)}
        distributed.on_main_process(append_row, self.run_dir / PERF_FILE, row, PERF_COLUMNS)
        distributed.on_main_process(
            log.info, "performance: %s, %d steps (%d warm-up left out), batch %d x %d processes, amp %s: "
            "%.1f img/s all ranks, %.1f per rank, loader wait %.1f%%, device waiting for input %.1f%%; per step: input "
            "%.1f ms, forward+backward %.1f ms, optimizer %.1f ms", cfg.model.model, cfg.train.max_steps,
            tp.warmup_steps, cfg.train.batch_size, self.env.world_size, cfg.train.amp, tp.img_per_s_all_ranks,
            tp.img_per_s_per_rank, 100 * tp.data_wait_frac, 100 * tp.device_wait_frac, tp.input_wait_ms, tp.fwd_bwd_ms,
            tp.optimizer_ms)
        self.state.position.global_step = cfg.train.max_steps
        return self.outcome(finished=True, preempted=False, perf=row)


def train(cfg: Config) -> dict[str, Any]:
    """The train stage's door (see the module docstring for the files it writes and the preemption contract)."""
    check_trackers_installed(cfg)  # on every rank, before anything runs
    with (locked_by_main_process(cfg.train.run_dir, "training"), watchdog.watching(cfg),
          stage_process(cfg.train.device, workers=cfg.data.workers, threads=cfg.train.threads) as (env, device),
          PreemptionFlag() as flag):
        return _train(cfg, env, device, flag)


def _train(cfg: Config, env: distributed.DistEnv, device: torch.device, flag: PreemptionFlag) -> dict[str, Any]:
    trainer = Trainer(cfg, env, device)
    with contextlib.closing(trainer.tracker):
        if trainer.perf_mode:
            return trainer.perf(flag)
        try:
            return trainer.fit(flag)
        except Exception as exc:
            trainer.record_state("failed", error=f"{type(exc).__name__}: {exc}")
            raise
