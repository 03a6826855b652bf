"""What every train or eval process does first and last: rank-aware logging, device, process group."""
from __future__ import annotations

import contextlib
import traceback
from typing import Iterator

import torch

from pipeline.core import distributed
from pipeline.core.logs import setup_logging
from pipeline.core.threads import process_threads


@contextlib.contextmanager
def stage_process(device_kind: str, *, workers: int = 0,
                  threads: int = 0) -> Iterator[tuple[distributed.DistEnv, torch.device]]:
    """Join the torchrun group (if any) on ``device_kind``; leave it on exit. Intra-op threads: ``threads``, or
    this process's share of the node's CPUs less its ``workers`` (pipeline/core/threads.py).

    Run the stage in a function called inside the block, so its models (DDP) are gone when the group
    is destroyed: torch 2.14 with gloo can abort at exit otherwise. On an error the traceback's frames
    are cleared for the same reason.
    """
    env = distributed.read_env()
    setup_logging(env.rank)
    device = distributed.resolve_device(device_kind, env.local_rank)
    distributed.init(device, env)
    try:
        with process_threads(processes=env.local_world_size, workers=workers, threads=threads):
            yield env, device
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        distributed.cleanup()
