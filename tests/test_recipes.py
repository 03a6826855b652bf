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

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.toml")
                 if p.name != "sources.toml")  # their values against their sources: tests/test_recipe_sources.py


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads_and_its_schedule_builds(path):
    cfg = load_config(path)
    assert cfg.model.model in list_models()
    optimizer = build_optimizer(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, epochs=cfg.train.epochs, steps_per_epoch=4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * (cfg.optim.warmup_decay
                                                                            if cfg.optim.warmup_epochs else 1.0))
    assert scheduler.last_epoch == 0


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
