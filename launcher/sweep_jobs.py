"""Running a checked sweep (launcher/sweep.py makes its points): the points' run dirs and sweep.json in the sweep
dir, then one report of them all in ``<sweep dir>/report/``.

On a queued scheduler (Slurm) the points become job arrays through submitit's ``executor.batch()``: one array per set
of points that ask for the same resources (``--sweep nodes=1,2`` makes two), each with ``--array=0-N%P`` where P is
``--array-parallelism`` (0: all at once); a set of one point is a plain job. A report job waits for every array
to end (``afterany``, so a failed point leaves the others' table), and the launcher follows it unless --detach.
The arrays' logs go to ``<sweep dir>/logs/<array id>_<task>/`` (a plain job's to ``<job id>/``), each point's
torchrun logs to its own run dir. Locally the points run one after another, a failed one does not stop the rest,
and the report follows.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TextIO

from jobs.stages import ReportJob, check_inputs, stage_job
from launcher.backends import Backend, queued_names, queued_titles
from launcher.dry_run import dry_run, node_command
from launcher.executors import LaunchError, stage_resources
from launcher.follow import StageFailed, Submitted, all_results_exist, follow, node_failures
from launcher.submit import print_log_paths, run_chain, submit
from pipeline.core.config import Config
from pipeline.core.records import SWEEP_FILE, read_sweep_points, write_json


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """One checked point: its name, swept values, resolved config and run dir."""

    name: str
    values: dict[str, str]
    cfg: Config

    @property
    def run_dir(self) -> str:
        return self.cfg.train.run_dir


@dataclasses.dataclass(frozen=True)
class JobArray:
    """Points with the same scheduler parameters: one job array."""

    plans: list[SweepPlan]
    params: dict[str, Any]  # submitit's, the throttle included
    cfg: Config  # the first point's, with the sweep dir as run dir: the array's logs go there

    @property
    def names(self) -> str:
        return ", ".join(plan.name for plan in self.plans)

    @property
    def what(self) -> str:
        """How it is submitted: one point is a plain job (submitit's batch() sends no array for one)."""
        if len(self.plans) == 1:
            return f"one job, 1 point ({self.names})"
        throttle = self.params["array_parallelism"]
        return f"a job array, {len(self.plans)} points ({self.names}), at most {throttle} at once"


def sweep_dir_config(cfg: Config) -> Config:
    """``cfg`` with the sweep dir as its run dir: the folder of the arrays' and the report's job logs."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(Path(cfg.train.run_dir).parent)))


def job_arrays(plans: Sequence[SweepPlan], backend: Backend) -> list[JobArray]:
    """The points grouped by their train job's scheduler parameters, in the order of their first point."""
    groups: dict[str, JobArray] = {}
    for plan in plans:  # the sweep dir as run dir: what the job is given of its folders (--container binds them)
        # is the same for all its points
        cfg = sweep_dir_config(plan.cfg)
        params = backend.parameters(cfg, "train", node_cpus=backend.cpu_cap(cfg, "train"))
        key = repr((sorted(params.items()), plan.cfg.launch.max_requeues))  # the executor's, not a job option
        if key not in groups:
            groups[key] = JobArray([], params, cfg)
        groups[key].plans.append(plan)
    for group in groups.values():
        group.params["array_parallelism"] = min(group.cfg.launch.array_parallelism or len(group.plans),
                                                len(group.plans))
    return list(groups.values())


def run_sweep(plans: Sequence[SweepPlan], backend: Backend, out: TextIO) -> int:
    """List the points, then dry-run, submit them as job arrays, or run them here; the report closes the sweep."""
    sweep_dir = Path(plans[0].run_dir).parent
    launch = plans[0].cfg.launch
    out.write(f"sweep: {len(plans)} point(s)\n" + "".join(f"  {plan.name}: {plan.run_dir}\n" for plan in plans))
    if launch.detach and not backend.queued:
        raise LaunchError(f"--detach with a sweep needs {queued_titles()}: the {backend.name} executor runs the "
                          f"points one after another here; drop --detach, or use --executor {queued_names()}")
    if launch.dry_run:
        dry_run_sweep(plans, backend, out)
        return 0
    for plan in plans:
        check_inputs(["train"], plan.cfg, [plan.run_dir])
    if backend.queued:
        arrays = job_arrays(plans, backend)
        for array in arrays:
            backend.check_cluster(array.cfg)
        for array in arrays:
            backend.request_warnings(array.plans[0].cfg, ["train"], out)
            backend.check_job(array.cfg, "train", array.params, len(array.plans))
        write_manifest(sweep_dir, plans)
        return submit_arrays(arrays, sweep_dir, backend, out)
    write_manifest(sweep_dir, plans)
    return run_in_turn(plans, sweep_dir, backend, out)


def write_manifest(sweep_dir: Path, plans: Sequence[SweepPlan]) -> None:
    """sweep.json: the points of this sweep after those of earlier ones into the same dir (a rerun adds values)."""
    earlier = read_sweep_points(sweep_dir, LaunchError) or []
    names = {plan.name for plan in plans}
    points = [point for point in earlier if point["name"] not in names]
    points += [{"name": plan.name, "values": plan.values} for plan in plans]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / SWEEP_FILE, {"points": points})


def submit_arrays(arrays: Sequence[JobArray], sweep_dir: Path, backend: Backend, out: TextIO) -> int:
    """Every array, then the report job after them all; following the report unless --detach."""
    submitted: list[str] = []
    tasks: list[tuple[SweepPlan, Any]] = []
    try:
        for array in arrays:
            array_id, jobs = submit_array(array, backend, out)
            submitted.append(array_id)
            tasks += zip(array.plans, jobs)
        report_cfg = arrays[0].cfg
        report = submit(backend, report_cfg, "report", ReportJob([str(sweep_dir)]), ":".join(submitted), out,
                        when="afterany")
    except LaunchError:
        backend.cancel(submitted)
        raise
    out.write(f"    cancel: {backend.cancel_hint([*submitted, report.job.job_id])}\n"
              f"the report job writes {sweep_dir / 'report'}/ when every point has ended\n")
    if report_cfg.launch.detach:
        out.write("detached: the jobs run on; follow them with the tail -f lines above\n")
        return 0
    report_failed = None
    try:
        follow(report, out)
    except StageFailed as exc:
        report_failed = str(exc)
    failed = [f"{plan.name} (job {job.job_id}: {why})" for plan, job in tasks if (why := point_failure(job, backend))]
    return finish(sweep_dir, len(tasks), failed, out, report_failed)


def point_failure(job: Any, backend: Backend) -> str | None:
    """Why a point's ended job failed, None when every node left a result without an error. Results are read
    first: Slurm forgets a job MinJobAge (300 s by default) after its end, long before a sweep's report runs."""
    sub = Submitted("train", job, backend.name)
    if all_results_exist(sub):
        failures = node_failures(sub)
        return failures[0].splitlines()[0][:300] if failures else None
    info = backend.state(job.job_id)
    return f"{info.state}, no result" if info else "no result: killed, or its node was lost"


def submit_array(array: JobArray, backend: Backend, out: TextIO) -> tuple[str, list[Any]]:
    """(the array's job id, its submitit jobs: ``<id>_<task>``, or the one plain job)."""
    jobs = backend.submit_array(array.cfg, array.params, [stage_job("train", plan.cfg, [plan.run_dir])
                                                          for plan in array.plans],
                                f"train job array of {array.names}")
    nodes, nproc, _ = stage_resources(array.plans[0].cfg, "train")
    array_id = jobs[0].job_id.split("_")[0]
    kind = "job array" if len(jobs) > 1 else "job"
    out.write(f"[train] {kind} {array_id} submitted ({backend.name}, {array.what}; each {nodes} node(s) x {nproc} "
              "process(es))\n")
    for plan, job in zip(array.plans, jobs):
        out.write(f"  {plan.name}: job {job.job_id}\n")
        print_log_paths(Submitted("train", job, backend.name), out)
    return array_id, jobs


def run_in_turn(plans: Sequence[SweepPlan], sweep_dir: Path, backend: Backend, out: TextIO) -> int:
    """The points one after another on this machine (a failed one is reported, the rest still run), then the
    report."""
    failed = []
    for plan in plans:
        out.write(f"===== sweep point {plan.name} =====\n")
        try:
            run_chain(plan.cfg, ["train"], [plan.run_dir], backend, out)
        except StageFailed as exc:
            out.write(f"sweep point {plan.name} failed:\n{exc}\n")
            failed.append(plan.name)
    out.write("===== sweep report =====\n")  # also when every point failed here: earlier ones may have records
    report_failed = None
    try:
        run_chain(sweep_dir_config(plans[0].cfg), ["report"], [str(sweep_dir)], backend, out)
    except StageFailed as exc:
        report_failed = str(exc)
    return finish(sweep_dir, len(plans), failed, out, report_failed)


def finish(sweep_dir: Path, count: int, failed: Sequence[str], out: TextIO, report_failed: str | None) -> int:
    """0 when every point and the report succeeded, else StageFailed naming what failed."""
    points = (f"{len(failed)} of {count} sweep point(s) failed: {', '.join(failed)} (their logs say why; rerunning "
              "the same command resumes them)") if failed else ""
    if report_failed:
        raise StageFailed("\n".join(filter(None, [points, f"the sweep's report failed, {sweep_dir / 'report'} is not "
                                                          f"up to date: {report_failed}"])))
    if failed:
        raise StageFailed(f"{points}; the report in {sweep_dir / 'report'} holds the points with records")
    out.write(f"sweep finished: {count} point(s); report in {sweep_dir / 'report'}\n")
    return 0


def dry_run_sweep(plans: Sequence[SweepPlan], backend: Backend, out: TextIO) -> None:
    """What a real sweep submits: on a queued scheduler each array's script and the report job's; here the first
    point's."""
    if not backend.queued:
        out.write(f"===== the first point, {plans[0].name} (the points run one after another, then the report "
                  "of them all) =====\n")
        dry_run(plans[0].cfg, ["train"], [plans[0].run_dir], backend, out)
        return
    arrays = job_arrays(plans, backend)
    for i, array in enumerate(arrays, 1):
        out.write(f"===== train {i} of {len(arrays)}: {array.what}; {backend.script_name} =====\n")
        out.write(backend.script(array.cfg, array.params, len(array.plans)) + "\n")
        out.write(f"===== each point of train {i} runs its torchrun on each node; the first: =====\n"
                  f"{node_command(array.plans[0].cfg, 'train')}\n")
    ids = ":".join(f"<train {i} job id>" for i in range(1, len(arrays) + 1))
    report_cfg = arrays[0].cfg
    out.write(f"===== report of the sweep into {report_cfg.train.run_dir}/report/: {backend.script_name} =====\n")
    out.write(backend.script(report_cfg, backend.parameters(report_cfg, "report", after=ids, when="afterany")) + "\n")
    out.write("dry run: nothing was submitted\n")
