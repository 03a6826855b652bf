"""Checkpoints a run can trust: an OS error stops --resume auto instead of starting over, a kill between latest.pt
and its copies is repaired on resume, and flipped bytes are found on every load."""
from __future__ import annotations

import hashlib
import logging
import os

import pytest
import torch

from jobs.train import main as train_main
from pipeline.core import atomic
from pipeline.core.dir_lock import LOCK_FILE
from pipeline.eval.evaluate import evaluate
from pipeline.models.registry import build_model
from pipeline.core.checkpoint_file import CheckpointError, CorruptCheckpointError, load_checkpoint
from pipeline.train.trainer import train
from train_helpers import read_rows, tiny_argv, tiny_config, tiny_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


def snapshot(run_dir) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file in the run dir but its lock, which names the last training that held it."""
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != LOCK_FILE}


def make_unreadable(path, how: str) -> None:
    """Conditions in which the OS refuses to read ``path`` even to root (chmod 000 does not stop root)."""
    path.unlink()
    if how == "directory":
        path.mkdir()
    else:
        path.symlink_to(path.name)  # a symlink to itself: ELOOP


@pytest.mark.parametrize("how, os_error", [("directory", "Is a directory"),
                                           ("symlink loop", "Too many levels of symbolic links")])
def test_resume_auto_stops_at_a_checkpoint_the_os_cannot_read_and_changes_nothing(data_dir, tmp_path, capsys, how,
                                                                                   os_error):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "1", "--save-every", "1"))
    latest = run_dir / "checkpoints" / "latest.pt"
    make_unreadable(latest, how)
    before = snapshot(run_dir)
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        train_main(tiny_argv(data_dir, run_dir, "--epochs", "2", "--resume", "auto"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot read checkpoint {latest}: " in err and os_error in err and "Traceback" not in err
    assert snapshot(run_dir) == before  # best.pt and epoch_0001.pt were not taken in its place: nothing redone


def flip_middle_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_found_by_every_load_and_resume_auto_takes_the_next_valid_checkpoint(data_dir, tmp_path,
                                                                                               capsys):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "1"))
    folder = run_dir / "checkpoints"
    latest = folder / "latest.pt"
    flip_middle_byte(latest)  # inside a tensor: zip CRCs are not checked there, torch.load alone loads it

    with pytest.raises(CorruptCheckpointError, match="does not match the checksum saved with it"):
        load_checkpoint(latest)
    with pytest.raises(CheckpointError, match=f"checkpoint {latest} is corrupt"):
        evaluate(tiny_config(data_dir, run_dir, "--checkpoint", str(latest)))
    with pytest.raises(CheckpointError, match=f"checkpoint {latest} is corrupt"):
        build_model("resnet18", num_classes=4, pretrained=str(latest))

    capsys.readouterr()
    result = train(tiny_config(data_dir, run_dir, "--epochs", "2", "--resume", "auto"))
    assert result["finished"]
    err = capsys.readouterr().err
    assert f"skipping checkpoint: checkpoint {latest} is corrupt" in err
    assert "resumed from" in err and "epoch 1, 0 of its 8 batches done" in err  # from one of latest.pt's copies
    assert [r["epoch"] for r in read_rows(run_dir / "epochs.csv")] == ["0", "1"]
    assert load_checkpoint(latest)["epoch"] == 2


def test_a_checkpoint_saved_without_a_checksum_still_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.ones(2)}, "model_name": "m", "num_classes": 4, "epoch": 1, "step_in_epoch": 0,
                "global_step": 8}, path)
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(path)["epoch"] == 1
    assert "has no checksum (saved before checksums were stored): loaded unverified" in caplog.text


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing records or cleans up after it."""


@pytest.mark.parametrize("files_written", [1, 2])
def test_a_kill_between_latest_and_its_copies_is_repaired_on_resume(data_dir, tmp_path, monkeypatch, files_written):
    """The last epoch's save writes latest.pt, epoch_0002.pt and (when the epoch is the best) best.pt; a kill after
    the first ``files_written`` of them must not leave the copies missing or stale for good."""
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    renamed = []
    real_fsync_dir = atomic.fsync_dir

    def kill_during_the_last_save(path):
        real_fsync_dir(path)  # called after each rename
        if path == folder and len(read_rows(run_dir / "epochs.csv")) == 2:
            renamed.append(path)
            if len(renamed) == files_written:
                raise Killed

    monkeypatch.setattr(atomic, "fsync_dir", kill_during_the_last_save)
    with pytest.raises(Killed):
        train(tiny_config(data_dir, run_dir, "--epochs", "2"))
    monkeypatch.undo()
    leftovers = [folder / ".best.pt.k1ll3d.tmp", run_dir / ".epochs.csv.k1ll3d.tmp"]
    for tmp in leftovers:
        tmp.write_bytes(b"left by a killed write")

    result = train(tiny_config(data_dir, run_dir, "--epochs", "2", "--resume", "auto"))
    assert result["already_finished"]
    rows = read_rows(run_dir / "epochs.csv")
    accs = [float(r["val_acc1"]) for r in rows]
    assert accs[1] > accs[0], "the test needs the last epoch to be the best, so best.pt is among the copies owed"
    assert (folder / "epoch_0002.pt").read_bytes() == (folder / "latest.pt").read_bytes()
    best = load_checkpoint(folder / "best.pt")
    assert best["epoch"] == 2 and best["best_acc1"] == pytest.approx(accs[1], abs=1e-3)
    assert not any(os.path.exists(tmp) for tmp in leftovers)
