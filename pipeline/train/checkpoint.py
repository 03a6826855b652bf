"""Training checkpoints: atomic saves, weights-only loads, the newest valid one for ``--resume auto``.

What a checkpoint holds is pipeline.train.state.TrainingState's ``state_dict`` (tensors and plain Python values
only, so ``torch.load(weights_only=True)`` reads it; RNG states as tensors and lists, not numpy objects), plus
``copies`` (every file that must hold this state, latest.pt first) and ``content_sha256`` (a checksum of all
the rest, verified on every load).

Files in ``<run dir>/checkpoints``: ``latest.pt`` (every epoch, and on preemption), ``epoch_NNNN.pt``
(every ``save_every`` epochs, numbered by epochs done) and ``best.pt`` (best val Acc@1). Each is
written to a temporary file, fsynced and renamed, so a kill during a save leaves the previous file whole;
``latest.pt`` is written first and names the copies it owes, so a kill between the files is repaired on
resume (``finish_copies``).

The checksum is of the loaded content (every tensor's bytes, every value), embedded in the file: zip CRCs
are not checked for every record, so flipped bytes would otherwise load silently; embedded, it cannot fall
out of step with its file after a kill, travels with every copy, and plain ``torch.load`` still reads the
file. Checkpoints saved before checksums existed load with a warning.

Errors: a file that does not parse or fails its checksum is provably corrupt (CorruptCheckpointError), the
only kind ``--resume auto`` skips; one the OS cannot read (permissions, I/O error, a directory) stops the
run with the OS error and changes nothing, since skipping it would start over and overwrite its work.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.accelerator import Accelerator
from pipeline.core.atomic import atomic_path
from pipeline.core.config import Config, dumps
from pipeline.core.errors import UserError
from pipeline.core.records import CHECKPOINT_DIR

log = logging.getLogger(__name__)

LATEST, BEST = "latest.pt", "best.pt"
CHECKSUM_KEY = "content_sha256"
REQUIRED_KEYS = ("model", "model_name", "num_classes", "epoch", "step_in_epoch", "global_step")
PASS_A_CHECKPOINT = "pass a training checkpoint (a run dir's checkpoints/latest.pt), or --resume auto"
# Sections that define the numbers a run produces; data.workers or the launcher may change on resume.
DIGEST_SECTIONS = ("model", "optim")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, or does not belong to this run."""


class CorruptCheckpointError(CheckpointError):
    """Provably incomplete or corrupt (does not parse, or fails its checksum): --resume auto may skip it."""


class NotATrainingCheckpointError(CheckpointError):
    """A readable weights file without our keys: plain weights, which eval and --pretrained can still use."""


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


def content_sha256(obj: Any) -> str:
    """sha256 of a checkpoint's content as ``torch.load`` gives it back: dtype, shape and bytes of every tensor,
    repr of every other value (lists and tuples alike: the unpickler may return either)."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)}".encode())
        for value in obj:
            _feed(digest, value)
    else:
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save, with the content's checksum, into a temporary file beside ``path``, fsync, rename: never a
    half-written ``path``."""
    with atomic_path(path) as tmp:
        torch.save({**state, CHECKSUM_KEY: content_sha256(state)}, tmp)
    log.info("saved checkpoint %s (epoch %d, step %d of the epoch)", path, state["epoch"], state["step_in_epoch"])


def read_verified(path: Path) -> Any:
    """What ``torch.load(weights_only=True)`` gives for ``path``, its checksum (when it has one) checked and removed.

    The bytes are read before they are parsed, so an OS error (CheckpointError) is told from bad content
    (CorruptCheckpointError).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}; nothing was changed: make it readable "
                              "(or move it aside) and run again") from exc
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt or truncated: {exc}") from exc
    if not isinstance(obj, dict) or CHECKSUM_KEY not in obj:
        if isinstance(obj, dict) and "model_name" in obj:
            log.warning("checkpoint %s has no checksum (saved before checksums were stored): loaded unverified", path)
        return obj
    expected = obj.pop(CHECKSUM_KEY)
    actual = content_sha256(obj)
    if actual != expected:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: its content does not match the checksum saved "
                                     f"with it (sha256 {actual[:16]}, saved {str(expected)[:16]})")
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of ours, read with weights_only=True onto the CPU and verified; CheckpointError if it cannot be
    used (CorruptCheckpointError when it is provably corrupt)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = read_verified(path)
    require_training_keys(state, path)
    return state


def require_training_keys(state: Any, path: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise NotATrainingCheckpointError(f"{path} is not a training checkpoint of this pipeline (missing {missing}); "
                                          "to start from plain weights use --pretrained")


def check_training_checkpoint(path: str | Path) -> None:
    """Refuse a path that is not a training checkpoint of ours, reading no tensor (mmap): the launcher's check of
    ``--resume PATH`` before anything is submitted. The job still verifies the checksum when it loads the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such file; {PASS_A_CHECKPOINT}")
    if not zipfile.is_zipfile(path):
        raise NotATrainingCheckpointError(f"--resume {path}: not a checkpoint (not a zip archive, as torch.save "
                                          f"writes); {PASS_A_CHECKPOINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # its message can span lines and quote bytes of the file: named, not shown
        raise NotATrainingCheckpointError(f"--resume {path}: a zip archive torch cannot load "
                                          f"({type(exc).__name__}); {PASS_A_CHECKPOINT}") from exc
    require_training_keys(state, path)


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


def is_checkpoint_name(name: str) -> bool:
    return name in (LATEST, BEST) or (name.startswith("epoch_") and name.endswith(".pt"))


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
