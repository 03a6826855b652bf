"""Every recipe in configs/ loads, names a registered model, gives a schedule that builds, and trains and
evaluates on CPU from its config (an epoch on tiny data, its sizes and length overridden)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch.nn as nn

from pipeline.core.config import load_config
from pipeline.eval.evaluate import evaluate
from pipeline.models.registry import list_models
from pipeline.prep.cifar import prepare_cifar10
from pipeline.prep.synthetic import make_cifar10_archive
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.trainer import train
from train_helpers import read_rows, tiny_config, tiny_data

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
    assert (cifar.optim.scheduler, cifar.optim.lr_milestones, cifar.optim.lr_gamma) == ("multistep", [150, 225], 0.1)
    mbv2 = recipes["mobilenet_v2"]
    # torchvision's references/classification README
    assert (mbv2.optim.lr, mbv2.optim.weight_decay, mbv2.optim.lr_gamma, mbv2.train.epochs) == (0.045, 4e-5, 0.98, 300)
    shuffle = recipes["shufflenet_v2"]
    assert not shuffle.optim.norm_weight_decay and shuffle.train.epochs == 240
    assert (shuffle.optim.scheduler, shuffle.optim.warmup_epochs, shuffle.optim.lr) == ("linear", 0, 0.5)
    assert recipes["resnet50_v1b"].train.amp in ("bf16", "fp16")
    v2 = recipes["resnet50_v2"]  # torchvision's IMAGENET1K_V2 recipe
    assert (v2.optim.lr, v2.optim.weight_decay, v2.train.epochs, v2.train.batch_size) == (0.5, 2e-5, 600, 128)
    assert (v2.data.ra_reps, v2.data.train_crop_size, v2.data.val_resize_size, v2.model.ema_steps) == (4, 176, 232, 32)
    assert v2.model.ema_decay == pytest.approx(1 - (1 - 0.99998) * 8 * 128 * 32 / 600, abs=1e-6)
    dn121 = recipes["densenet121"]
    assert (dn121.optim.scheduler, dn121.optim.label_smoothing, dn121.train.epochs) == ("cosine", 0.1, 120)
    for name, model, batch, lr in (("resnet50_v1b_ascend", "resnet50_v1b", 512, 1.6),
                                   ("shufflenet_v2_ascend", "shufflenet_v2_x1_0", 1024, 0.75)):
        ascend = recipes[name]  # Ascend 910: fp16 with loss scaling (no bf16), 8p learning rate for 8 NPUs
        assert (ascend.model.model, ascend.train.device, ascend.train.amp) == (model, "npu", "fp16-o2")
        assert (ascend.train.batch_size, ascend.optim.lr) == (batch, lr)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    make_cifar10_archive(root / "archives", per_class=8, test_per_class=2)
    prepare_cifar10(root / "archives", root / "cifar10")
    return {"imagenet": tiny_data(root / "imagenet", num_classes=4, train_per_class=16, val_per_class=3),
            "cifar10": root / "cifar10"}


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "demo"], ids=lambda p: p.stem)
def test_recipe_trains_an_epoch_and_evaluates_from_its_config(path, data_dirs, tmp_path):
    recipe = load_config(path)
    run_dir = tmp_path / "run"
    cfg = tiny_config(data_dirs[recipe.data.dataset], run_dir, "--config", str(path), "--model", recipe.model.model,
                      "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0")
    assert (cfg.optim, cfg.model.ema_decay, cfg.data.ra_reps, cfg.data.mixup_alpha) == \
        (dataclasses.replace(recipe.optim, lr=0.05, warmup_epochs=0, cooldown_epochs=0), recipe.model.ema_decay,
         recipe.data.ra_reps, recipe.data.mixup_alpha)  # the recipe, but for what the test overrides
    train(cfg)
    [row] = read_rows(run_dir / "epochs.csv")
    assert (row["model"], row["amp"]) == (recipe.model.model, recipe.train.amp)
    assert (row["ema_val_acc1"] != "") == (recipe.model.ema_decay > 0)
    record = evaluate(cfg)
    assert record["total"] == int(row["val_total"]) > 0
