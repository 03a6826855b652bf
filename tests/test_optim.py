"""Optimizer parameter groups and the per-step learning-rate schedule, checked against its formulas."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from pipeline.core.config import Config, ConfigError, OptimConfig, load_config
from pipeline.core.validate import validate
from pipeline.report.build import report
from pipeline.train.optim import build_optimizer, build_scheduler, lr_factor, lr_for_batch
from train_helpers import run_module, tiny_argv, tiny_data

STEPS_PER_EPOCH = 10


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.LayerNorm(8 * 4 * 4), nn.Linear(8 * 4 * 4, 5))


def lrs_over(cfg: OptimConfig, epochs: int, steps: int) -> list[float]:
    """The learning rate used by each of the first ``steps`` optimizer steps."""
    model = small_net()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, epochs=epochs, steps_per_epoch=STEPS_PER_EPOCH)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_norm_and_bias_parameters_go_to_a_group_without_weight_decay():
    model = small_net()
    opt = build_optimizer(model, OptimConfig(weight_decay=5e-4, norm_weight_decay=False))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_decay) == {5e-4, 0.0}
    conv, bn, ln, fc = model[0], model[1], model[4], model[5]
    assert by_decay[5e-4] == {id(conv.weight), id(fc.weight)}
    assert by_decay[0.0] == {id(bn.weight), id(bn.bias), id(ln.weight), id(ln.bias), id(fc.bias)}


def test_norm_weight_decay_true_keeps_one_group_over_all_parameters():
    model = small_net()
    opt = build_optimizer(model, OptimConfig(weight_decay=1e-4))
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name, cls, expected", [
    ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ("rmsprop", torch.optim.RMSprop, {"momentum": 0.9, "alpha": 0.9, "eps": 0.0316}),
    ("adamw", torch.optim.AdamW, {"weight_decay": 0.05}),
])
def test_optimizer_kinds_and_their_settings(name, cls, expected):
    cfg = OptimConfig(optimizer=name, lr=0.2, momentum=0.9, nesterov=name == "sgd", weight_decay=0.05)
    opt = build_optimizer(small_net(), cfg)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.2
    for key, value in expected.items():
        assert group[key] == value, key


def test_warmup_then_cosine_then_cooldown_follow_the_formulas():
    lr, decay, min_lr = 0.4, 0.1, 0.004
    epochs, warmup, cooldown = 12, 2, 2
    cfg = OptimConfig(lr=lr, scheduler="cosine", warmup_epochs=warmup, warmup_decay=decay, min_lr=min_lr,
                      cooldown_epochs=cooldown)
    lrs = lrs_over(cfg, epochs, epochs * STEPS_PER_EPOCH)
    assert lrs[0] == pytest.approx(lr * decay)  # warm-up starts at lr * warmup_decay
    assert lrs[5] == pytest.approx(lr * (decay + (1 - decay) * 0.25))  # step 5 = 0.5 of 2 warm-up epochs
    assert lrs[warmup * STEPS_PER_EPOCH] == pytest.approx(lr)  # end of warm-up: the peak
    # cosine over epochs 2..10 (8 epochs): halfway at epoch 6 is the mean of lr and min_lr
    assert lrs[6 * STEPS_PER_EPOCH] == pytest.approx((lr + min_lr) / 2)
    s = 3.5  # epochs into the cosine part: step 55
    assert lrs[55] == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi * s / 8)) / 2)
    assert lrs[(epochs - cooldown) * STEPS_PER_EPOCH - 1] > min_lr
    assert lrs[(epochs - cooldown) * STEPS_PER_EPOCH:] == pytest.approx([min_lr] * cooldown * STEPS_PER_EPOCH)


def test_step_schedule_is_a_staircase_counted_from_the_end_of_warmup():
    cfg = OptimConfig(lr=0.1, scheduler="step", lr_step_size=3, lr_gamma=0.1, warmup_epochs=1)
    lrs = lrs_over(cfg, 10, 10 * STEPS_PER_EPOCH)
    assert lrs[10] == pytest.approx(0.1)  # epoch 1: warm-up done
    assert lrs[39] == pytest.approx(0.1)  # last step of epoch 3
    assert lrs[40] == pytest.approx(0.01)  # epoch 4 = 3 epochs after warm-up
    assert lrs[70] == pytest.approx(0.001)


def test_exponential_schedule_decays_by_gamma_per_epoch_smoothly():
    cfg = OptimConfig(lr=0.036, scheduler="exponential", lr_gamma=0.98)
    lrs = lrs_over(cfg, 5, 5 * STEPS_PER_EPOCH)
    assert lrs[0] == pytest.approx(0.036)
    assert lrs[30] == pytest.approx(0.036 * 0.98 ** 3)
    assert lrs[35] == pytest.approx(0.036 * 0.98 ** 3.5)


def test_scheduler_state_round_trips_for_resume():
    cfg = OptimConfig(lr=0.4, scheduler="cosine", warmup_epochs=1, cooldown_epochs=1)
    uninterrupted = lrs_over(cfg, 6, 60)

    model = small_net()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, epochs=6, steps_per_epoch=STEPS_PER_EPOCH)
    for _ in range(23):
        opt.step()
        sched.step()
    saved = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}

    opt2 = build_optimizer(model, cfg)
    sched2 = build_scheduler(opt2, cfg, epochs=6, steps_per_epoch=STEPS_PER_EPOCH)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    resumed = []
    for _ in range(23, 60):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(uninterrupted[23:])
    assert sched2.state_dict()["last_epoch"] == 60


@pytest.mark.parametrize("change, message", [
    ({"warmup_epochs": 3, "cooldown_epochs": 2}, "leave no epoch of the main schedule"),
    ({"scheduler": "step", "lr_step_size": 0}, r"lr_step_size \(--lr-step-size\) = 0: must be at least 1"),
    ({"nesterov": True, "momentum": 0.0}, "nesterov needs momentum"),
])
def test_impossible_recipes_are_refused_by_the_one_validation(change, message):
    cfg = Config()
    cfg.train.epochs, cfg.optim = 5, dataclasses.replace(OptimConfig(), **change)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, ["train"])


@pytest.mark.parametrize("scale, processes, expected", [
    ("linear", 1, 0.05), ("linear", 4, 0.2), ("sqrt", 4, 0.1 * math.sqrt(2)), ("sqrt", 1, 0.1 / math.sqrt(2))])
def test_the_lr_follows_the_global_batch_from_the_recipes_base(scale, processes, expected):
    cfg = dataclasses.replace(OptimConfig(), lr=0.7, lr_base=0.1, lr_base_batch=256, lr_base_scale=scale)
    assert lr_for_batch(cfg, processes * 128) == pytest.approx(expected)  # 128 images per process
    assert lr_for_batch(dataclasses.replace(cfg, lr_base=0.0), processes * 128) == 0.7  # a plain lr stays


@pytest.mark.slow
def test_a_sweep_over_processes_keeps_one_recipe_and_the_report_shows_each_lr(tmp_path):
    """torchrun with 1 and 2 processes of 8 images and lr_base 0.1 for 32: lr 0.025 and 0.05 in config.toml, the
    epoch records and the report's summary."""
    data_dir = tiny_data(tmp_path / "data")
    runs = []
    for nproc in (1, 2):
        run_dir = tmp_path / f"p{nproc}"
        done = run_module("jobs.train", tiny_argv(data_dir, run_dir, "--epochs", "1", "--lr-base", "0.1",
                                                  "--lr-base-batch", "32"), nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"lr {0.025 * nproc:g}: lr_base 0.1 for 32 images per step" in done.stderr
        runs.append(run_dir)
    summary = report(runs, echo=False).summary
    assert summary["peak_lr"].tolist() == [0.025, 0.05]
    assert [load_config(run / "config.toml").optim.lr for run in runs] == [0.025, 0.05]


@pytest.mark.parametrize("scheduler, extra, at_epochs, expected", [
    ("multistep", {"lr_milestones": [3, 6], "lr_gamma": 0.1}, [0, 2.9, 3, 5.5, 6, 9.9], [1, 1, 0.1, 0.1, 0.01, 0.01]),
    ("linear", {"min_lr": 0.0}, [0, 2.5, 5, 7.5], [1, 0.75, 0.5, 0.25]),
    ("poly", {"lr_power": 2.0, "min_lr": 0.0}, [0, 5, 7.5], [1, 0.25, 0.0625]),
])
def test_multistep_linear_and_poly_follow_their_formulas_per_step(scheduler, extra, at_epochs, expected):
    cfg = dataclasses.replace(OptimConfig(), lr=1.0, scheduler=scheduler, **extra)
    factors = [lr_factor(round(t * STEPS_PER_EPOCH), cfg, epochs=10, steps_per_epoch=STEPS_PER_EPOCH)
               for t in at_epochs]
    assert factors == pytest.approx(expected)


@pytest.mark.parametrize("milestones", [[], [6, 3], [0, 3], [3, 10]])
def test_multistep_milestones_outside_the_schedule_are_refused(milestones):
    cfg = Config()
    cfg.train.epochs, cfg.optim.scheduler, cfg.optim.lr_milestones = 10, "multistep", milestones
    with pytest.raises(ConfigError, match="the multistep schedule needs epochs after warm-up, increasing"):
        validate(cfg, ["train"])


def test_milestones_come_as_repeated_flags_or_a_toml_list(tmp_path):
    from jobs.common import get_args_parser
    from pipeline.core.config import config_from_args

    args = get_args_parser("test").parse_args(["--lr-milestones", "150", "--lr-milestones", "225"])
    assert config_from_args(args).optim.lr_milestones == [150, 225]
    (tmp_path / "c.toml").write_text('[optim]\nlr_milestones = [150, "225"]\n')
    with pytest.raises(ConfigError, match="lr_milestones must be a list of whole numbers"):
        load_config(tmp_path / "c.toml")
