"""LARS and LAMB (timm.optim) by name: they train, and biases and norm weights get neither weight decay nor the
layer-wise trust ratio, whatever --norm-weight-decay says."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pipeline.core.config import OptimConfig
from pipeline.train.optim import build_optimizer

LR, WD = 0.5, 1e-3


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(96, 6, generator=generator)
    return images, (images[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(1)  # a rule the net can learn


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_lars_and_lamb_are_chosen_by_name_and_train(name):
    model = net()
    optimizer = build_optimizer(model, OptimConfig(optimizer=name, lr=LR if name == "lars" else 0.02,
                                                   weight_decay=WD, norm_weight_decay=True))
    assert type(optimizer).__name__ == name.capitalize()
    images, targets = batch()
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_biases_and_norm_weights_get_no_decay_and_no_trust_ratio(name):
    model = net()
    optimizer = build_optimizer(model, OptimConfig(optimizer=name, lr=LR, momentum=0.9, weight_decay=WD,
                                                   norm_weight_decay=True))  # overridden: excluded all the same
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    first, bn, last = model[0], model[1], model[3]
    assert by_decay == {WD: {id(first.weight), id(last.weight)},
                        0.0: {id(first.bias), id(bn.weight), id(bn.bias), id(last.bias)}}
    images, targets = batch()
    nn.functional.cross_entropy(model(images), targets).backward()
    before = {p: p.detach().clone() for p in model.parameters()}
    grads = {p: p.grad.detach().clone() for p in model.parameters()}
    optimizer.step()
    for p in (bn.weight, last.bias):  # a plain first step: SGD's lr x grad, Adam's lr x sign(grad)
        expected = grads[p] if name == "lars" else grads[p].sign()
        torch.testing.assert_close(before[p] - p.detach(), LR * expected, rtol=1e-3, atol=1e-5)
    w, g = before[last.weight], grads[last.weight]
    step = before[last.weight] - last.weight.detach()
    if name == "lars":  # trust ratio 0.001 x |w| / (|g| + wd |w|) on grad + wd w
        trust = 0.001 * w.norm() / (g.norm() + WD * w.norm())
        torch.testing.assert_close(step, LR * trust * (g + WD * w))
    else:  # LAMB's trust ratio |w| / |update|: the step's norm is lr x |w|
        torch.testing.assert_close(step.norm(), LR * w.norm())
