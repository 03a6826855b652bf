"""The checkpoint file: what a training checkpoint holds, how it is written and read, its names in a run dir.

A shared format (training writes it; resume, eval, ``--pretrained`` and the launcher's check read it), so it lives in
the core and no stage imports another's code to read it. What a checkpoint holds is
pipeline.train.state.TrainingState's ``state_dict`` (tensors and plain Python values only, so
``torch.load(weights_only=True)`` reads it; RNG states as tensors and lists, not numpy objects), plus ``copies``
(every file that must hold this state, latest.pt first) and ``content_sha256`` (a checksum of all the rest, verified
on every load).

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
import zipfile
from pathlib import Path
from typing import Any

import torch

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import UserError
from pipeline.core.records import CHECKPOINT_DIR

log = logging.getLogger(__name__)

LATEST, BEST = "latest.pt", "best.pt"
CHECKSUM_KEY = "content_sha256"
REQUIRED_KEYS = ("model", "model_name", "num_classes", "epoch", "step_in_epoch", "global_step")
PASS_A_CHECKPOINT = "pass a training checkpoint (a run dir's checkpoints/latest.pt), or --resume auto"
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


def is_checkpoint_name(name: str) -> bool:
    return name in (LATEST, BEST) or (name.startswith("epoch_") and name.endswith(".pt"))
