"""run_epoch asks the ranks whether to stop every STOP_CHECK_EVERY batches (at a window's end) and after the epoch's
last step, not after every step (a multi-node round trip each), and stops right after the step where they agree."""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.core.precision import setup_precision
from pipeline.train.loop import STOP_CHECK_EVERY, Stepper, run_epoch


def linear_stepper() -> Stepper:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Stepper(model=model, raw_model=model, criterion=nn.CrossEntropyLoss(), optimizer=optimizer,
                   scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                   precision=setup_precision(torch.device("cpu"), "none", False),
                   to_device=lambda images, targets, batch_key: (images, targets))


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, generator=generator), torch.randint(0, 4, (2,), generator=generator))
            for _ in range(count)]


def test_stop_is_asked_every_few_steps_and_at_the_epochs_end():
    stepper, asked_after = linear_stepper(), []
    total = 2 * STOP_CHECK_EVERY + 3

    def stop() -> bool:
        asked_after.append(stepper.scheduler.last_epoch)  # optimizer steps done so far
        return False

    result = run_epoch(stepper, batches(total), epoch=0, start_step=0, print_freq=100, stop=stop)
    assert asked_after == [STOP_CHECK_EVERY, 2 * STOP_CHECK_EVERY, total]
    assert (result.step_in_epoch, result.stopped) == (total, False)


def test_an_agreed_stop_ends_the_epoch_after_that_step():
    stepper = linear_stepper()
    result = run_epoch(stepper, batches(3 * STOP_CHECK_EVERY), epoch=0, start_step=0, print_freq=100,
                       stop=lambda: True)
    assert (result.step_in_epoch, result.stopped) == (STOP_CHECK_EVERY, True)
    assert stepper.scheduler.last_epoch == STOP_CHECK_EVERY and result.totals.samples == 2 * STOP_CHECK_EVERY


def test_with_accumulation_stop_is_asked_at_window_ends_about_every_few_batches_not_every_few_windows():
    stepper, asked_after = linear_stepper(), []
    stepper.accum_steps = 4  # windows of 4 batches: asked every 2 windows (8 batches), not every 8 windows (32)

    def stop() -> bool:
        asked_after.append(stepper.scheduler.last_epoch)  # optimizer steps done so far
        return False

    run_epoch(stepper, batches(10 * 4), epoch=0, start_step=0, print_freq=100, stop=stop)
    assert asked_after == [2, 4, 6, 8, 10]
