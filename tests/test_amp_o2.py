"""AMP O2 (--amp fp16-o2, bf16-o2) on the CPU: low-precision weights with norm layers in fp32, fp32 master weights
stepped by the optimizer and saved in checkpoints, fp16 loss scaling (dynamic or static), exact resume."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from pipeline.core.checkpoint_file import load_checkpoint
from pipeline.core.config import ConfigError
from pipeline.core.precision import setup_precision
from pipeline.core.validate import validate
from pipeline.models.registry import build_model
from pipeline.train.trainer import train
from train_helpers import interrupted_and_resumed, read_rows, run_module, tiny_argv, tiny_config, tiny_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("amp, low", [("fp16-o2", torch.float16), ("bf16-o2", torch.bfloat16)])
def test_o2_steps_fp32_master_weights_of_a_low_precision_model_with_fp32_batchnorm(amp, low):
    torch.manual_seed(0)
    precision = setup_precision(torch.device("cpu"), amp, channels_last=True)
    master = precision.prepare_model(build_model("resnet18", num_classes=4))
    model = precision.training_copy(master)
    assert model.conv1.weight.dtype == model.fc.weight.dtype == low
    assert model.bn1.weight.dtype == model.bn1.running_mean.dtype == torch.float32
    assert model.bn1.weight is master.bn1.weight and model.bn1.running_var is master.bn1.running_var
    assert all(p.dtype == torch.float32 for p in master.state_dict().values() if p.is_floating_point())
    optimizer = torch.optim.SGD(master.parameters(), lr=0.1, momentum=0.9)
    before = master.conv1.weight.detach().clone()
    for _ in range(4):  # fp16: the first two overflow at the scale 2 ** 16, and are skipped (dynamic scaling)
        with precision.autocast():
            loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8) % 4)
        assert loss.dtype == torch.float32
        model.zero_grad(set_to_none=True)
        precision.backward(loss)
        assert model.conv1.weight.grad.dtype == low and model.bn1.weight.grad.dtype == torch.float32
        precision.step(optimizer)
    if amp == "fp16-o2":
        assert precision.scaler.get_scale() == 2.0 ** 14
    else:
        assert precision.scaler is None
    assert not torch.equal(master.conv1.weight, before)
    assert torch.equal(model.conv1.weight, master.conv1.weight.to(low))  # the master, rounded, after each step


@pytest.mark.slow
def test_o2_trains_and_checkpoints_the_fp32_master_weights_with_a_static_loss_scale(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "2", "--amp", "fp16-o2", "--loss-scale", "256"))
    rows = read_rows(run_dir / "epochs.csv")
    assert [r["amp"] for r in rows] == ["fp16-o2"] * 2
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")  # weights_only
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}
    assert state["scaler"]["scale"] == 256.0  # static: kept whatever overflowed


@pytest.mark.slow
def test_o2_under_ddp_with_accumulation_saves_the_master_weights_it_validated(data_dir, tmp_path):
    """Two processes (real torchrun, gloo), bf16-o2 with 2-batch windows: the checkpoint's fp32 master weights,
    evaluated afresh, give the very counts the training's own validation gave (the ranks' low-precision copies
    stepped in sync through the master weights)."""
    run_dir = tmp_path / "run"
    done = run_module("jobs.train", tiny_argv(data_dir, run_dir, "--epochs", "1", "--amp", "bf16-o2",
                                              "--accum-steps", "2"), nproc=2, timeout_s=300)
    assert done.returncode == 0, done.stderr[-4000:]
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}
    row = read_rows(run_dir / "epochs.csv")[-1]
    assert (row["amp"], row["world_size"]) == ("bf16-o2", "2")
    evaluated = run_module("jobs.eval", ["--config", str(run_dir / "config.toml"), "--checkpoint",
                                         str(run_dir / "checkpoints" / "latest.pt")], timeout_s=120)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    record = json.loads((run_dir / "eval.json").read_text())
    assert [record["top1_correct"], record["top5_correct"], record["total"]] == [
        int(row["val_top1_correct"]), int(row["val_top5_correct"]), int(row["val_total"])]


@pytest.mark.parametrize("flags, message", [
    (("--amp", "bf16", "--loss-scale", "128"), "train.loss_scale = 128.0 scales fp16 losses, but train.amp = 'bf16'"),
    (("--amp", "fp16-o2", "--loss-scale", "-1"), "train.loss_scale (--loss-scale) = -1.0: must be at least 0.0"),
])
def test_a_loss_scale_without_fp16_or_below_zero_is_refused(data_dir, tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(tiny_config(data_dir, tmp_path / "run", *flags), stages=["train"])


@pytest.mark.slow
def test_o2_resumes_mid_epoch_exactly(data_dir, tmp_path):
    flags = ("--epochs", "1", "--amp", "fp16-o2", "--batch-size", "4", "--resume", "auto")  # 16 steps an epoch
    stopped, reference = interrupted_and_resumed(data_dir, tmp_path, flags, "Epoch: [0] [ 3/16]")
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (0, 8)
    assert {t.dtype for t in stopped["model"].values() if t.is_floating_point()} == {torch.float32}
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["scaler"] == \
        load_checkpoint(reference / "checkpoints" / "latest.pt")["scaler"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_o2_trains_in_fp16_on_a_gpu(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--epochs", "2", "--amp", "fp16-o2", "--device", "cuda"))
    rows = read_rows(run_dir / "epochs.csv")
    assert [r["amp"] for r in rows] == ["fp16-o2"] * 2 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}
    assert 0 < state["scaler"]["scale"] <= 2.0 ** 16
