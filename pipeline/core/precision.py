"""The fast path of a device: AMP autocast (bf16, or fp16 with a GradScaler), channels_last, cudnn autotuning.

``amp = "bf16"`` runs the forward pass under ``torch.autocast(device_type, dtype=torch.bfloat16)``;
bf16 keeps fp32's exponent range, so the loss needs no scaling. ``amp = "fp16"`` autocasts to float16
and scales the loss with ``torch.amp.GradScaler`` so small gradients do not flush to zero; torch 2.14
supports both on CPU too, where fp16 is slower than bf16 (no native fp16 matmul on most CPUs).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.nn as nn

from pipeline.core.accelerator import Accelerator
from pipeline.core.errors import UserError

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(UserError, ValueError):
    """A precision mode the device cannot run."""


@dataclass
class Precision:
    """How tensors are laid out and cast on one device; ``scaler`` is set for fp16 only."""

    device: torch.device
    amp: str = "none"
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> ContextManager:
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AMP_DTYPES[self.amp])

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model moved to the device, in channels_last layout when asked."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def backward(self, loss: torch.Tensor) -> None:
        """The backward pass, of the loss scaled by the GradScaler when there is one."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer, *, clip_grad_norm: float = 0.0) -> None:
        """The optimizer step after ``backward``, through the GradScaler when there is one; with ``clip_grad_norm``
        the gradients' total norm is clipped to it first (unscaled, so the bound means the same in fp16)."""
        if self.scaler is None:
            clip_gradients(optimizer, clip_grad_norm)
            optimizer.step()
            return
        if clip_grad_norm > 0:
            self.scaler.unscale_(optimizer)
            clip_gradients(optimizer, clip_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the total L2 norm of the gradients of what ``optimizer`` steps (after DDP's all-reduce, so every rank
    clips alike); ``max_norm`` 0 is off."""
    if max_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def setup_precision(device: torch.device, amp: str, channels_last: bool) -> Precision:
    """The Precision for ``device``; turns on cudnn autotuning on CUDA (fixed input sizes, faster kernels)."""
    if amp not in ("none", *AMP_DTYPES):
        raise PrecisionError(f"--amp {amp!r} is not one of none, bf16, fp16")
    accelerator = Accelerator.of(device)
    problem = accelerator.amp_problem(amp)
    if problem:
        raise PrecisionError(problem)
    if amp == "fp16" and device.type == "cpu":
        log.warning("--amp fp16 on CPU runs, but slower than --amp bf16 on most CPUs")
    torch.backends.cudnn.benchmark = True  # read by cuDNN only
    scaler = None
    if amp == "fp16":
        scaler = accelerator.grad_scaler()
        # The scaler skips the optimizer step when gradients overflow (it then lowers the scale); the
        # schedule still advances one step per batch, so torch's "scheduler before optimizer" notice is noise.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
    if channels_last and not accelerator.channels_last_default:
        log.info("channels_last is not used on %s: its runtime picks its own memory formats", device.type)
    return Precision(device=device, amp=amp, channels_last=channels_last and accelerator.channels_last_default,
                     scaler=scaler)
