"""train(cfg) on real JPEG folders, one process: it learns, records, resumes exactly, and refuses bad input."""
from __future__ import annotations

import json
import signal

import pytest

from jobs.train import main as train_main
from pipeline.core.records import EPOCH_COLUMNS, PERF_COLUMNS, PROVENANCE_FILE, RUN_STATE_FILE
from pipeline.core.checkpoint_file import CheckpointError, load_checkpoint
from pipeline.train.trainer import train
from train_helpers import (assert_same_weights, checkpoint_weights, read_rows, run_module, start_module,
                           tiny_argv, tiny_config, tiny_data)

CHANCE_ACC1 = 25.0  # 4 classes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


def test_training_learns_and_records_every_epoch(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tiny_config(data_dir, run_dir, "--epochs", "3"))
    assert result["finished"] and not result["preempted"] and result["global_step"] == 24  # 3 epochs x 8 steps
    assert read_state(run_dir)[:2] == ("finished", 3)

    rows = read_rows(run_dir / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert list(rows[0]) == list(EPOCH_COLUMNS)
    assert float(rows[-1]["val_acc1"]) >= 2.5 * CHANCE_ACC1, rows
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    for row in rows:
        assert int(row["val_total"]) == 24 and row["world_size"] == "1" and row["amp"] == "none"
        assert float(row["img_per_s_all_ranks"]) == float(row["img_per_s_per_rank"]) > 0
        assert 0 <= float(row["data_wait_frac"]) < 1
        assert float(row["val_acc1"]) == pytest.approx(100 * int(row["val_top1_correct"]) / 24, abs=1e-3)
        assert row["ema_val_acc1"] == ""
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["best_acc1"] == pytest.approx(max(float(r["val_acc1"]) for r in rows), abs=1e-3)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "epoch_0003.pt", "latest.pt"]
    provenance = json.loads((run_dir / PROVENANCE_FILE).read_text())
    assert provenance["world_size"] == 1 and provenance["device_type"] == "cpu" and provenance["seed"] == 0
    assert (run_dir / "config.toml").read_text().count('model = "resnet18"') == 1


@pytest.mark.parametrize("extra, scaled, ema_updates", [
    (("--amp", "bf16", "--ema-decay", "0.9"), False, 8),  # one EMA update per step
    (("--amp", "fp16", "--ema-decay", "0.9", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--ema-steps", "3",
      "--ra-reps", "2"), True, 2),  # updates after steps 3 and 6 of 8
])
def test_mixed_precision_ema_and_soft_targets_train_and_are_checkpointed(data_dir, tmp_path, extra, scaled,
                                                                         ema_updates):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "1", *extra))
    [row] = read_rows(run_dir / "epochs.csv")
    assert row["amp"] == extra[1]
    assert 0 <= float(row["ema_val_acc1"]) <= 100 and 0 <= float(row["train_acc1"]) <= 100
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert (state["scaler"] is not None) == scaled
    assert int(state["ema"]["n_averaged"]) == ema_updates


def test_performance_mode_writes_one_perf_row_and_nothing_else(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tiny_config(data_dir, run_dir, "--max-steps", "12", "--amp", "bf16"))  # 1.5 epochs
    rows = read_rows(run_dir / "perf.csv")
    assert len(rows) == 1 and list(rows[0]) == list(PERF_COLUMNS)
    row = rows[0]
    assert (row["steps"], row["warmup_steps"], row["batch_size"], row["channels_last"]) == ("12", "5", "8", "True")
    assert float(row["img_per_s_all_ranks"]) > 0 and result["perf"]["steps"] == 12
    assert not (run_dir / "epochs.csv").exists() and not (run_dir / "checkpoints").exists()


def test_resuming_a_finished_run_does_nothing_and_says_so(data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "1"))
    before = (run_dir / "epochs.csv").read_text()
    result = train(tiny_config(data_dir, run_dir, "--epochs", "1", "--resume", "auto"))
    assert result["finished"] and result["already_finished"]
    assert "already finished its 1 epochs; nothing to do" in capsys.readouterr().err
    assert (run_dir / "epochs.csv").read_text() == before


def test_resuming_from_an_older_checkpoint_redoes_its_epochs_without_duplicate_rows(data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "2", "--save-every", "1"))
    first = read_rows(run_dir / "epochs.csv")
    older = run_dir / "checkpoints" / "epoch_0001.pt"
    train(tiny_config(data_dir, run_dir, "--epochs", "2", "--resume", str(older)))
    again = read_rows(run_dir / "epochs.csv")
    assert [r["epoch"] for r in again] == ["0", "1"]
    assert again[0] == first[0] and again[1]["train_loss"] == first[1]["train_loss"]
    assert "dropping 1 row(s) of epoch 1 and later" in capsys.readouterr().err


def test_resume_refuses_another_model_or_class_count(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "1"))
    with pytest.raises(CheckpointError, match="model 'resnet18'.*--model resnet18"):
        train(tiny_config(data_dir, run_dir, "--epochs", "2", "--resume", "auto", "--model", "resnet34"))
    other_data = tiny_data(tmp_path / "data3", num_classes=3)
    with pytest.raises(CheckpointError, match="4 classes, but the data dir has 3"):
        train(tiny_config(other_data, run_dir, "--epochs", "2", "--resume", "auto"))


@pytest.fixture(scope="module")
def uninterrupted_run(data_dir, tmp_path_factory):
    """The reference: 2 epochs in one go, in a subprocess like the interrupted runs."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    done = run_module("jobs.train", tiny_argv(data_dir, run_dir, "--epochs", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGUSR1", "SIGTERM", "SIGKILL"])
def test_resume_after_an_interruption_mid_epoch_reproduces_the_uninterrupted_run(data_dir, tmp_path,
                                                                                  uninterrupted_run, how):
    run_dir = tmp_path / "run"
    argv = tiny_argv(data_dir, run_dir, "--epochs", "2", "--resume", "auto")
    proc = start_module("jobs.train", argv)
    log_lines = run_until_mid_epoch_1(proc, signal.Signals[how])
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert read_state(run_dir)[:2] == ("training" if how == "SIGKILL" else "preempted", 1)
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (1, 0)  # the end of epoch 0
    else:
        assert proc.returncode == 0, "".join(log_lines[-20:])
        assert checkpoint["epoch"] == 1 and 3 <= checkpoint["step_in_epoch"] <= 8, checkpoint["step_in_epoch"]
        assert checkpoint["epoch_sums"][3] == 8 * checkpoint["step_in_epoch"]  # images seen in the epoch so far
        assert any(f"received {how}" in line for line in log_lines)

    first = json.loads((run_dir / PROVENANCE_FILE).read_text())
    assert "resumes" not in first
    first["started_at"] = "2025-01-01T00:00:00+00:00"  # so that the kept time cannot be this job's by chance
    (run_dir / PROVENANCE_FILE).write_text(json.dumps(first))
    resumed = run_module("jobs.train", argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    provenance = json.loads((run_dir / PROVENANCE_FILE).read_text())
    assert (provenance["started_at"], provenance["resumes"]) == (first["started_at"], 1)
    assert provenance["resumed_at"] > "2026"
    assert read_state(run_dir)[:2] == ("finished", 2)
    assert_same_weights(checkpoint_weights(run_dir / "checkpoints" / "latest.pt"),
                        checkpoint_weights(uninterrupted_run / "checkpoints" / "latest.pt"))
    compared = ("epoch", "steps", "train_loss", "train_acc1", "val_loss", "val_top1_correct", "val_top5_correct")
    assert [{k: r[k] for k in compared} for r in read_rows(run_dir / "epochs.csv")] == \
        [{k: r[k] for k in compared} for r in read_rows(uninterrupted_run / "epochs.csv")]


def read_state(run_dir) -> tuple[str, int, str]:
    record = json.loads((run_dir / RUN_STATE_FILE).read_text())
    return record["state"], record["epochs_done"], record.get("error", "")


def test_a_failing_run_records_its_error_before_it_raises(data_dir, tmp_path, monkeypatch):
    def broken_validation(*args, **kwargs):
        raise RuntimeError("the val disk went away")

    monkeypatch.setattr("pipeline.train.trainer.validate", broken_validation)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the val disk went away"):
        train(tiny_config(data_dir, run_dir, "--epochs", "2"))
    assert read_state(run_dir) == ("failed", 0, "RuntimeError: the val disk went away")


def run_until_mid_epoch_1(proc, signum: signal.Signals) -> list[str]:
    """Let the run reach step 3 of epoch 1, send ``signum``, return the whole log."""
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if "Epoch: [1] [3/8]" in line:
            proc.send_signal(signum)
            break
    lines += proc.stderr.readlines()
    proc.wait(timeout=60)
    return lines


@pytest.mark.parametrize("flags, message", [
    (("--model", "no_such_net"), "unknown model 'no_such_net'; known models: "),
    (("--batch-size", "100"), "batch size 100 per process is larger than the 64 training images"),
    (("--device", "npu"), "--device npu needs the torch_npu package"),
    (("--resume", "missing.pt"), "checkpoint missing.pt does not exist"),
    (("--epochs", "2", "--warmup-epochs", "2"), "leave no epoch of the main schedule"),
])
def test_bad_input_exits_2_with_a_clear_message(data_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train_main(tiny_argv(data_dir, tmp_path / "run", *flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jobs.train: error: ") and message in err and "Traceback" not in err


def test_empty_data_dir_exits_2_with_a_clear_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        train_main(tiny_argv(tmp_path / "empty", tmp_path / "run"))
    assert exit_info.value.code == 2
    assert "has no train/ and val/ folders" in capsys.readouterr().err


def test_a_missing_device_in_a_real_process_prints_no_traceback(data_dir, tmp_path):
    done = run_module("jobs.train", tiny_argv(data_dir, tmp_path / "run", "--device", "npu"))
    assert done.returncode == 2
    assert "--device npu needs the torch_npu package" in done.stderr and "Traceback" not in done.stderr


# Epoch 0 trains at lr 0.05, epoch 1 at 0.05 x 1e30: its first step blows the weights up, its second loss is not finite.
DIVERGING = ("--epochs", "3", "--save-every", "1", "--scheduler", "step", "--lr-step-size", "1", "--lr-gamma", "1e30")


@pytest.mark.parametrize("extra", [("--print-freq", "1"), ("--print-freq", "100"), ("--amp", "fp16")])
def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_saves_nothing_after_it(data_dir, tmp_path, capsys,
                                                                                       extra):
    """Whether the loss is looked at every step or only at the epoch's end, and also with fp16's GradScaler (which
    forgives short streaks of overflows, but not one still running when the epoch ends)."""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_main(tiny_argv(data_dir, run_dir, *DIVERGING, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    message = "training diverged: the loss became NaN or infinite at step 2 of epoch 1; lower --lr"
    assert message in err and "Traceback" not in err
    state, epochs_done, error = read_state(run_dir)
    assert (state, epochs_done) == ("failed", 1) and message in error
    assert [r["epoch"] for r in read_rows(run_dir / "epochs.csv")] == ["0"]
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "epoch_0001.pt", "latest.pt"]
    for path in folder.iterdir():
        checkpoint = load_checkpoint(path)
        assert checkpoint["epoch"] == 1
        assert all(t.isfinite().all() for t in checkpoint["model"].values() if t.is_floating_point())
