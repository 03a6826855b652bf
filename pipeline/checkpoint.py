"""Training checkpoints: atomic saves, weights-only loads, the newest valid one for ``--resume auto``.

A checkpoint is a dict of tensors and plain Python values only, so ``torch.load(weights_only=True)``
reads it (RNG states are stored as tensors and lists, not numpy objects)::

    model, optimizer, scheduler, scaler, ema   state dicts (model unwrapped: no DDP/compile prefixes)
    model_name, num_classes, config_digest     what must match to resume
    epoch, step_in_epoch                       where training resumes: batches done in that epoch
    global_step, best_acc1, finished
    rng, epoch_start_rng                       per rank: now, and at the start of the epoch in progress
    world_size, batch_size                     the sharding that step_in_epoch refers to

Files in ``<run dir>/checkpoints``: ``latest.pt`` (every epoch, and on preemption), ``epoch_NNNN.pt``
(every ``save_every`` epochs, numbered by epochs done) and ``best.pt`` (best val Acc@1). Each is
written to a temporary file, fsynced and renamed, so a kill during a save leaves the previous file whole.
"""
from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import atomic_path
from pipeline.config import Config, dumps
from pipeline.records import CHECKPOINT_DIR

log = logging.getLogger(__name__)

LATEST, BEST = "latest.pt", "best.pt"
REQUIRED_KEYS = ("model", "model_name", "num_classes", "epoch", "step_in_epoch", "global_step")
# Sections that define the numbers a run produces; data.workers or the launcher may change on resume.
DIGEST_SECTIONS = ("model", "optim")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not belong to this run."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def epoch_file(epochs_done: int) -> str:
    return f"epoch_{epochs_done:04d}.pt"


def config_digest(cfg: Config) -> str:
    """A short hash of the sections that change the results (model and optimizer), to flag a changed recipe."""
    text = dumps(cfg)
    kept = []
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        if section in DIGEST_SECTIONS:
            kept.append(line)
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and accelerator RNG states, as tensors and lists (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples back (a load may hand lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save into a temporary file beside ``path``, fsync, rename: never a half-written ``path``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    log.info("saved checkpoint %s (epoch %d, step %d of the epoch)", path, state["epoch"], state["step_in_epoch"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of ours, read with weights_only=True onto the CPU; CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {exc}") from exc
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of this pipeline (missing {missing}); "
                              "to start from plain weights use --pretrained")
    return state


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete temporary files left by a save that was killed (they are never read, but they are large)."""
    for tmp in checkpoint_dir(run_dir).glob(".*.tmp"):
        log.info("removing %s, left by an interrupted save", tmp)
        tmp.unlink(missing_ok=True)


def newest_valid_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The most recently written checkpoint in the run dir that loads (latest.pt on a tie: the copies keep its
    mtime); corrupt ones are skipped with a warning."""
    folder = checkpoint_dir(run_dir)
    candidates = sorted(folder.glob("*.pt"), key=lambda p: (p.stat().st_mtime_ns, p.name == LATEST), reverse=True)
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def resolve_resume(resume: str, run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``--resume`` names ('' none, 'auto' the newest valid one, else a path) and its state."""
    if not resume:
        return None
    if resume == "auto":
        found = newest_valid_checkpoint(run_dir)
        if found is None:
            log.info("--resume auto: no valid checkpoint in %s; starting from scratch", checkpoint_dir(run_dir))
        return found
    return Path(resume), load_checkpoint(resume)


def check_compatible(state: dict[str, Any], path: Path, *, model_name: str, num_classes: int,
                     digest: str) -> None:
    """Refuse a checkpoint of another model or class count; warn when the recipe changed."""
    if state["model_name"] != model_name:
        raise CheckpointError(f"checkpoint {path} is of model {state['model_name']!r}, but this run trains "
                              f"{model_name!r}; resume with --model {state['model_name']} or use a new --run-dir")
    if state["num_classes"] != num_classes:
        raise CheckpointError(f"checkpoint {path} has {state['num_classes']} classes, but the data dir has "
                              f"{num_classes}; point --data-dir at the data it was trained on or use a new --run-dir")
    if state.get("config_digest") not in (None, digest):
        log.warning("checkpoint %s was written with another model/optim config (digest %s, now %s); "
                    "resuming with the current one", path, state.get("config_digest"), digest)
