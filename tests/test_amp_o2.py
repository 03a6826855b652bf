"""AMP O2 (--amp fp16-o2, bf16-o2) on the CPU: low-precision weights with norm layers in fp32, fp32 master weights
stepped by the optimizer and saved in checkpoints, fp16 loss scaling (dynamic or static), exact resume."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pipeline.core.checkpoint_file import load_checkpoint
from pipeline.core.config import ConfigError
from pipeline.core.precision import setup_precision
from pipeline.core.validate import validate
from pipeline.models.registry import build_model
from pipeline.train.trainer import train
from train_helpers import interrupted_and_resumed, read_rows, tiny_config, tiny_data


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
