"""The model's next input made ready while the current step runs: one batch in flight.

Why: decoding, augmenting, copying and normalizing a batch in series with the model leaves the accelerator idle
that long every step. Here, when batch k is handed over, batch k+1 is already queued: on an accelerator its
work runs on a stream of its own, which the training stream waits for (a stream wait, no host sync) only when it
takes the batch, and the batch's tensors are recorded on the training stream, so the caching allocator does not
hand their memory to the next batch while the step still reads it. On the CPU nothing runs beside the host, so
the next batch is made when the current one is handed over.

Each batch comes from the loader and through ``DeviceBatcher`` (pipeline.data.loaders) under the key
(epoch, index) it would have had without the look-ahead, so the mix draws, and with them an exact resume, do not
change. ``loader_wait_s`` is the host time the last hand-over spent blocked on the loader.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from pipeline.core.accelerator import Accelerator


@dataclass
class Prepared:
    images: torch.Tensor
    targets: torch.Tensor
    loader_wait_s: float


class DeviceInputs:
    """``(images, targets)`` of ``batches`` as the model's input on ``device`` (``to_device``, a DeviceBatcher),
    one batch prepared ahead; ``keys`` gives each batch's (epoch, index)."""

    def __init__(self, batches: Iterable[tuple[Any, torch.Tensor]], to_device: Callable, device: torch.device,
                 keys: Iterable[tuple[int, int]] | None = None):
        self.batches, self.to_device = batches, to_device
        self.keys = keys
        self.accelerator = Accelerator.of(device)
        self.stream = self.accelerator.new_stream()
        self.loader_wait_s = 0.0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.batches)
        keys = iter(self.keys) if self.keys is not None else None
        pending = self._prepare(batches, keys)
        while pending is not None:
            self._hand_over(pending)
            self.loader_wait_s = pending.loader_wait_s
            ready, pending = pending, self._prepare(batches, keys)
            yield ready.images, ready.targets

    def _prepare(self, batches: Iterator, keys: Iterator | None) -> Prepared | None:
        start = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:
            return None
        waited = time.perf_counter() - start
        key = next(keys) if keys is not None else (0, 0)
        with self.accelerator.on_stream(self.stream):
            images, targets = self.to_device(images, targets, batch_key=key)
        return Prepared(images, targets, waited)

    def _hand_over(self, prepared: Prepared) -> None:
        """Make the training stream wait for the batch's stream, and keep its memory until the step is done."""
        if self.stream is None:
            return
        current = self.accelerator.current_stream()
        current.wait_stream(self.stream)
        prepared.images.record_stream(current)
        prepared.targets.record_stream(current)
