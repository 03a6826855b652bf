"""Submitting stages: each script checked by Slurm first, a chain of jobs that wait on each other, and following
them to their end (launcher/follow.py); a failed stage cancels the jobs after it."""
from __future__ import annotations

from typing import Any, Callable, TextIO

from jobs.stages import stage_job
from launcher import slurm
from launcher.dry_run import cpu_warnings, partition_cpus
from launcher.executors import (LaunchError, executor_parameters, make_executor, sbatch_script, seal_job_inputs,
                                stage_resources)
from launcher.follow import StageFailed, Submitted, follow
from pipeline.core.config import Config
from pipeline.core.stages import STAGES

WAITS = {"afterok": "succeeds", "afterany": "ends"}


def validate_on_slurm(cfg: Config, stages: list[str], node_cpus: int | None) -> None:
    """Every stage's script passes ``sbatch --test-only`` before the first is submitted."""
    for stage in stages:
        check_script(cfg, stage, sbatch_script(cfg, executor_parameters("slurm", cfg, stage, node_cpus=node_cpus)))


def check_script(cfg: Config, stage: str, script: str) -> None:
    """``sbatch --test-only`` of one job's script; a refusal is a LaunchError with Slurm's words and a hint."""
    try:
        slurm.test_only(script)
    except slurm.SlurmError as exc:
        hint = "; on a cluster without GPUs pass --device cpu" if "gres" in str(exc).lower() else ""
        if STAGES[stage].cpus == "workers" and not cfg.launch.cpus_per_task:
            hint += f"; the prep job asks for --workers + 1 = {cfg.data.workers + 1} CPUs: lower --workers"
        raise LaunchError(f"Slurm rejects the {stage} job, nothing was submitted: {exc}{hint}") from None


def submit(executor: str, cfg: Config, stage: str, fn: Callable[[], Any], after: str | None, out: TextIO,
           node_cpus: int | None = None, when: str = "afterok") -> Submitted:
    """One stage's job; ``after``: the job id(s) it waits for, ``when``: afterok or afterany."""
    from submitit.core.utils import FailedJobError

    params = executor_parameters(executor, cfg, stage, after, node_cpus, when)
    try:
        job = make_executor(executor, cfg, params).submit(fn)
    except FailedJobError as exc:
        raise LaunchError(f"sbatch rejected the {stage} job: {exc}") from None
    seal_job_inputs([job])
    sub = Submitted(stage, job, executor)
    nodes, nproc, _ = stage_resources(cfg, stage)
    waits = f", starts after job {after.replace(':', ', ')} {WAITS[when]}" if after else ""
    out.write(f"[{stage}] job {job.job_id} submitted ({executor}, {nodes} node(s) x {nproc} process(es){waits})\n")
    if executor != "debug":
        print_log_paths(sub, out)
    return sub


def print_log_paths(sub: Submitted, out: TextIO) -> None:
    out.write(f"    logs: {sub.log_paths()[0].parent}/\n"
              f"    follow: tail -f {' '.join(map(str, sub.log_paths()))}\n")


def run_chain(cfg: Config, stages: list[str], run_dirs: list[str], executor: str, out: TextIO) -> int:
    plan = [(stage, stage_job(stage, cfg, run_dirs)) for stage in stages]
    submitted: list[Submitted] = []
    if executor == "slurm":
        slurm.check_partition(cfg.launch.partition)
        node_cpus = partition_cpus(cfg, executor)
        cpu_warnings(cfg, stages, node_cpus, out)
        validate_on_slurm(cfg, stages, node_cpus)
        try:
            for stage, fn in plan:
                after = submitted[-1].job.job_id if submitted else None
                submitted.append(submit(executor, cfg, stage, fn, after, out, node_cpus))
        except LaunchError:
            slurm.cancel([s.job.job_id for s in submitted])
            raise
        out.write(f"    cancel: scancel {' '.join(s.job.job_id for s in submitted)}\n")
    if cfg.launch.detach:
        if executor != "slurm":
            submitted.append(submit(executor, cfg, *plan[0], None, out))
        out.write("detached: the jobs run on; follow them with the tail -f lines above\n")
        return 0
    for i, (stage, fn) in enumerate(plan):
        sub = submitted[i] if executor == "slurm" else submit(executor, cfg, stage, fn, None, out)
        try:
            follow(sub, out, poll_s=2.0 if executor == "slurm" else 0.25)  # local: no scheduler to spare
        except StageFailed as exc:
            if i == len(plan) - 1:
                raise
            rest = [s.job.job_id for s in submitted[i + 1:]]
            slurm.cancel(rest)
            raise StageFailed(f"{exc}\nlater stages not run{f' (cancelled jobs {rest})' if rest else ''}") from None
        out.write(f"[{sub.label}] done\n")
    out.write(f"finished: {' -> '.join(stages)}; run dir {cfg.train.run_dir}\n")
    return 0
