"""torchvision's reference flags: aliases give the same config as our spelling, other meanings are refused with our
equivalent, Slurm time formats, and the EMA decay adjusted for scale as torchvision does."""
from __future__ import annotations

import argparse

import pytest

import launch
from pipeline.core.config import (ConfigError, add_config_arguments, build_config, config_from_args, ema_update_decay,
                                  load_config)
from pipeline.core.validate import validate


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize("theirs, ours", [
    (["--data-path", "/d"], ["--data-dir", "/d"]),
    (["-b", "64"], ["--batch-size", "64"]),
    (["-j", "8"], ["--workers", "8"]),
    (["--opt", "RMSprop"], ["--optimizer", "rmsprop"]),  # torchvision lower-cases it
    (["--wd", "2e-5"], ["--weight-decay", "2e-5"]),
    (["--lr-scheduler", "cosineannealinglr"], ["--scheduler", "cosine"]),
    (["--lr-scheduler", "steplr"], ["--scheduler", "step"]),
    (["--lr-scheduler", "exponentiallr"], ["--scheduler", "exponential"]),
    (["--lr-warmup-epochs", "5"], ["--warmup-epochs", "5"]),
    (["--lr-warmup-decay", "0.1"], ["--warmup-decay", "0.1"]),
    (["--lr-warmup-method", "linear", "--lr-warmup-epochs", "5"], ["--warmup-epochs", "5"]),
    (["--lr-min", "1e-5"], ["--min-lr", "1e-5"]),
    (["--model-ema"], ["--ema-decay-per-image", "0.99998"]),
    (["--model-ema", "--model-ema-decay", "0.9999"], ["--ema-decay-per-image", "0.9999"]),
    (["--model-ema-decay", "0.9999", "--model-ema"], ["--ema-decay-per-image", "0.9999"]),
    (["--model-ema-steps", "32"], ["--ema-steps", "32"]),
    (["--ra-sampler"], ["--ra-reps", "3"]),
    (["--ra-sampler", "--ra-reps", "4"], ["--ra-reps", "4"]),
    (["--auto-augment", "ra"], ["--auto-augment", "randaugment"]),
    (["--auto-augment", "imagenet"], ["--auto-augment", "autoaugment"]),
    (["--amp"], ["--amp", "fp16"]),
    (["--ra-magnitude", "9", "--interpolation", "bilinear", "--use-v2", "--backend", "pil"], []),
])
def test_torchvision_spelling_gives_the_same_config_as_ours(theirs, ours):
    assert parse(*theirs) == parse(*ours)


def test_test_only_is_the_eval_stage():
    assert launch.get_args_parser().parse_args(["--test-only"]).stage == "eval"
    assert launch.get_args_parser().parse_args(["--stage", "train"]).stage == "train"


@pytest.mark.parametrize("argv, says", [
    (["--norm-weight-decay", "0.0"], "--no-norm-weight-decay puts norm and bias parameters at weight decay 0"),
    (["--bias-weight-decay", "0.0"], "--norm-weight-decay / --no-norm-weight-decay"),
    (["--transformer-embedding-decay", "0"], "--norm-weight-decay / --no-norm-weight-decay"),
    (["--opt", "sgd_nesterov"], "--opt sgd --nesterov"),
    (["--lr-warmup-method", "constant"], "warm-up here is linear"),
    (["--auto-augment", "cifar10"], "--auto-augment autoaugment --dataset cifar10"),
    (["--auto-augment", "augmix"], "AugMix is not available here"),
    (["--weights", "ResNet50_Weights.IMAGENET1K_V2"], "--pretrained NAME"),
    (["--output-dir", "out"], "use --run-dir DIR"),
    (["--start-epoch", "3"], "--resume PATH, or --resume auto"),
    (["--world-size", "8"], "--nodes x --gpus-per-node"),
    (["--dist-url", "env://"], "torchrun's"),
    (["--cache-dataset"], "no dataset cache"),
    (["--ra-magnitude", "12"], "default magnitude 9"),
])
def test_a_torchvision_flag_meaning_something_else_is_refused_with_our_equivalent(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_bare_amp_is_fp16_and_our_own_switches_and_values_still_work():
    assert parse("--amp").train.amp == "fp16"  # torchvision's --amp: float16 autocast and a GradScaler
    assert parse("--no-norm-weight-decay").optim.norm_weight_decay is False
    assert parse("--norm-weight-decay").optim.norm_weight_decay is True
    assert parse("--weights", "ema").eval.weights == "ema" and parse("--amp", "bf16").train.amp == "bf16"


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("30:00", 30), ("30:01", 31), ("2:00:00", 120), ("1:30:30", 91),
    ("1-0", 1440), ("2-12", 3600), ("1-02:03", 1563), ("1-02:03:04", 1564),
])
def test_time_takes_slurm_formats_as_minutes(text, minutes, tmp_path):
    assert parse("--time", text).launch.time == minutes
    (tmp_path / "c.toml").write_text(f'[launch]\ntime = "{text}"\n')
    assert load_config(tmp_path / "c.toml").launch.time == minutes


def test_time_in_another_format_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse("--time", "1:2:3:4")
    assert "Slurm's MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="time limit 'two hours'"):
        build_config({"launch": {"time": "two hours"}})


def test_ema_decay_per_image_is_adjusted_for_scale_as_torchvision_does():
    # torchvision's resnet50 v2 recipe: 8 GPUs x 128, --model-ema-steps 32, 600 epochs -> the recipe's stored value.
    tv = parse("--model-ema", "--model-ema-steps", "32", "-b", "128", "--epochs", "600")
    recipe = load_config("configs/resnet50_v2.toml")
    assert ema_update_decay(tv, world_size=8) == pytest.approx(recipe.model.ema_decay, abs=1e-6)
    assert ema_update_decay(recipe, world_size=64) == recipe.model.ema_decay  # ema_decay: per update, as given
    # Twice the images per update: twice the alpha, so the EMA spans the same share of training.
    assert 1 - ema_update_decay(tv, world_size=16) == pytest.approx(2 * (1 - ema_update_decay(tv, world_size=8)))
    assert ema_update_decay(parse("--model-ema-decay", "0.5", "--epochs", "1"), world_size=8) == 0.0  # alpha <= 1
    assert ema_update_decay(parse(), world_size=8) is None


def test_both_ema_decays_set_are_refused():
    cfg = parse("--ema-decay", "0.999", "--model-ema")
    with pytest.raises(ConfigError, match="both set: keep one"):
        validate(cfg, ["train"])
