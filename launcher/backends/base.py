"""The one interface of a scheduler: what the launcher asks of Slurm, of this machine, or of the next cluster.

submitit stays the engine underneath: a backend makes a submitit executor with its parameters (``parameters``
returns submitit's dict, the resources included, and takes the job a chain's next job waits for), renders a job
for ``--dry-run``, submits a job or an array (a sweep), says a queued job's state and cancels jobs. What a
running job learns about itself is on the job side (jobs/job_env.py). A new scheduler is one module in this
folder with a subclass registered by ``@register`` (launcher/backends/__init__.py), and its tests.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Sequence, TextIO

from launcher.executors import (LaunchError, job_folder, private_jobs_root, seal_job_inputs, stage_request,
                                stage_resources)
from pipeline.core.config import Config

# A job's states, in Slurm's words; another scheduler maps its own onto them.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


@dataclasses.dataclass(frozen=True)
class JobInfo:
    state: str
    reason: str = ""
    nodes: str = ""
    restarts: int = 0
    exit_code: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def dependency_failed(self) -> bool:
        """A pending job whose parent failed (cancelled by kill_on_invalid_dep, or waiting forever without it)."""
        return self.state == "PENDING" and self.reason == "DependencyNeverSatisfied"


class Backend(abc.ABC):
    """One scheduler behind submitit. ``queued``: jobs wait in the scheduler's queue, so a chain is submitted at
    once with each job waiting on the one before (a failure cancels the rest), --detach leaves them running, a job
    may span nodes and a sweep becomes job arrays; otherwise the launcher runs the stages one after another on
    this machine. ``in_process``: the job runs inside the launcher's process (for pdb)."""

    name: ClassVar[str]
    title: ClassVar[str]  # in messages: "Slurm"
    queued: ClassVar[bool] = False
    in_process: ClassVar[bool] = False
    order: ClassVar[int] = 50  # place in listings; ``auto`` tries the ones with ``auto`` set in this order
    auto: ClassVar[bool] = False
    poll_s: ClassVar[float] = 0.25  # between looks at a running job
    script_name: ClassVar[str] = "parameters"  # what ``script`` renders, for the dry run's headings

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(whether ``auto`` may pick this one, why, in a few words)."""
        return True, ""

    def check_options(self, cfg: Config) -> None:
        """Refuse this scheduler's own options (its config table) that cannot work, whichever backend runs."""

    @abc.abstractmethod
    def parameters(self, cfg: Config, stage: str, *, after: str | None = None, when: str = "afterok",
                   node_cpus: int | None = None, run_dirs: Sequence[str] = ()) -> dict[str, Any]:
        """submitit's parameters of one stage's job: what it asks for; ``after`` is the job (or ``:``-joined jobs)
        it waits for, ``when`` how (afterok: their success, afterany: their end), ``node_cpus`` the most a node
        has (a default CPU request is capped there), ``run_dirs`` the run dirs it is given (--container binds them)."""

    @abc.abstractmethod
    def make_executor(self, folder: str, cfg: Config, python: str | None = None) -> Any:
        """The bare submitit executor writing its files into ``folder``; ``python``: the command that starts the
        job's python (--container's runtime and image), None: this interpreter."""

    def executor(self, cfg: Config, params: dict[str, Any]) -> Any:
        """The executor of a job with ``params`` (their ``python``, if any, is the executor's, not a parameter)."""
        private_jobs_root(cfg)
        params = dict(params)
        ex = self.make_executor(job_folder(cfg), cfg, params.pop("python", None))
        ex.update_parameters(**params)
        return ex

    def script(self, cfg: Config, params: dict[str, Any], array_size: int | None = None) -> str:
        """What the scheduler receives for one job (an array of ``array_size`` tasks), shown by --dry-run."""
        return str(params)

    def render(self, cfg: Config, stage: str, params: dict[str, Any]) -> str:
        """One stage's job as the dry run shows it, heading included."""
        return f"===== {stage}: {self.name} executor on this machine, parameters {self.script(cfg, params)} =====\n"

    def node_cpus(self, cfg: Config, stage: str) -> int | None:
        """The most CPUs a node the stage's job may land on has, where the scheduler says; None: no cap."""
        return None

    def cpu_cap(self, cfg: Config, stage: str) -> int | None:
        """The cap of the stage's default CPU request (``node_cpus``); None when its CPUs are given."""
        return None if stage_request(cfg, stage).cpus else self.node_cpus(cfg, stage)

    def request_warnings(self, cfg: Config, stages: Sequence[str], out: TextIO) -> None:
        """Say where a default CPU request is more than the nodes have (the request is capped), or a stage could
        ask elsewhere."""

    def partition(self, cfg: Config, stage: str) -> str:
        """Where the stage's job queues, in the scheduler's words; empty: its default."""
        return ""

    def request_text(self, cfg: Config, stage: str, params: dict[str, Any]) -> str:
        """One line of what the stage's job asks for, for the dry run."""
        nodes, nproc, gpus = stage_resources(cfg, stage)
        request = stage_request(cfg, stage)
        cpus = params.get("cpus_per_task")
        where = self.partition(cfg, stage) or "(default)"
        parts = [f"{nodes} node(s) x {nproc} process(es)", f"{gpus} GPU(s) per node" if gpus else "no GPUs",
                 f"{cpus} CPUs per node" if cpus else "the scheduler's default CPUs", f"{request.time} min",
                 f"memory {request.mem}" if request.mem else "", f"partition {where}" if self.queued else ""]
        return f"  {stage} asks for: {', '.join(part for part in parts if part)}\n"

    def check_cluster(self, cfg: Config) -> None:
        """Before anything is submitted: the scheduler answers and knows where ``cfg`` sends the jobs."""

    def check_job(self, cfg: Config, stage: str, params: dict[str, Any], array_size: int | None = None) -> None:
        """Before anything is submitted: the scheduler would accept this job (LaunchError otherwise)."""

    def submit(self, cfg: Config, stage: str, fn: Callable[[], Any], *, after: str | None = None,
               when: str = "afterok", node_cpus: int | None = None, run_dirs: Sequence[str] = ()) -> Any:
        """One stage's job (a submitit Job); a refusal is a LaunchError."""
        from submitit.core.utils import FailedJobError

        params = self.parameters(cfg, stage, after=after, when=when, node_cpus=node_cpus, run_dirs=run_dirs)
        try:
            job = self.executor(cfg, params).submit(fn)
        except FailedJobError as exc:
            raise LaunchError(f"{self.title} rejected the {stage} job: {exc}") from None
        seal_job_inputs([job])
        return job

    def submit_array(self, cfg: Config, params: dict[str, Any], fns: Sequence[Callable[[], Any]],
                     what: str) -> list[Any]:
        """One job array of ``fns`` (a sweep's points) with the same ``params``; a single one is a plain job."""
        from submitit.core.utils import FailedJobError

        executor = self.executor(cfg, params)
        try:
            with executor.batch():
                jobs = [executor.submit(fn) for fn in fns]
        except FailedJobError as exc:
            raise LaunchError(f"{self.title} rejected the {what}: {exc}") from None
        seal_job_inputs(jobs)
        return jobs

    def state(self, job_id: str) -> JobInfo | None:
        """A queued job's state; None when the scheduler no longer knows it."""
        return None

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel queued jobs (a chain's later stages after a failure)."""

    def cancel_hint(self, job_ids: Sequence[str]) -> str:
        """The command that cancels ``job_ids`` by hand."""
        return ""
