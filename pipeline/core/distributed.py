"""The process group, read from the torchrun environment only (this package never reads SLURM_*).

One process when none of RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT is set; an error
when only some are. Backend by device: nccl (cuda), hccl (npu, needs torch_npu), gloo (cpu).
"""
from __future__ import annotations

import datetime
import gc
import importlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from pipeline.core.accelerator import BACKENDS
from pipeline.core.errors import UserError

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(UserError, RuntimeError):
    """The environment or the hardware does not allow the requested process group."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = ""
    master_port: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def nodes(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)


def read_env(environ: dict[str, str] | None = None) -> DistEnv:
    """The torchrun variables as a DistEnv; raises DistributedSetupError when only partly set."""
    env = os.environ if environ is None else environ
    present = [k for k in ENV_KEYS if k in env]
    if not present:
        return DistEnv()
    missing = [k for k in ENV_KEYS if k not in env]
    if missing:
        raise DistributedSetupError(f"partially set distributed environment: {present} set but {missing} missing; "
                                    "start the processes with torchrun, or unset these variables for one process")
    world = int(env["WORLD_SIZE"])
    return DistEnv(rank=int(env["RANK"]), local_rank=int(env["LOCAL_RANK"]), world_size=world,
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                   master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]))


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    """The torch.device for 'auto', 'cuda', 'npu' or 'cpu', with a clear error when it is not there."""
    if kind == "auto":
        if torch.cuda.is_available():
            kind = "cuda"
        elif _npu_available():
            kind = "npu"
        else:
            kind = "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError("--device cuda was asked for but no CUDA GPU is visible "
                                        "(check CUDA_VISIBLE_DEVICES and the job's GPU request), or use --device cpu")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedSetupError(f"local rank {local_rank} needs GPU {local_rank} but only {count} are visible; "
                                        "lower --gpus-per-node to the GPUs per node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if kind == "npu":
        if not _npu_available():
            raise DistributedSetupError("--device npu needs the torch_npu package (Ascend CANN) and a visible NPU")
        torch.npu.set_device(local_rank)
        return torch.device("npu", local_rank)
    return torch.device("cpu")


def _npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def init(device: torch.device, env: DistEnv, timeout_s: float = 1800) -> None:
    """Join the process group for ``device``'s backend when running under torchrun (no-op otherwise)."""
    if not env.distributed or dist.is_initialized():
        return
    backend = BACKENDS[device.type]
    kwargs: dict[str, Any] = {}
    if device.type != "cpu":  # binds the group to this device (eager NCCL/HCCL communicator)
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    log.info("joined process group: backend=%s rank=%d/%d local_rank=%d master=%s:%d",
             backend, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port)


def cleanup(*objects_holding_the_group: Any) -> None:
    """Destroy the process group; drop DDP modules first (gloo can abort at exit while one is alive)."""
    del objects_holding_the_group
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def on_main_process(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a side effect (a file write) on rank 0 only; returns its result there, None elsewhere."""
    return fn(*args, **kwargs) if is_main_process() else None


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable Python value), in rank order; a collective."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum of each value over all processes, added on the host in float64 (``math.fsum``: exact counts, the
    same result in any order). No float64 tensor reaches a device or a collective: HCCL reduces none, and
    NPUs compute float64 slowly if at all. For epoch-end figures, not for every step."""
    return [math.fsum(column) for column in zip(*gather([float(v) for v in values]))]
