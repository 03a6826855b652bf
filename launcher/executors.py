"""Cluster knowledge in one place: the submitit executor of each stage and the sbatch parameters it gets, and
where a job's files go (``job_folder``), so ``--dry-run`` prints what a real submission sends.

``get_slurm_executor_parameters`` returns a dict and takes overrides (dinov2's ``get_slurm_executor_parameters``
shape); ``executor_parameters`` adds what one stage needs (nodes, accelerators, CPUs, the job it waits for).
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from jobs.torchrun import REPO_ROOT
from pipeline.core.config import Config, LaunchConfig
from pipeline.core.errors import UserError
from pipeline.core.stages import STAGES

SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")

OWN_FLAGS = {"nodes": "--nodes", "gpus-per-node": "--gpus-per-node", "cpus-per-task": "--cpus-per-task",
             "mem": "--mem", "time": "--time", "partition": "--partition", "account": "--account", "qos": "--qos",
             "constraint": "--constraint", "exclusive": "--exclusive", "job-name": "--job-name",
             "signal": "--signal-delay-s"}

SET_BY_LAUNCHER = {"ntasks-per-node", "output", "error", "dependency", "array", "open-mode"}

class LaunchError(UserError, RuntimeError):
    """Input the launcher cannot act on; the message says what to do instead."""

def parse_sbatch_options(options: Sequence[str]) -> dict[str, str | bool]:
    """``--sbatch key=value`` (or a bare ``key`` for a switch) as extra #SBATCH lines."""
    parsed: dict[str, str | bool] = {}
    for item in options:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not SBATCH_KEY.match(key):
            raise LaunchError(f"--sbatch {item!r}: expected key=value, e.g. --sbatch mail-type=END")
        if key in OWN_FLAGS:
            raise LaunchError(f"--sbatch {item!r}: use {OWN_FLAGS[key]} for this option")
        if key in SET_BY_LAUNCHER:
            raise LaunchError(f"--sbatch {item!r}: the launcher sets --{key} itself")
        parsed[key] = value if sep else True
    return parsed

def get_slurm_executor_parameters(launch: LaunchConfig, *, nodes: int, gpus_per_node: int,
                                  **kwargs: Any) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one task per node; ``kwargs`` override anything."""
    params: dict[str, Any] = {"job_name": launch.job_name, "time": launch.time, "nodes": nodes, "ntasks_per_node": 1,
                              "signal_delay_s": launch.signal_delay_s, "stderr_to_stdout": False,
                              "setup": [pythonpath_setup(), *launch.setup],
                              "additional_parameters": parse_sbatch_options(launch.sbatch)}
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if launch.cpus_per_task:
        params["cpus_per_task"] = launch.cpus_per_task
    for key in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            params[key] = getattr(launch, key)
    if launch.exclusive:
        params["exclusive"] = True
    params.update(kwargs)
    if params.get("cpus_per_task"):  # Slurm >= 22.05: srun no longer inherits the job's --cpus-per-task
        params["srun_args"] = [*params.get("srun_args", []), "--cpus-per-task", str(params["cpus_per_task"])]
    return params

def pythonpath_setup() -> str:
    """Lets the job's python unpickle jobs.* even when the package is not installed."""
    return f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"

def stage_resources(cfg: Config, stage: str) -> tuple[int, int, int]:
    """(nodes, processes per node, GPUs per node to request) of a stage's job; NPUs: npu_gres_request."""
    if not STAGES[stage].torchrun:
        return 1, 1, 0
    nproc = cfg.launch.gpus_per_node
    return cfg.launch.nodes, nproc, nproc if cfg.train.device in ("auto", "cuda") else 0

def npu_gres_request(cfg: Config, stage: str) -> dict[str, str]:
    """The sbatch option asking for a node's NPUs (--device npu; Slurm knows them as a generic resource)."""
    if not STAGES[stage].torchrun or cfg.train.device != "npu":
        return {}
    return {"gres": f"{cfg.launch.npu_gres}:{cfg.launch.gpus_per_node}"}

def default_cpus(cfg: Config, stage: str) -> int | None:
    """CPUs a node task needs (the stage table's ``cpus``): one per process and per loader worker (train, eval:
    processes per node x (workers + 1)), or per prep writer thread (--workers) and the reading thread; download,
    report: the scheduler's default."""
    _, nproc, _ = stage_resources(cfg, stage)  # prep: one process
    return None if STAGES[stage].cpus == "default" else nproc * (cfg.data.workers + 1)

def executor_parameters(executor: str, cfg: Config, stage: str, after: str | None = None,
                        node_cpus: int | None = None, when: str = "afterok") -> dict[str, Any]:
    """The parameters of one stage's job for the chosen executor; ``after`` is the job (or ``:``-joined jobs) it
    waits for, ``when`` how (afterok: their success, afterany: their end), ``node_cpus`` the most a node of the
    partition has (the default CPU request is capped there)."""
    nodes, nproc, gpus = stage_resources(cfg, stage)
    if executor != "slurm":
        return {"timeout_min": cfg.launch.time, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": gpus,
                "signal_delay_s": cfg.launch.signal_delay_s, "setup": [pythonpath_setup(), *cfg.launch.setup]}
    extra: dict[str, Any] = {"job_name": f"{cfg.launch.job_name}-{stage}"}
    wanted = None if cfg.launch.cpus_per_task else default_cpus(cfg, stage)
    if wanted:
        extra["cpus_per_task"] = min(wanted, node_cpus or wanted)
    params = get_slurm_executor_parameters(cfg.launch, nodes=nodes, gpus_per_node=gpus, **extra)
    params["additional_parameters"] = {**params["additional_parameters"], **npu_gres_request(cfg, stage)}
    if after:
        params["dependency"] = f"{when}:{after}"
        params["additional_parameters"] = {**params["additional_parameters"], "kill-on-invalid-dep": "yes"}
    return params

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

def make_executor(executor: str, cfg: Config, params: dict[str, Any]) -> Any:
    import submitit

    private_jobs_root(cfg)
    folder = job_folder(cfg)
    if executor == "slurm":
        ex: Any = submitit.SlurmExecutor(folder, max_num_timeout=cfg.launch.max_requeues)
    elif executor == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=cfg.launch.max_requeues)
    else:
        ex = submitit.DebugExecutor(folder)
    ex.update_parameters(**params)
    return ex

def sbatch_script(cfg: Config, params: dict[str, Any], array_size: int | None = None) -> str:
    """The script sbatch receives: the text submitit's SlurmExecutor writes, rendered without Slurm through its
    private ``_make_sbatch_string`` (setup.cfg pins the submitit range it is known in); with another submitit, a
    plain script asking for the same resources. ``array_size``: a job array of that many tasks (a sweep's)."""
    folder = job_folder(cfg)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(folder)}"
    array = {"map_count": array_size} if array_size and array_size > 1 else {}
    try:
        from submitit.slurm.slurm import _make_sbatch_string
    except ImportError:
        return plain_sbatch_script(command, {**params, **array})
    return _make_sbatch_string(command=command, folder=folder, **params, **array)


def plain_sbatch_script(command: str, params: dict[str, Any]) -> str:
    """#SBATCH lines from submitit's parameter names (``gpus_per_node`` is ``--gpus-per-node``), the setup lines,
    then srun; ``map_count`` tasks of an array, at most ``array_parallelism`` at once."""
    special = {"setup", "additional_parameters", "srun_args", "signal_delay_s", "stderr_to_stdout", "map_count",
               "array_parallelism"}
    options = {key.replace("_", "-"): value for key, value in params.items() if key not in special}
    options.update(params.get("additional_parameters", {}), signal=f"USR2@{params.get('signal_delay_s', 90)}")
    if params.get("map_count"):
        options["array"] = f"0-{params['map_count'] - 1}%{params.get('array_parallelism', 256)}"
    lines = ["#!/bin/bash"] + [f"#SBATCH --{key}" + ("" if value is True else f"={value}")
                               for key, value in sorted(options.items())]
    return "\n".join([*lines, *params.get("setup", []), shlex.join(["srun", *params.get("srun_args", [])]) + " " + command])
