"""Optimizers and the per-step learning-rate schedule of the recipes.

The schedule is one ``LambdaLR`` stepped once per optimizer step; with t = steps / steps_per_epoch
(epochs, fractional), W = warmup_epochs, C = cooldown_epochs, E = epochs and s = t - W:

- warm-up, t < W:          lr * (warmup_decay + (1 - warmup_decay) * t / W), linear from lr * warmup_decay
- main part, W <= t < E-C:  step         lr * lr_gamma ** floor(s / lr_step_size)   (staircase, as StepLR per epoch)
                            multistep    lr * lr_gamma ** (milestones <= s)          (MultiStepLR: given epochs)
                            exponential  lr * lr_gamma ** s                           (smooth; equals ExponentialLR
                                                                                      at each epoch boundary)
                            cosine       min_lr + (lr - min_lr) * (1 + cos(pi * s / (E - C - W))) / 2
                            linear       min_lr + (lr - min_lr) * (1 - s / (E - C - W))
                            poly         min_lr + (lr - min_lr) * (1 - s / (E - C - W)) ** lr_power
- cool-down, t >= E-C:     min_lr

The main part starts counting at the end of warm-up, as torchvision's SequentialLR(warmup, main) does.
The lambda is a plain function of the step, so the state dict holds only the step count and base rates:
a resumed run follows the schedule of its config, and load_state_dict puts it at the saved step.
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from pipeline.core.config import ConfigError, OptimConfig

# torchvision's reference values for RMSprop (MobileNetV3 / EfficientNet recipes, TF-style RMSprop).
RMSPROP_ALPHA = 0.9
RMSPROP_EPS = 0.0316
LARGE_BATCH = ("lars", "lamb")  # timm.optim's, with the layer-wise trust ratio
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
               nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def parameter_groups(model: nn.Module, weight_decay: float, norm_weight_decay: bool) -> list[dict]:
    """One group with ``weight_decay``; with norm_weight_decay=False, norm and bias parameters in a group without."""
    if norm_weight_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, NORM_LAYERS)
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if is_norm or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_for_batch(cfg: OptimConfig, global_batch: int) -> float:
    """The run's peak lr: ``cfg.lr``, or with ``lr_base`` set, lr_base scaled from lr_base_batch to ``global_batch``
    images per step, linearly (Goyal et al. 2017) or by the square root (timm's --lr-base-scale sqrt), so every
    point of a sweep over nodes or GPUs keeps one recipe."""
    if cfg.lr_base <= 0:
        return cfg.lr
    ratio = global_batch / cfg.lr_base_batch
    return cfg.lr_base * (ratio if cfg.lr_base_scale == "linear" else math.sqrt(ratio))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), RMSprop (torchvision's alpha and eps), AdamW, or LARS / LAMB over the model's
    parameters."""
    if cfg.optimizer in LARGE_BATCH:
        return large_batch_optimizer(model, cfg)
    groups = parameter_groups(model, cfg.weight_decay, cfg.norm_weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, alpha=RMSPROP_ALPHA, eps=RMSPROP_EPS)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use sgd, rmsprop, adamw, lars or lamb")


def large_batch_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """LARS (You et al. 2017, with momentum) or LAMB (You et al. 2019, timm's defaults otherwise) from timm.optim,
    imported only here. Biases and norm weights are excluded, as in those papers' recipes, whatever
    norm_weight_decay says: no weight decay, and no layer-wise trust ratio (timm adapts only groups with decay)."""
    try:
        timm_optim = importlib.import_module("timm.optim")
    except ImportError:
        raise ConfigError(f"--optimizer {cfg.optimizer} needs timm's optimizers, and timm is not installed here: "
                          "pip install timm (a dependency of this package), or use --optimizer sgd") from None
    groups = parameter_groups(model, cfg.weight_decay, norm_weight_decay=False)
    if cfg.optimizer == "lars":
        return timm_optim.Lars(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return timm_optim.Lamb(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: OptimConfig, *, epochs: int, steps_per_epoch: int) -> float:
    """The learning rate at optimizer step ``step`` as a multiple of cfg.lr (see the module docstring)."""
    t = step / steps_per_epoch
    warmup, main_end = cfg.warmup_epochs, epochs - cfg.cooldown_epochs
    floor = cfg.min_lr / cfg.lr
    if t < warmup:
        return cfg.warmup_decay + (1.0 - cfg.warmup_decay) * t / warmup
    if t >= main_end:
        return floor
    s = t - warmup
    if cfg.scheduler == "step":
        return cfg.lr_gamma ** math.floor(s / cfg.lr_step_size)
    if cfg.scheduler == "multistep":
        return cfg.lr_gamma ** sum(s >= milestone for milestone in cfg.lr_milestones)
    if cfg.scheduler == "exponential":
        return cfg.lr_gamma ** s
    progress = s / (main_end - warmup)
    if cfg.scheduler in ("linear", "poly"):
        return floor + (1.0 - floor) * (1.0 - progress) ** (1.0 if cfg.scheduler == "linear" else cfg.lr_power)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, epochs: int,
                    steps_per_epoch: int) -> LRScheduler:
    """The recipe's schedule as a LambdaLR, to be stepped once after every optimizer step."""
    if steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be positive, got {steps_per_epoch}")

    def factor(step: int) -> float:
        return lr_factor(step, cfg, epochs=epochs, steps_per_epoch=steps_per_epoch)

    return LambdaLR(optimizer, factor)
