"""What a running job learns about itself, in one place: its id, how often the scheduler restarted it, its node.

submitit's ``JobEnvironment`` answers for the cluster the job runs on (Slurm, local, debug: one class per cluster,
each mapping its own variables); the restart count, which submitit does not carry, comes from the cluster's
variable named in ``RESTART_COUNT``. Outside a submitit job (``python -m jobs.train`` by hand, a bare torchrun)
the job is this one machine, started once. Nothing else in jobs/ or pipeline/ reads a scheduler's variables.
"""
from __future__ import annotations

import dataclasses
import os
import socket

RESTART_COUNT = {"slurm": "SLURM_RESTART_COUNT"}  # cluster (submitit's name) -> its requeue count variable


@dataclasses.dataclass(frozen=True)
class JobEnv:
    cluster: str  # submitit's name of the cluster: slurm, local, debug; "none" outside a submitit job
    job_id: str  # as submitit names it: "<array id>_<task>" for an array task
    unique_id: str  # the scheduler's own id of this job (an array task's own number)
    restarts: int  # times the scheduler requeued the job
    node: int  # this node's rank in the job
    num_nodes: int
    hostnames: tuple[str, ...]  # of every node, in node rank order


def job_env() -> JobEnv:
    """This process's job, from submitit's view of its cluster; a one-node job of this machine outside one."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        job_id = os.environ.get("TORCHELASTIC_RUN_ID", "") or f"pid{os.getpid()}"
        return JobEnv("none", job_id, job_id, 0, 0, 1, (socket.gethostname(),))
    cluster = env.name()
    restarts = int(os.environ.get(RESTART_COUNT.get(cluster, ""), "0") or 0)
    return JobEnv(cluster, env.job_id, env.raw_job_id, restarts, env.node, env.num_nodes, tuple(env.hostnames))
