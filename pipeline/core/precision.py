"""The fast path of a device: AMP autocast (bf16, or fp16 with a GradScaler), AMP O2, channels_last, cudnn autotuning.

``amp = "bf16"`` runs the forward pass under ``torch.autocast(device_type, dtype=torch.bfloat16)``;
bf16 keeps fp32's exponent range, so the loss needs no scaling. ``amp = "fp16"`` autocasts to float16
and scales the loss with ``torch.amp.GradScaler`` so small gradients do not flush to zero; torch 2.14
supports both on CPU too, where fp16 is slower than bf16 (no native fp16 matmul on most CPUs).

``amp = "fp16-o2"`` is apex's opt level O2, which the Ascend ModelZoo scripts train with: the trained model's
weights are float16 (norm layers kept float32), the optimizer steps float32 master weights (the model the trainer
checkpoints, validates and averages), the loss is scaled (dynamically, or by ``--loss-scale N``), and the forward
pass runs under fp16 autocast, which casts the input and computes the loss in float32. ``bf16-o2`` is the same
with bfloat16 weights and no loss scaling. Gradients (and DDP's all-reduce of them) are in the low precision.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import warnings
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.nn as nn

from pipeline.core.accelerator import Accelerator
from pipeline.core.errors import UserError

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-o2": torch.bfloat16, "fp16-o2": torch.float16}
O2_MODES = ("bf16-o2", "fp16-o2")
# kept float32 in an O2 model, as apex's keep_batchnorm_fp32 (and layer/group norm, whose statistics fp16 spoils)
FP32_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class PrecisionError(UserError, ValueError):
    """A precision mode the device cannot run."""


class LowPrecisionCopy:
    """O2's pair of models: ``model`` in low precision (its FP32_LAYERS share the master's tensors) runs the steps;
    ``master`` keeps every weight in float32 for the optimizer. Gradients go down, weights come back up."""

    def __init__(self, master: nn.Module, dtype: torch.dtype):
        self.master = master
        self.model = copy.deepcopy(master)
        for low, high in zip(self.model.modules(), master.modules()):
            if isinstance(low, FP32_LAYERS):  # the very tensors: updates and running statistics land in the master
                low._parameters, low._buffers = high._parameters, high._buffers
            else:
                for name, tensor in itertools.chain(low.named_parameters(recurse=False), low.named_buffers(
                        recurse=False)):
                    if tensor.is_floating_point():
                        tensor.data = tensor.data.to(dtype)
        self.pairs = [(m, w) for m, w in zip(master.parameters(), self.model.parameters()) if m is not w]

    def grads_to_master(self) -> None:
        """The low-precision gradients, as float32, onto the master weights (still scaled)."""
        for master, low in self.pairs:
            master.grad = None if low.grad is None else low.grad.float()

    def master_to_model(self) -> None:
        """The master weights, rounded, into the model (after each optimizer step and after a checkpoint's load)."""
        with torch.no_grad():
            for master, low in self.pairs:
                low.copy_(master)


@dataclass
class Precision:
    """How tensors are laid out and cast on one device; ``scaler`` is set for fp16 only; ``loss_scale`` > 0 keeps
    the scaler's scale at that value (static) instead of adapting it; ``o2`` is set by ``training_copy``."""

    device: torch.device
    amp: str = "none"
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None
    loss_scale: float = 0.0
    o2: LowPrecisionCopy | None = None

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

    def training_copy(self, model: nn.Module) -> nn.Module:
        """The module the training steps run: under O2 the low-precision copy of ``model``, whose gradients step
        ``model`` (the fp32 master weights, which the optimizer, the EMA and checkpoints hold); else ``model``."""
        if self.amp not in O2_MODES:
            return model
        self.o2 = LowPrecisionCopy(model, AMP_DTYPES[self.amp])
        return self.o2.model

    def weights_loaded(self) -> None:
        """After the master weights were loaded (a resume): the O2 copy takes them."""
        if self.o2 is not None:
            self.o2.master_to_model()

    def backward(self, loss: torch.Tensor) -> None:
        """The backward pass, of the loss scaled by the GradScaler when there is one."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer, *, clip_grad_norm: float = 0.0) -> None:
        """The optimizer step after ``backward``, through the GradScaler when there is one; with ``clip_grad_norm``
        the gradients' total norm is clipped to it first (unscaled, so the bound means the same in fp16). Under O2
        the step is the master weights', copied back to the model after it."""
        if self.o2 is not None:
            self.o2.grads_to_master()
        if self.scaler is None:
            clip_gradients(optimizer, clip_grad_norm)
            optimizer.step()
        else:
            if clip_grad_norm > 0:
                self.scaler.unscale_(optimizer)
                clip_gradients(optimizer, clip_grad_norm)
            self.scaler.step(optimizer)  # skipped when a gradient overflowed
            self.scaler.update(self.loss_scale or None)  # static: the same scale again
        if self.o2 is not None:
            self.o2.master_to_model()


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the total L2 norm of the gradients of what ``optimizer`` steps (after DDP's all-reduce, so every rank
    clips alike); ``max_norm`` 0 is off."""
    if max_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def setup_precision(device: torch.device, amp: str, channels_last: bool, loss_scale: float = 0.0) -> Precision:
    """The Precision for ``device``; turns on cudnn autotuning on CUDA (fixed input sizes, faster kernels)."""
    if amp not in ("none", *AMP_DTYPES):
        raise PrecisionError(f"--amp {amp!r} is not one of none, {', '.join(AMP_DTYPES)}")
    accelerator = Accelerator.of(device)
    problem = accelerator.amp_problem(amp)
    if problem:
        raise PrecisionError(problem)
    if AMP_DTYPES.get(amp) == torch.float16 and device.type == "cpu":
        log.warning("--amp %s on CPU runs, but slower than bf16 on most CPUs", amp)
    torch.backends.cudnn.benchmark = True  # read by cuDNN only
    scaler = None
    if AMP_DTYPES.get(amp) == torch.float16:
        scaler = accelerator.grad_scaler(loss_scale)
        # The scaler skips the optimizer step when gradients overflow (it then lowers the scale); the
        # schedule still advances one step per batch, so torch's "scheduler before optimizer" notice is noise.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
    if channels_last and not accelerator.channels_last_default:
        log.info("channels_last is not used on %s: its runtime picks its own memory formats", device.type)
    return Precision(device=device, amp=amp, channels_last=channels_last and accelerator.channels_last_default,
                     scaler=scaler, loss_scale=loss_scale if scaler is not None else 0.0)
