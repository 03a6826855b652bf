"""Live metrics: TensorBoard event files read back with TensorBoard's own reader, a resume that never runs a curve
back, and Weights & Biases asked for without being installed."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.core.config import ConfigError
from pipeline.train.tracking import TENSORBOARD_DIR
from pipeline.train.trainer import train
from train_helpers import read_rows, tiny_config, tiny_data

STEPS_PER_EPOCH = 2  # 2 classes x 8 train images, batches of 8
STEP_TAGS = {"train/loss", "train/acc1", "train/acc5", "train/lr", "train/img_per_s", "train/data_wait_s"}
EPOCH_TAGS = {"epoch/train_acc1", "epoch/train_acc5", "epoch/val_acc1", "epoch/val_acc5", "epoch/ema_val_acc1",
              "epoch/ema_val_acc5", "epoch/epoch_time_s", "epoch/peak_mem_mib", "epoch/img_per_s_all_ranks"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"), num_classes=2, train_per_class=8, val_per_class=2)


def scalars(run_dir, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points, as TensorBoard shows them (``purge``: after its restart rule)."""
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), purge_orphaned_data=purge,
                              size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_event_files_hold_the_step_and_epoch_scalars_at_the_global_step(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "2", "--ema-decay", "0.9"))
    points = scalars(run_dir)
    assert STEP_TAGS | EPOCH_TAGS <= set(points)
    assert [step for step, _ in points["train/loss"]] == [1, 2, 3, 4]  # --print-freq 1
    rows = read_rows(run_dir / "epochs.csv")
    for tag in ("val_acc1", "train_acc5", "ema_val_acc1", "epoch_time_s"):
        assert points[f"epoch/{tag}"] == [(int(r["steps"]), pytest.approx(float(r[tag]), abs=1e-3)) for r in rows]
    assert [step for step, _ in points["epoch/val_acc1"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert all(value > 0 for _, value in points["train/img_per_s"])
    assert len(list((run_dir / TENSORBOARD_DIR).iterdir())) == 1  # one process, one event file


def test_a_resume_from_an_older_checkpoint_continues_the_curves_without_running_back(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "3", "--save-every", "1"))
    older = run_dir / "checkpoints" / "epoch_0001.pt"
    train(tiny_config(data_dir, run_dir, "--epochs", "3", "--resume", str(older)))  # redoes epochs 1 and 2
    raw = scalars(run_dir, purge=False)
    assert [s for s, _ in raw["train/loss"]] == [1, 2, 3, 4, 5, 6, 3, 4, 5, 6]  # both runs' points are in the files
    shown = scalars(run_dir)
    assert [s for s, _ in shown["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in shown["epoch/val_acc1"]] == [2, 4, 6]
    assert len(list((run_dir / TENSORBOARD_DIR).iterdir())) == 2
    rows = read_rows(run_dir / "epochs.csv")
    assert [v for _, v in shown["epoch/val_loss"]] == [pytest.approx(float(r["val_loss"]), abs=1e-5) for r in rows]


def test_no_tensorboard_writes_no_event_file(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "1", "--no-tensorboard"))
    assert (run_dir / "epochs.csv").exists() and not (run_dir / TENSORBOARD_DIR).exists()


def test_wandb_asked_for_but_not_installed_is_one_line_before_anything_runs(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, wherever the test runs
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"\(--wandb\) needs the wandb package.*pip install wandb.*--no-wandb"):
        train(tiny_config(data_dir, run_dir, "--epochs", "1", "--wandb"))
    assert not (run_dir / "epochs.csv").exists() and not (run_dir / "checkpoints").exists()


class FakeWandb(types.ModuleType):
    """The part of wandb's API the sink uses, recording the calls."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what find_spec finds in sys.modules
        self.inits, self.points, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.points.append((step, data))

    def finish(self):
        self.finished += 1


def test_wandb_gets_the_same_points_and_a_resume_continues_the_same_run(data_dir, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "1", "--wandb", "--no-tensorboard"))
    train(tiny_config(data_dir, run_dir, "--epochs", "2", "--wandb", "--no-tensorboard", "--resume", "auto"))
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    assert [(i["id"], i["resume"]) for i in fake.inits] == [(run_id, "allow")] * 2 and fake.finished == 2
    assert fake.inits[0]["config"]["train"]["epochs"] == 1
    steps = [step for step, data in fake.points if "train/loss" in data]
    assert steps == [1, 2, 3, 4]
    assert [step for step, data in fake.points if "epoch/val_acc1" in data] == [2, 4]
