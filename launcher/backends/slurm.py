"""Slurm: submitit's SlurmExecutor, sbatch parameters from the config's [slurm] table, and what the launcher asks
Slurm, with a time bound on every call and no use of accounting (sacct).

``get_slurm_executor_parameters`` returns a dict and takes overrides (dinov2's ``get_slurm_executor_parameters``
shape); ``SlurmBackend.parameters`` adds what one stage needs (nodes, accelerators, CPUs, the job it waits for).
Clusters without accounting exist (the CI one is one of them): there ``sacct`` fails and submitit cannot
tell a cancelled job from a running one. Job state comes from ``scontrol show job`` (which keeps finished
jobs for MinJobAge) and ``squeue`` instead.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from typing import Any, Sequence, TextIO

from launcher.backends import register
from launcher.backends.base import Backend, JobInfo
from launcher.container import job_python, runtime_setup
from launcher.executors import (LaunchError, default_cpus, job_folder, own_request, setup_lines, stage_request,
                                stage_resources)
from pipeline.core.config import Config
from pipeline.core.errors import UserError
from pipeline.core.stages import STAGES
from pipeline.core.threads import threads_per_process

CALL_TIMEOUT_S = 60
SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
OWN_FLAGS = {"nodes": "--nodes", "gpus-per-node": "--gpus-per-node", "cpus-per-task": "--cpus-per-task",
             "mem": "--mem", "time": "--time", "partition": "--partition", "account": "--account", "qos": "--qos",
             "constraint": "--constraint", "exclusive": "--exclusive", "job-name": "--job-name",
             "signal": "--signal-delay-s"}
SET_BY_LAUNCHER = {"ntasks-per-node", "output", "error", "dependency", "array", "open-mode"}


class SlurmError(UserError, RuntimeError):
    """Slurm refused a request or cannot be reached; the message carries Slurm's own words."""


@register
class SlurmBackend(Backend):
    name, title = "slurm", "Slurm"
    queued, auto, order, poll_s = True, True, 10, 2.0
    script_name = "sbatch script"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        sbatch = shutil.which("sbatch")
        return bool(sbatch), f"sbatch at {sbatch}" if sbatch else "no sbatch on PATH"

    def __init__(self) -> None:
        self._node_cpus: dict[str, int | None] = {}  # partition -> its largest node's CPUs

    def check_options(self, cfg: Config) -> None:
        parse_sbatch_options(cfg.slurm.sbatch)

    def parameters(self, cfg: Config, stage: str, *, after: str | None = None, when: str = "afterok",
                   node_cpus: int | None = None, run_dirs: Sequence[str] = ()) -> dict[str, Any]:
        nodes, _, gpus = stage_resources(cfg, stage)
        request = stage_request(cfg, stage)
        extra: dict[str, Any] = {"job_name": f"{cfg.launch.job_name}-{stage}", "time": request.time}
        wanted = request.cpus or default_cpus(cfg, stage)
        if wanted:
            extra["cpus_per_task"] = request.cpus or min(wanted, node_cpus or wanted)
        extra.update({"mem": request.mem} if request.mem else {})
        extra.update({"partition": self.partition(cfg, stage)} if self.partition(cfg, stage) else {})
        params = get_slurm_executor_parameters(cfg, nodes=nodes, gpus_per_node=gpus, **extra)
        params["additional_parameters"] = {**params["additional_parameters"], **npu_gres_request(cfg, stage)}
        if cfg.launch.container:
            params.update(python=job_python(cfg, stage, run_dirs=run_dirs),
                          setup=[*params["setup"], *runtime_setup(cfg)])
        if after:
            params["dependency"] = f"{when}:{after}"
            params["additional_parameters"] = {**params["additional_parameters"], "kill-on-invalid-dep": "yes"}
        return params

    def make_executor(self, folder: str, cfg: Config, python: str | None = None) -> Any:
        import submitit

        return submitit.SlurmExecutor(folder, max_num_timeout=cfg.launch.max_requeues, python=python)

    def script(self, cfg: Config, params: dict[str, Any], array_size: int | None = None) -> str:
        return sbatch_script(cfg, params, array_size)

    def render(self, cfg: Config, stage: str, params: dict[str, Any]) -> str:
        return (f"===== {stage}: sbatch script (saved as {job_folder(cfg)}/%j_submission.sh) =====\n"
                f"{self.script(cfg, params)}\n")

    def partition(self, cfg: Config, stage: str) -> str:
        """[launch.<stage>] partition, else [slurm] partition."""
        return own_request(cfg, stage).partition or cfg.slurm.partition

    def node_cpus(self, cfg: Config, stage: str) -> int | None:
        partition = self.partition(cfg, stage)
        if partition not in self._node_cpus:
            self._node_cpus[partition] = node_cpus(partition)
        return self._node_cpus[partition]

    def request_warnings(self, cfg: Config, stages: Sequence[str], out: TextIO) -> None:
        for stage in stages:
            wanted = None if stage_request(cfg, stage).cpus else default_cpus(cfg, stage)
            most = self.node_cpus(cfg, stage) if wanted else None
            if wanted and most and wanted > most:
                how = ("processes per node x (--workers + 1)" if STAGES[stage].cpus == "processes" else
                       "--workers + 1")
                out.write(f"warning: the {stage} job would ask for {wanted} CPUs per node ({how}) but the nodes of "
                          f"partition {self.partition(cfg, stage) or '(default)'} have at most {most}; it asks for "
                          f"{most} and its loader workers share them (--workers or --cpus-per-task sets this)\n")
        cpu_note(cfg, stages, out)
        gpu_stages = [stage for stage in stages if stage_resources(cfg, stage).gpus_per_node]
        shared = [stage for stage in stages if not stage_resources(cfg, stage).gpus_per_node and cfg.slurm.partition
                  and not own_request(cfg, stage).partition]
        if gpu_stages and shared:
            flags = ", ".join(f"--{stage}-partition" for stage in shared)
            jobs = f"the {' and '.join(shared)} job{'s ask' if len(shared) > 1 else ' asks'}"
            out.write(f"note: {jobs} for no GPU but queue{'s' if len(shared) == 1 else ''} in partition "
                      f"{cfg.slurm.partition} with the {gpu_stages[0]} job; {flags} NAME send them to a CPU "
                      "partition\n")

    def check_cluster(self, cfg: Config) -> None:
        check_partition(cfg.slurm.partition)

    def check_job(self, cfg: Config, stage: str, params: dict[str, Any], array_size: int | None = None) -> None:
        """The stage's partition exists and ``sbatch --test-only`` of its script passes; a refusal is a LaunchError
        with Slurm's words and a hint."""
        check_partition(self.partition(cfg, stage))
        try:
            test_only(self.script(cfg, params, array_size))
        except SlurmError as exc:
            hint = "; on a cluster without GPUs pass --device cpu" if "gres" in str(exc).lower() else ""
            if STAGES[stage].cpus == "workers" and not stage_request(cfg, stage).cpus:
                hint += f"; the {stage} job asks for --workers + 1 = {cfg.data.workers + 1} CPUs: lower --workers"
            raise LaunchError(f"Slurm rejects the {stage} job, nothing was submitted: {exc}{hint}") from None

    def state(self, job_id: str) -> JobInfo | None:
        return job_info(job_id)

    def cancel(self, job_ids: Sequence[str]) -> None:
        cancel(job_ids)

    def cancel_hint(self, job_ids: Sequence[str]) -> str:
        return f"scancel {' '.join(job_ids)}"


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


def cpu_note(cfg: Config, stages: Sequence[str], out: TextIO) -> None:
    """--device cpu without --cpus-per-task: the default request (a CPU per process and per loader worker) leaves
    each process 1 intra-op thread; say so and how to give more. A note, not a bigger default: a whole node per CPU
    run is much to take unasked on a shared cluster, and its size is unknown where sinfo does not answer."""
    shown = [stage for stage in stages if STAGES[stage].torchrun and cfg.train.device == "cpu"
             and not stage_request(cfg, stage).cpus]
    if shown:
        nproc, workers = stage_resources(cfg, shown[0]).procs_per_node, cfg.data.workers
        cpus = default_cpus(cfg, shown[0]) or 0
        jobs = f"the {' and '.join(shown)} job{'s ask' if len(shown) > 1 else ' asks'}"
        out.write(f"note: --device cpu: {jobs} for {cpus} CPUs per node ({nproc} process(es) x (--workers {workers} "
                  f"+ 1)), which leaves each process {threads_per_process(cpus, nproc, workers)} intra-op "
                  f"thread(s); --cpus-per-task N asks for N and gives each N // {nproc} - {workers}\n")


def get_slurm_executor_parameters(cfg: Config, *, nodes: int, gpus_per_node: int, **kwargs: Any) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one task per node, [launch]'s resources and [slurm]'s options;
    ``kwargs`` override anything."""
    launch, slurm = cfg.launch, cfg.slurm
    params: dict[str, Any] = {"job_name": launch.job_name, "time": launch.time, "nodes": nodes, "ntasks_per_node": 1,
                              "signal_delay_s": launch.signal_delay_s, "stderr_to_stdout": False,
                              "setup": setup_lines(cfg), "additional_parameters": parse_sbatch_options(slurm.sbatch)}
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if launch.cpus_per_task:
        params["cpus_per_task"] = launch.cpus_per_task
    if launch.mem:
        params["mem"] = launch.mem
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(slurm, key):
            params[key] = getattr(slurm, key)
    if slurm.exclusive:
        params["exclusive"] = True
    params.update(kwargs)
    if params.get("cpus_per_task"):  # Slurm >= 22.05: srun no longer inherits the job's --cpus-per-task
        params["srun_args"] = [*params.get("srun_args", []), "--cpus-per-task", str(params["cpus_per_task"])]
    # one task per node holds all its CPUs: "cores" gives it a mask of its allocated cores (a fat mask, which
    # srun's manual asks for multithreaded tasks), inherited by torchrun, its processes and their loader workers
    params["srun_args"] = [*params.get("srun_args", []), "--cpu-bind", "cores" if slurm.cpu_bind else "none"]
    return params


def npu_gres_request(cfg: Config, stage: str) -> dict[str, str]:
    """The sbatch option asking for a node's NPUs (--device npu; Slurm knows them as a generic resource)."""
    if not STAGES[stage].torchrun or cfg.train.device != "npu":
        return {}
    return {"gres": f"{cfg.slurm.npu_gres}:{cfg.launch.gpus_per_node}"}


def sbatch_script(cfg: Config, params: dict[str, Any], array_size: int | None = None) -> str:
    """The script sbatch receives: the text submitit's SlurmExecutor writes, rendered without Slurm through its
    private ``_make_sbatch_string`` (setup.cfg pins the submitit range it is known in); with another submitit, a
    plain script asking for the same resources. ``array_size``: a job array of that many tasks (a sweep's)."""
    folder = job_folder(cfg)
    params = dict(params)
    python = params.pop("python", None) or shlex.quote(sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(folder)}"
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
    srun = shlex.join(["srun", *params.get("srun_args", [])])
    return "\n".join([*lines, *params.get("setup", []), f"{srun} {command}"])


def call(args: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run a Slurm client command; a missing binary or a hang becomes a SlurmError."""
    try:
        return subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} is not on PATH: this machine has no Slurm client; use --executor local") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(args)}` did not answer within {CALL_TIMEOUT_S} s; is slurmctld up?") from None


def partitions() -> list[str]:
    """Partitions of the cluster; raises SlurmError when the controller cannot be reached."""
    result = call(["sinfo", "-h", "-o", "%P"])
    if result.returncode != 0:
        raise SlurmError(f"cannot reach the Slurm controller (sinfo: {result.stderr.strip()}); "
                         "check SLURM_CONF, or use --executor local")
    return [p.strip().rstrip("*") for p in result.stdout.split()]


def check_partition(name: str) -> None:
    known = partitions()
    if name and name not in known:
        raise SlurmError(f"partition {name!r} does not exist on this cluster; known partitions: {known}")


def node_cpus(partition: str) -> int | None:
    """CPUs of the largest node of ``partition`` (of the default partition when empty); None when sinfo cannot say
    (a dry run works without Slurm)."""
    try:
        result = call(["sinfo", "-h", "-o", "%P %c", *(["-p", partition] if partition else [])])
    except SlurmError:
        return None
    rows = [line.split() for line in result.stdout.splitlines() if len(line.split()) == 2]
    if not partition:  # the default partition is marked with a *
        rows = [row for row in rows if row[0].endswith("*")] or rows
    counts = [int(found.group()) for _, cpus in rows if (found := re.match(r"\d+", cpus))]
    return max(counts) if result.returncode == 0 and counts else None


def test_only(script: str) -> str:
    """Let sbatch validate a script without submitting it (``--test-only``); returns Slurm's estimate."""
    result = call(["sbatch", "--test-only"], stdin=script)
    if result.returncode != 0:
        raise SlurmError(result.stderr.strip() or result.stdout.strip())
    return result.stderr.strip()


def job_info(job_id: str) -> JobInfo | None:
    """State of a job from scontrol, else squeue; None when Slurm no longer knows the job."""
    result = call(["scontrol", "show", "job", "-o", job_id])
    if result.returncode == 0 and "JobState=" in result.stdout:
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout.splitlines()[0]))
        return JobInfo(state=fields["JobState"], reason=fields.get("Reason", ""), nodes=fields.get("NodeList", ""),
                       restarts=int(fields.get("Restarts", "0") or 0), exit_code=fields.get("ExitCode", ""))
    result = call(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r|%N"])
    line = result.stdout.strip().splitlines()[:1] if result.returncode == 0 else []
    if not line:
        return None
    state, reason, nodes = (line[0].split("|") + ["", ""])[:3]
    return JobInfo(state=state, reason=reason, nodes=nodes)


def cancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        call(["scancel", *job_ids])
