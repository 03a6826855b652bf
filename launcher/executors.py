"""What every scheduler backend (launcher/backends/) shares: where a job's files go (``job_folder``), the
resources a stage asks for in generic terms, the lines every job runs first, and the launcher's error.

The job folder layout is owned here, so ``--dry-run`` prints what a real submission sends whichever backend runs it.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from jobs.torchrun import REPO_ROOT
from pipeline.core.config import REQUEST_STAGES, Config, StageRequest
from pipeline.core.errors import UserError
from pipeline.core.stages import STAGES


class LaunchError(UserError, RuntimeError):
    """Input the launcher cannot act on; the message says what to do instead."""


class Resources(NamedTuple):
    """What a stage's job asks for, in any scheduler's terms."""

    nodes: int
    procs_per_node: int  # one torchrun per node starts this many processes; a one-process stage: 1
    gpus_per_node: int  # CUDA devices to request (NPUs are a Slurm generic resource: [slurm] npu_gres)


class Request(NamedTuple):
    """The rest of a stage's request: its own ([launch.<stage>]), else the stage table's default, else [launch]."""

    time: int  # minutes
    mem: str  # per node; empty: the scheduler's default
    cpus: int  # per node task, as given (the stage's own, else --cpus-per-task); 0: the stage's default


def own_request(cfg: Config, stage: str) -> StageRequest:
    """[launch.<stage>] (train has none: its request is [launch] itself)."""
    return getattr(cfg.launch, stage) if stage in REQUEST_STAGES else StageRequest()


def stage_request(cfg: Config, stage: str) -> Request:
    """--cpus-per-task and --mem size the torchrun stages (train, eval): download, prep and report, sent in the same
    chain, take only their own ([launch.<stage>]) or their default, not the training's 64 CPUs and 480G."""
    own, torchrun = own_request(cfg, stage), STAGES[stage].torchrun
    return Request(time=own.time or STAGES[stage].time_min or cfg.launch.time,
                   mem=own.mem or (cfg.launch.mem if torchrun else ""),
                   cpus=own.cpus or (cfg.launch.cpus_per_task if torchrun else 0))


def stage_resources(cfg: Config, stage: str) -> Resources:
    """(nodes, processes per node, GPUs per node to request) of a stage's job: one-process stages ask for no GPU,
    eval for one node unless [launch.eval] nodes says more."""
    row = STAGES[stage]
    if not row.torchrun:
        return Resources(1, 1, 0)
    nproc = cfg.launch.gpus_per_node
    nodes = own_request(cfg, stage).nodes or (cfg.launch.nodes if row.nodes == "launch" else 1)
    return Resources(nodes, nproc, nproc if cfg.train.device in ("auto", "cuda") else 0)


def default_cpus(cfg: Config, stage: str) -> int | None:
    """CPUs a node task needs (the stage table's ``cpus``): one per process and per loader worker (train, eval:
    processes per node x (workers + 1)), or per prep writer thread (--workers) and the reading thread; download,
    report: the scheduler's default."""
    _, nproc, _ = stage_resources(cfg, stage)  # prep: one process
    return None if STAGES[stage].cpus == "default" else nproc * (cfg.data.workers + 1)


def pythonpath_setup() -> str:
    """Lets the job's python unpickle jobs.* even when the package is not installed."""
    return f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"


def setup_lines(cfg: Config) -> list[str]:
    """The shell lines every job runs before its processes start."""
    return [pythonpath_setup(), *cfg.launch.setup]


def job_folder(cfg: Config) -> str:
    return str(Path(cfg.train.run_dir) / "logs" / "%j")


def private_jobs_root(cfg: Config) -> Path:
    """``<run dir>/logs``, made readable by its owner only before submitit writes a job's inputs there: the
    pickled job (``<id>_submitted.pkl``) holds the resolved config, --header and --url values included."""
    root = Path(job_folder(cfg)).parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
    except PermissionError:
        raise LaunchError(f"cannot make {root} private (mode 0700) for the jobs' inputs: it or a folder above it "
                          "belongs to someone else; pass a --run-dir of your own") from None
    return root


def seal_job_inputs(jobs: Sequence[Any]) -> None:
    """Each submitted job's folder 0700 and its pickled inputs 0600 (submitit writes them with the umask's mode)."""
    for job in jobs:
        if job.paths.folder.is_dir():
            job.paths.folder.chmod(0o700)
        if job.paths.submitted_pickle.is_file():
            job.paths.submitted_pickle.chmod(0o600)
