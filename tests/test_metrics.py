"""Top-k counts and the throughput timer, on real tensors and a clock the test moves."""
from __future__ import annotations

import pytest
import torch

from pipeline.core import metrics
from pipeline.core.metrics import ThroughputTimer, Totals, batch_sums, topk_correct, warmup_steps_for

CPU = torch.device("cpu")


def test_topk_correct_counts_hard_and_soft_targets():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # class 1 first
                           [0.5, 0.1, 0.4, 0.3, 0.2, 0.0],   # class 5 last: outside the top 5
                           [0.0, 0.1, 0.2, 0.9, 0.3, 0.4]])  # class 4 third
    labels = torch.tensor([1, 5, 4])
    assert topk_correct(logits, labels).tolist() == [1, 2]
    soft = torch.nn.functional.one_hot(labels, 6).float() * 0.7 + 0.05  # MixUp-like: argmax is the label
    assert topk_correct(logits, soft).tolist() == [1, 2]


def test_topk_is_capped_at_the_class_count():
    logits = torch.tensor([[0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    assert topk_correct(logits, torch.tensor([2, 0])).tolist() == [0, 2]  # top-5 of 3 classes is all of them


def test_batch_sums_weight_the_mean_loss_by_the_batch():
    logits = torch.eye(4)
    sums = batch_sums(torch.tensor(0.5), logits, torch.tensor([0, 1, 2, 0]))
    assert sums.tolist() == [2.0, 3.0, 4.0, 4.0]
    totals = Totals(*sums.tolist())
    assert (totals.loss, totals.acc1, totals.acc5) == (0.5, 75.0, 100.0)


@pytest.mark.parametrize("steps, warmup", [(0, 0), (1, 0), (2, 1), (3, 1), (9, 4), (10, 5), (5000, 5)])
def test_warmup_leaves_at_least_half_of_a_short_epoch(steps, warmup):
    assert warmup_steps_for(steps) == warmup


class FakeClock:
    """Stands in for the time module of pipeline.core.metrics: perf_counter moves only when told."""

    def __init__(self):
        self.now_s = 100.0

    def perf_counter(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


def test_throughput_leaves_out_warmup_and_tells_the_loader_wait_from_the_devices_wait_and_phases(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics, "time", clock)
    timer = ThroughputTimer(CPU, warmup_steps=2)
    for step in range(6):
        clock.sleep(1.0 if step < 2 else 0.125)  # slow warm-up steps, then 125 ms until the input is ready...
        timer.data_ready(loader_wait_s=0.05)  # ...of which 50 ms blocked on the loader, the rest decoding
        clock.sleep(0.25)  # forward and backward
        timer.backward_done()
        clock.sleep(0.125)  # optimizer
        timer.step_done(images=10)
    result = timer.result()
    assert result.measured_steps == 4 and result.warmup_steps == 2
    assert result.img_per_s_all_ranks == 20.0  # 40 images in 4 x 500 ms; with the warm-up it would be 60 / 4.75 s
    assert result.img_per_s_per_rank == result.img_per_s_all_ranks
    assert result.data_wait_frac == pytest.approx(0.1)  # 4 x 50 ms of 2 s: what the loader alone cost
    assert result.device_wait_frac == pytest.approx(0.25)  # 4 x 125 ms: the time the model waited for its input
    assert (result.input_wait_ms, result.fwd_bwd_ms, result.optimizer_ms) == pytest.approx((125, 250, 125))


def test_throughput_of_an_epoch_without_measured_steps_is_nan():
    timer = ThroughputTimer(CPU, warmup_steps=warmup_steps_for(0))
    result = timer.result()
    assert result.measured_steps == 0 and result.img_per_s_all_ranks != result.img_per_s_all_ranks
