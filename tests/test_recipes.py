"""Every recipe in configs/ loads, names a registered model, and gives a schedule that builds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch.nn as nn

from pipeline.config import load_config
from pipeline.models import list_models
from pipeline.optim import build_optimizer, build_scheduler

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads_and_its_schedule_builds(path):
    cfg = load_config(path)
    assert cfg.model.model in list_models()
    optimizer = build_optimizer(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, epochs=cfg.train.epochs, steps_per_epoch=4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * (cfg.optim.warmup_decay
                                                                            if cfg.optim.warmup_epochs else 1.0))
    assert scheduler.last_epoch == 0


def test_recipe_values_from_their_sources():
    """Also: every seed recipe is there (a KeyError names a missing one)."""
    recipes = {p.stem: load_config(p) for p in CONFIGS}
    r50 = recipes["resnet50"]
    assert (r50.optim.lr, r50.optim.lr_step_size, r50.optim.lr_gamma, r50.train.epochs) == (0.1, 30, 0.1, 90)
    cifar = recipes["densenet100_cifar10"]
    assert (cifar.data.dataset, cifar.data.train_crop_size, cifar.train.batch_size) == ("cifar10", 32, 64)
    assert cifar.optim.nesterov and cifar.train.epochs == 300
    mbv2 = recipes["mobilenet_v2"]
    assert (mbv2.optim.lr, mbv2.optim.weight_decay, mbv2.optim.lr_gamma, mbv2.train.epochs) == (0.036, 4e-5, 0.98, 300)
    shuffle = recipes["shufflenet_v2"]
    assert not shuffle.optim.norm_weight_decay and shuffle.train.epochs == 240
    assert recipes["resnet50_v1b"].train.amp in ("bf16", "fp16")
    v2 = recipes["resnet50_v2"]  # torchvision's IMAGENET1K_V2 recipe
    assert (v2.optim.lr, v2.optim.weight_decay, v2.train.epochs, v2.train.batch_size) == (0.5, 2e-5, 600, 128)
    assert (v2.data.ra_reps, v2.data.train_crop_size, v2.data.val_resize_size, v2.model.ema_steps) == (4, 176, 232, 32)
    assert v2.model.ema_decay == pytest.approx(1 - (1 - 0.99998) * 8 * 128 * 32 / 600, abs=1e-6)
    dn121 = recipes["densenet121"]
    assert (dn121.optim.scheduler, dn121.optim.label_smoothing, dn121.train.epochs) == ("cosine", 0.1, 120)
