"""Checkpoints in a training's life: the copies after a save, the newest valid one for ``--resume auto``, the RNG
state a resume restores, whether a checkpoint fits this run. The file itself (what it holds, its checksum, how it
is written and read) is pipeline.core.checkpoint_file.

Files in ``<run dir>/checkpoints``: ``latest.pt`` (every epoch, and on preemption), ``epoch_NNNN.pt``
(every ``save_every`` epochs, numbered by epochs done) and ``best.pt`` (best val Acc@1). Each is
written to a temporary file, fsynced and renamed, so a kill during a save leaves the previous file whole;
``latest.pt`` is written first and names the copies it owes, so a kill between the files is repaired on
resume (``finish_copies``).
"""
from __future__ import annotations

import hashlib
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.accelerator import Accelerator
from pipeline.core.atomic import atomic_path
from pipeline.core.checkpoint_file import (LATEST, CheckpointError, CorruptCheckpointError, checkpoint_dir,
                                           is_checkpoint_name, load_checkpoint)
from pipeline.core.config import Config, dumps

log = logging.getLogger(__name__)

# Sections that define the numbers a run produces; data.workers or the launcher may change on resume.
DIGEST_SECTIONS = ("model", "optim")


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


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Python, numpy, torch CPU and ``device``'s accelerator RNG states, as tensors and lists (weights_only-
    loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    accelerator = Accelerator.of(device)
    if accelerator.module is not None:
        state[device.type] = accelerator.rng_state()
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    Accelerator.of(device).set_rng_state(state.get(device.type, []))  # what ran before, if the same kind


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples back (a load may hand lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def copy_atomically(src: Path, dst: Path) -> None:
    """A copy keeping ``src``'s mtime, so --resume auto sees it as no newer than latest.pt."""
    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)


def finish_copies(path: Path, names: list[str]) -> None:
    """Make every file in ``names`` (beside ``path``) a copy of ``path``, skipping those that already are: called
    after each save, and on resume to finish the copies a kill between the files left undone."""
    for name in names:
        target = path.parent / name
        if target != path and not same_bytes(path, target):
            copy_atomically(path, target)
            log.info("copied %s to %s", path, target)


def same_bytes(a: Path, b: Path, chunk: int = 1 << 24) -> bool:
    """Whether ``b`` is a file holding exactly ``a``'s bytes (sizes first: a differing copy costs no read)."""
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while block := fa.read(chunk):
            if block != fb.read(chunk):
                return False
    return True


def remove_stale_temporaries(run_dir: str | Path, names: tuple[str, ...] = ()) -> None:
    """Delete temporary files left by a write that was killed (never read, but checkpoints' are large): every one in
    the checkpoint dir, and those of the run-dir files ``names``."""
    folder = Path(run_dir)
    leftovers = [*checkpoint_dir(folder).glob(".*.tmp"), *(t for n in names for t in folder.glob(f".{n}.*.tmp"))]
    for tmp in leftovers:
        log.info("removing %s, left by an interrupted write", tmp)
        tmp.unlink(missing_ok=True)


def _mtime_ns(path: Path) -> float:
    """For ordering; a file that cannot even be stat'ed comes first, so that loading it reports the OS error."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return float("inf")


def newest_valid_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The most recently written of our checkpoints in the run dir that loads (latest.pt on a tie: the copies keep
    its mtime); corrupt ones are skipped with a warning, any other error stops (see the module docstring)."""
    folder = checkpoint_dir(run_dir)
    candidates = sorted((p for p in folder.glob("*.pt") if is_checkpoint_name(p.name)),
                        key=lambda p: (_mtime_ns(p), p.name == LATEST), reverse=True)
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CorruptCheckpointError as exc:
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
