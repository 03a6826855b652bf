"""The accelerator layer's choices for cpu (real), and for npu with a small stand-in for torch_npu's module, as
no NPU can be had here (marked: `npu_stand_in`)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from pipeline.core.accelerator import Accelerator


def npu_stand_in(*, bf16: bool) -> Accelerator:
    """An Ascend device as the layer sees it: torch.npu's calls that it uses, nothing else."""
    class NpuScaler:  # torch_npu.npu.amp.GradScaler reads the NPU's overflow flags
        pass

    module = SimpleNamespace(is_bf16_supported=lambda: bf16, get_device_name=lambda device: "Ascend910A",
                             amp=SimpleNamespace(GradScaler=NpuScaler))
    return Accelerator(SimpleNamespace(type="npu", index=0), module)


def test_the_cpu_uses_gloo_channels_last_and_keeps_no_accelerator_rng():
    cpu = Accelerator.of(torch.device("cpu"))
    assert (cpu.backend, cpu.channels_last_default, cpu.rng_state(), cpu.versions()) == ("gloo", True, [], {})
    assert cpu.amp_problem("bf16") == "" and cpu.peak_memory_mib() > 0
    assert isinstance(cpu.grad_scaler(), torch.amp.GradScaler)


def test_npu_stand_in_hccl_no_channels_last_its_own_scaler_and_no_bf16_on_a_910a():
    npu = npu_stand_in(bf16=False)
    assert (npu.backend, npu.channels_last_default) == ("hccl", False)
    assert type(npu.grad_scaler()).__name__ == "NpuScaler"
    problem = npu.amp_problem("bf16")
    assert "Ascend910A" in problem and problem.endswith("use --amp fp16")

