"""What differs between accelerators (CUDA GPUs, Ascend NPUs, the CPU), decided in one place from the device.

Training, eval, the pre-flight and the benchmark ask an ``Accelerator`` instead of testing ``device.type``:
the process group's backend, whether an AMP mode runs, the fp16 loss scaler, the channels_last default, the
RNG state a checkpoint keeps, peak memory, synchronization and the versions provenance records. The device's
module (``torch.cuda``, or ``torch.npu`` once ``torch_npu`` is imported) supplies the device-generic calls,
so no branch here names an API that only CUDA has.

Collectives use only dtypes that nccl, hccl and gloo all reduce (``COLLECTIVE_DTYPES``): HCCL has no float64.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
COLLECTIVE_DTYPES = (torch.int64, torch.float32)  # what every backend above sums
MIB = 2 ** 20
ASCEND_ENV_PREFIXES = ("HCCL_", "ASCEND_", "CANN_")  # recorded in provenance when set


@dataclass(frozen=True)
class Accelerator:
    device: torch.device
    module: Any = None  # torch.cuda or torch.npu; None for the CPU

    @classmethod
    def of(cls, device: torch.device) -> "Accelerator":
        if device.type == "npu":
            importlib.import_module("torch_npu")  # registers torch.npu
        return cls(device, None if device.type == "cpu" else torch.get_device_module(device.type))

    @property
    def backend(self) -> str:
        return BACKENDS[self.device.type]

    @property
    def sum_dtype(self) -> torch.dtype:
        """What running sums on the device are kept in: float64, but NPUs compute it slowly if at all."""
        return torch.float32 if self.device.type == "npu" else torch.float64

    @property
    def channels_last_default(self) -> bool:
        """NHWC helps cuDNN and CPU kernels; torch_npu keeps its own internal formats, so not on NPUs."""
        return self.device.type != "npu"

    def amp_problem(self, amp: str) -> str:
        """Why ``amp`` cannot run here and what to use instead ('' when it can)."""
        if amp == "none":
            return ""
        if amp.startswith("bf16") and self.module is not None and not self.module.is_bf16_supported():
            return (f"--amp {amp} needs bfloat16 support, which this {self.device.type} ({self.name()}) lacks "
                    f"(GPUs before Ampere, Ascend 910A); use --amp {amp.replace('bf16', 'fp16')}")
        if not torch.amp.is_autocast_available(self.device.type):
            return f"--amp {amp} is not supported on device {self.device.type}; use --amp none"
        return ""

    def grad_scaler(self, loss_scale: float = 0.0) -> torch.amp.GradScaler:
        """The fp16 loss scaler: torch_npu's on NPUs, which reads the NPU's overflow flags (the Ascend 910
        saturates instead of producing inf/NaN in its default mode), torch's elsewhere; starting at ``loss_scale``
        when given (the caller keeps it there), else at the default 2 ** 16."""
        start = {"init_scale": loss_scale} if loss_scale > 0 else {}
        if self.device.type == "npu":
            return self.module.amp.GradScaler(**start)
        return torch.amp.GradScaler(self.device.type, **start)

    def rng_state(self) -> list[torch.Tensor]:
        """The generator states of this process's accelerator devices (empty on the CPU)."""
        return list(self.module.get_rng_state_all()) if self.module is not None else []

    def set_rng_state(self, states: list[torch.Tensor]) -> None:
        if self.module is not None and states:
            self.module.set_rng_state_all(states)

    def synchronize(self) -> None:
        if self.module is not None:
            self.module.synchronize(self.device)

    def synchronize_current_stream(self) -> None:
        """Wait for the work queued on this thread's current stream only, not the device's other streams."""
        if self.module is not None:
            self.module.current_stream(self.device).synchronize()

    def current_stream(self) -> Any:
        """This thread's current stream on the device; None on the CPU, which has none."""
        return self.module.current_stream(self.device) if self.module is not None else None

    def new_stream(self) -> Any:
        """A stream of its own for work to overlap the current stream's; None on the CPU."""
        return self.module.Stream(self.device) if self.module is not None else None

    def on_stream(self, stream: Any) -> ContextManager:
        """Queue the block's device work on ``stream`` (a no-op on the CPU)."""
        return self.module.stream(stream) if self.module is not None else contextlib.nullcontext()

    def timing_event(self) -> Any:
        """An event whose device timestamp can be read (``elapsed_time``); None on the CPU."""
        return self.module.Event(enable_timing=True) if self.module is not None else None

    def peak_memory_mib(self) -> float:
        """Peak memory of this process: allocated on the accelerator, or max resident set size on the CPU."""
        if self.module is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux
        return self.module.max_memory_allocated(self.device) / MIB

    def name(self) -> str:
        if self.module is not None:
            return str(self.module.get_device_name(self.device))
        return cpu_model() or platform.machine()

    def versions(self) -> dict[str, str]:
        """The accelerator stack's versions (and Ascend's environment) for provenance and the pre-flight."""
        if self.device.type == "cuda":
            nccl = ".".join(str(v) for v in torch.cuda.nccl.version()) if torch.distributed.is_nccl_available() else ""
            return {"cuda": torch.version.cuda or "", "cudnn": str(torch.backends.cudnn.version() or ""),
                    "nccl": nccl}
        if self.device.type == "npu":
            torch_npu = importlib.import_module("torch_npu")
            found = {"torch_npu": str(getattr(torch_npu, "__version__", "")), "cann": cann_version()}
            return found | {k: v for k, v in sorted(os.environ.items()) if k.startswith(ASCEND_ENV_PREFIXES)}
        return {}


def cann_version() -> str:
    """The CANN toolkit's version from its install (set_env.sh exports ASCEND_TOOLKIT_HOME), '' if not found."""
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH", "")
    for info in (Path(home) / "version.cfg", Path(home) / "compiler" / "version.info"):
        try:
            for line in info.read_text().splitlines():
                if "version" in line.lower() and "=" in line:
                    return line.split("=", 1)[1].strip().strip('"[]')
        except OSError:
            continue
    return ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), '' elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
