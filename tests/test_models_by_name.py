"""Every torchvision classifier and timm:NAME by name, through build_model: built for real, trained and evaluated."""
from __future__ import annotations

import sys

import pytest
import torch
import torchvision

from pipeline.eval.evaluate import evaluate
from pipeline.models import registry as models
from pipeline.models.registry import UnknownModelError, build_model
from pipeline.train.trainer import train
from train_helpers import read_rows, tiny_config, tiny_data

TORCHVISION = torchvision.models.list_models(module=torchvision.models)
# Small ones built on the CPU and run forward and backward in training mode, at the smallest input each takes.
REAL = {"squeezenet1_1": 64, "regnet_x_400mf": 32, "googlenet": 64, "inception_v3": 80, "mnasnet0_5": 32,
        "efficientnet_b0": 32, "swin_t": 64, "vit_b_32": 224}


def test_every_torchvision_classifier_is_a_model_name():
    assert set(TORCHVISION) <= set(models.available_models()) and len(TORCHVISION) >= 80
    assert set(models.list_models()) <= set(models.available_models())  # the registered ones stay


@pytest.mark.parametrize("name", [n for n in TORCHVISION if n not in models.list_models() and "regnet" not in n])
def test_each_torchvision_classifier_builds_with_its_class_count(name):
    with torch.device("meta"):  # the shapes without the memory (regnets compute widths from values: REAL has one)
        model = build_model(name, num_classes=7)
    last = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    assert getattr(last, "out_features", getattr(last, "out_channels", None)) == 7  # squeezenet: a 1x1 conv


@pytest.mark.parametrize("name, size", [*REAL.items(), ("timm:resnet10t", 32)])
def test_real_model_trains_a_step_on_cpu(name, size):
    model = build_model(name, num_classes=5).train()
    out = model(torch.randn(2, 3, size, size))  # a plain tensor: googlenet and inception_v3 have no aux heads
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 4])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_torchvision_weights_with_aux_heads_load_into_the_model_built_without(tmp_path):
    full = torchvision.models.googlenet(weights=None, num_classes=10, aux_logits=True, init_weights=True)
    torch.save(full.state_dict(), tmp_path / "googlenet.pth")
    model = build_model("googlenet", num_classes=10, pretrained=str(tmp_path / "googlenet.pth"))
    assert torch.equal(model.fc.weight, full.fc.weight) and model.aux1 is None


def test_unknown_name_lists_registered_and_torchvision_models_and_timm():
    with pytest.raises(UnknownModelError) as err:
        build_model("regnet_x_400", num_classes=3)
    message = str(err.value)
    assert "did you mean ['regnet_x_400mf'" in message
    assert all(name in message for name in [*models.list_models(), *TORCHVISION])
    assert "timm:NAME" in message and "package.module:factory" in message


def test_timm_names_are_checked_and_timm_stays_optional(monkeypatch):
    with pytest.raises(UnknownModelError, match=r"timm has no model 'resnet10x' \(close: \['resnet10t'"):
        build_model("timm:resnet10x", num_classes=3)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed: import timm raises ImportError
    with pytest.raises(UnknownModelError, match="needs timm, which is not installed: pip install timm"):
        build_model("timm:resnet10t", num_classes=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", ["regnet_x_400mf", "timm:resnet10t"])
def test_model_by_name_trains_an_epoch_with_ema_and_its_checkpoint_evaluates(data_dir, tmp_path, name):
    run_dir = tmp_path / "run"
    cfg = tiny_config(data_dir, run_dir, "--model", name, "--epochs", "1", "--model-ema", "--amp", "bf16")
    assert train(cfg)["finished"]
    [row] = read_rows(run_dir / "epochs.csv")
    assert 0 <= float(row["ema_val_acc1"]) <= 100
    for weights in ("model", "ema"):
        record = evaluate(tiny_config(data_dir, run_dir, "--model", name, "--weights", weights))
        assert record["total"] == 24, record
