"""One training step (Stepper): the model EMA, updated every ema_steps optimizer steps and a copy of the model in
warm-up; gradient clipping, also through fp16's GradScaler."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.core.precision import setup_precision
from pipeline.train.loop import LossWatch, NonFiniteLossError, Stepper

DECAY = 0.5


def stepper(*, ema_steps: int = 1, ema_warmup_steps: int = 0, clip_grad_norm: float = 0.0,
            amp: str = "none") -> Stepper:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return Stepper(model=model, raw_model=model, criterion=nn.CrossEntropyLoss(), optimizer=optimizer,
                   scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                   precision=setup_precision(torch.device("cpu"), amp, False),
                   to_device=lambda images, targets, batch_key: (images, targets),
                   ema=AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True),
                   ema_steps=ema_steps, ema_warmup_steps=ema_warmup_steps, clip_grad_norm=clip_grad_norm)


def run(s: Stepper, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's and the EMA's weights before the first step (index 0) and after each step."""
    model_w, ema_w = [s.raw_model.weight.detach().clone()], [s.ema.module.weight.detach().clone()]
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        images, targets = torch.randn(8, 3, generator=generator), torch.randint(0, 4, (8,), generator=generator)
        s.step(images, targets)
        model_w.append(s.raw_model.weight.detach().clone())
        ema_w.append(s.ema.module.weight.detach().clone())
    return model_w, ema_w


def test_ema_is_updated_every_ema_steps_optimizer_steps():
    model_w, ema_w = run(stepper(ema_steps=3, ema_warmup_steps=0), 6)
    assert all(torch.equal(ema_w[i], model_w[0]) for i in (1, 2))  # no update yet: the model as it was built
    assert torch.equal(ema_w[3], model_w[3])  # the first update copies the model
    assert all(torch.equal(ema_w[i], ema_w[3]) for i in (4, 5))
    assert torch.allclose(ema_w[6], DECAY * model_w[3] + (1 - DECAY) * model_w[6])
    assert not torch.allclose(model_w[3], model_w[6])


@pytest.mark.parametrize("warmup", [0, 2])
def test_during_warm_up_the_ema_follows_the_model(warmup):
    model_w, ema_w = run(stepper(ema_steps=1, ema_warmup_steps=warmup), 4)
    assert all(torch.equal(ema_w[i], model_w[i]) for i in range(1, warmup + 1))
    first_average = max(warmup, 1)  # without warm-up, step 1 copies and step 2 averages
    assert torch.allclose(ema_w[first_average + 1],
                          DECAY * model_w[first_average] + (1 - DECAY) * model_w[first_average + 1])


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_clip_grad_norm_bounds_the_step(amp):
    """Plain SGD moves the parameters by lr x gradient: clipped, that step is at most lr x the bound."""
    (before, after), _ = run(stepper(amp=amp), 1)
    free = (after - before).norm().item()
    bound = free / 0.5 / 10  # a tenth of this batch's gradient norm (the weight's part of it)
    (before, after), _ = run(stepper(amp=amp, clip_grad_norm=bound), 1)
    assert (after - before).norm().item() <= 0.5 * bound * 1.001
    assert (after - before).norm().item() > 0.5 * bound * 0.5  # clipped, not zeroed


def losses(*values: float) -> list[torch.Tensor]:
    """batch_sums rows (loss sum first) with these losses."""
    return [torch.tensor([v, 1.0, 1.0, 8.0], dtype=torch.float64) for v in values]


@pytest.mark.parametrize("tolerated, sequence, at_log, before_save", [
    (0, (1.0, 2.0), None, None),
    (0, (1.0, float("nan"), 1.0), 2, 2),  # without a scaler the first one is fatal
    (2, (1.0, float("inf"), float("inf"), 1.0), None, None),  # the scaler skipped two overflows and recovered
    (2, (1.0, float("inf"), float("inf"), float("inf"), 1.0), 2, 2),  # three in a row is more than it forgives
    (2, (1.0, 1.0, float("nan")), None, 3),  # a streak still running when the weights are about to be saved
])
def test_loss_watch_names_the_first_fatal_step_at_its_checks(tolerated, sequence, at_log, before_save):
    watch = LossWatch(torch.device("cpu"), tolerated=tolerated, where="epoch 4")
    for step, batch in enumerate(losses(*sequence), start=1):
        watch.add(batch, step)
    for model, expected in ((None, at_log), (nn.Linear(2, 2), before_save)):
        if expected is None:
            watch.check(model)
        else:
            with pytest.raises(NonFiniteLossError, match=f"NaN or infinite at step {expected} of epoch 4; lower --lr"):
                watch.check(model)


def test_loss_watch_refuses_weights_that_are_not_finite_before_a_save():
    """A NaN learning rate spoils the weights in a step whose loss was still finite."""
    model = nn.Linear(2, 2)
    watch = LossWatch(torch.device("cpu"), tolerated=0, where="epoch 0")
    watch.add(losses(1.0)[0], 1)
    watch.check()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="weights are NaN or infinite at the end of epoch 0"):
        watch.check(model)
