"""Submitting stages through a backend (launcher/backends/): on a queued scheduler each job's script is checked
first and the chain is submitted at once, each job waiting on the one before; here the stages run one after
another. Either way the launcher follows them to their end (launcher/follow.py); a failed stage cancels the jobs
after it."""
from __future__ import annotations

from typing import Any, Callable, Sequence, TextIO

from jobs.stages import stage_job
from launcher.backends import Backend
from launcher.executors import LaunchError, stage_resources
from launcher.follow import StageFailed, Submitted, follow
from pipeline.core.config import Config

WAITS = {"afterok": "succeeds", "afterany": "ends"}


def submit(backend: Backend, cfg: Config, stage: str, fn: Callable[[], Any], after: str | None, out: TextIO,
           node_cpus: int | None = None, when: str = "afterok", run_dirs: Sequence[str] = ()) -> Submitted:
    """One stage's job; ``after``: the job id(s) it waits for, ``when``: afterok or afterany."""
    job = backend.submit(cfg, stage, fn, after=after, when=when, node_cpus=node_cpus, run_dirs=run_dirs)
    sub = Submitted(stage, job, backend.name)
    nodes, nproc, _ = stage_resources(cfg, stage)
    waits = f", starts after job {after.replace(':', ', ')} {WAITS[when]}" if after else ""
    out.write(f"[{stage}] job {job.job_id} submitted ({backend.name}, {nodes} node(s) x {nproc} process(es)"
              f"{waits})\n")
    if not backend.in_process:
        print_log_paths(sub, out)
    return sub


def print_log_paths(sub: Submitted, out: TextIO) -> None:
    out.write(f"    logs: {sub.log_paths()[0].parent}/\n"
              f"    follow: tail -f {' '.join(map(str, sub.log_paths()))}\n")


def submit_chain(backend: Backend, cfg: Config, plan: list[tuple[str, Callable[[], Any]]], out: TextIO,
                 run_dirs: Sequence[str] = ()) -> list[Submitted]:
    """Every stage's job at once, each waiting on the one before, after the scheduler has accepted each script;
    a refusal cancels the jobs already submitted."""
    backend.check_cluster(cfg)
    stages = [stage for stage, _ in plan]
    backend.request_warnings(cfg, stages, out)
    for stage in stages:
        backend.check_job(cfg, stage, backend.parameters(cfg, stage, node_cpus=backend.cpu_cap(cfg, stage),
                                                         run_dirs=run_dirs))
    submitted: list[Submitted] = []
    try:
        for stage, fn in plan:
            after = submitted[-1].job.job_id if submitted else None
            submitted.append(submit(backend, cfg, stage, fn, after, out, backend.cpu_cap(cfg, stage),
                                    run_dirs=run_dirs))
    except LaunchError:
        backend.cancel([s.job.job_id for s in submitted])
        raise
    out.write(f"    cancel: {backend.cancel_hint([s.job.job_id for s in submitted])}\n")
    return submitted


def run_chain(cfg: Config, stages: list[str], run_dirs: list[str], backend: Backend, out: TextIO) -> int:
    plan = [(stage, stage_job(stage, cfg, run_dirs)) for stage in stages]
    submitted = submit_chain(backend, cfg, plan, out, run_dirs) if backend.queued else []
    if cfg.launch.detach:
        if not backend.queued:
            submitted.append(submit(backend, cfg, *plan[0], None, out, run_dirs=run_dirs))
        out.write("detached: the jobs run on; follow them with the tail -f lines above\n")
        return 0
    for i, (stage, fn) in enumerate(plan):
        sub = submitted[i] if backend.queued else submit(backend, cfg, stage, fn, None, out, run_dirs=run_dirs)
        try:
            follow(sub, out, poll_s=backend.poll_s)
        except StageFailed as exc:
            if i == len(plan) - 1:
                raise
            rest = [s.job.job_id for s in submitted[i + 1:]]
            backend.cancel(rest)
            raise StageFailed(f"{exc}\nlater stages not run{f' (cancelled jobs {rest})' if rest else ''}") from None
        out.write(f"[{sub.label}] done\n")
    out.write(f"finished: {' -> '.join(stages)}; run dir {cfg.train.run_dir}\n")
    return 0
