"""Intra-op threads of a training or eval process: its share of the CPUs it may run on, less its loader workers.

A node's processes share the CPUs the scheduler gave the job (``os.sched_getaffinity``, which honours cgroups,
``taskset`` and Slurm's binding, unlike ``os.cpu_count``); each loader worker keeps one CPU busy decoding. So::

    threads = max(1, CPUs this process may use // processes on the node - loader workers)
    # 64 CPUs, 8 processes, 4 workers each: 64 // 8 - 4 = 4 threads per process

Counting the workers matters most on small CPU runs: on a 2-core machine one process with 2 intra-op threads and
its workers ran 3-8x slower than with 1 thread, and a CPU sweep's 1-process point fell so far below its 2-process
one that the scaling efficiency read 673%. ``--threads N`` sets the count instead. The environment's
``OMP_NUM_THREADS`` is not the user's word here: torchrun sets it to 1 for every process it starts.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0))


def threads_per_process(cpus: int, processes: int, workers: int) -> int:
    """``cpus`` shared by ``processes``, less each one's ``workers``; at least 1."""
    return max(1, cpus // max(processes, 1) - max(workers, 0))


@contextlib.contextmanager
def process_threads(*, processes: int, workers: int, threads: int = 0) -> Iterator[int]:
    """torch's intra-op threads (and OMP_NUM_THREADS, which children inherit) for this process while inside;
    ``threads`` > 0 as given, else threads_per_process. The previous setting comes back on exit (a test may train
    in its own process)."""
    import torch  # here: the job's node code (jobs/torchrun.py) imports this module without torch

    cpus = usable_cpus()
    count = threads if threads > 0 else threads_per_process(cpus, processes, workers)
    before, env_before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)
    how = "as --threads asks" if threads > 0 else \
        f"{cpus} CPUs // {processes} process(es) on this node - {workers} loader worker(s)"
    log.debug("%d intra-op thread(s): %s", count, how)  # the stage's first line says the count
    try:
        yield count
    finally:
        torch.set_num_threads(before)
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
