"""The one command line: download, prep, train, eval and report as submitit jobs, on Slurm, here, or in-process.

    python launch.py --stage all --config configs/demo.toml --executor local \\
        --archive-dir A --data-dir D --run-dir R
    python launch.py --stage train --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 --run-dir runs/r50
    python launch.py --stage train --nodes 4 --gpus-per-node 8 --executor slurm --dry-run
    python launch.py --stage report --run-dir runs/r50-1node runs/r50-2nodes
    python launch.py --stage train --sweep model=resnet18,resnet50 --sweep nodes=1,2 --run-dir runs/sweep

Every config field is a flag; precedence: command line > --config file > defaults (pipeline.core.config).
Executors: slurm (a chain's jobs wait on each other with afterok and kill_on_invalid_dep), local (this
machine, stages one after the other), debug (in this process, for pdb); auto = slurm where sbatch is on
PATH, else local. Each job keeps its sbatch script, logs per task, the config its processes read and
torchrun's logs per node and rank in <run dir>/logs/<job id>/.

Before anything is submitted the resolved config passes pipeline.core.validate (each job runs it again): bad input
is one line and status 2, with its traceback only under --debug.
Executors and sbatch parameters are built in launcher/executors.py only, and --dry-run (launcher/dry_run.py) prints them.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from jobs.stages import STAGES, TORCHRUN_STAGES, check_inputs, stage_chain, stage_job
from launcher import slurm
from launcher.dry_run import cpu_warnings, dry_run, partition_cpus
from launcher.executors import (LaunchError, executor_parameters, make_executor, parse_sbatch_options, sbatch_script,
                                stage_resources)
from launcher.follow import StageFailed, Submitted, follow
from launcher.sweep import add_sweep_arguments, expand_run_dirs, sweep_points
from pipeline.core.config import FIELDS, Config, LaunchConfig, add_config_arguments, build_config, read_toml
from pipeline.core.errors import UserError
from pipeline.core.records import CONFIG_FILE
from pipeline.core.validate import check_text, validate


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help, conflict_handler="resolve",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    stage = parser.add_mutually_exclusive_group(required=True)
    stage.add_argument("--stage", choices=[*STAGES, "all"],
                       help="what to run; all = prep, train, eval, report as a chain of jobs, from download when "
                            "--url or --url-file gives links")
    stage.add_argument("--test-only", dest="stage", action="store_const", const="eval",
                       help="--stage eval (torchvision's reference spelling)")
    parser.add_argument("--run-dir", dest="run_dirs", nargs="+", metavar="RUN_DIR", default=argparse.SUPPRESS,
                        help="run dir (config: [train] run_dir); several only with --stage report, where a "
                             "sweep dir stands for the run dirs in it")
    add_sweep_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, bad input included")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """The resolved config with absolute paths (jobs may start elsewhere), and the run dirs."""
    run_dirs = getattr(args, "run_dirs", None)
    if run_dirs and args.stage == "report":
        run_dirs = expand_run_dirs(run_dirs)
    if run_dirs:
        if len(run_dirs) > 1 and args.stage != "report":
            raise LaunchError(f"{len(run_dirs)} run dirs given: several --run-dir values are for --stage report")
        args.run_dir = run_dirs[0]
    cfg = build_config(*config_layers(args))
    absolute = {"data_dir": cfg.data.data_dir, "archive_dir": cfg.prep.archive_dir, "run_dir": cfg.train.run_dir}
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, data_dir=str(Path(absolute["data_dir"]).absolute())),
        prep=dataclasses.replace(cfg.prep, archive_dir=str(Path(absolute["archive_dir"]).absolute())),
        train=dataclasses.replace(cfg.train, run_dir=str(Path(absolute["run_dir"]).absolute())),
        eval=dataclasses.replace(cfg.eval, checkpoint=_absolute_if_file(cfg.eval.checkpoint)),
        model=dataclasses.replace(cfg.model, pretrained=_absolute_if_file(cfg.model.pretrained)))
    return cfg, [str(Path(d).absolute()) for d in (run_dirs or [cfg.train.run_dir])]


def config_layers(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any], str]:
    """(file layer, command-line layer, the file's name for errors).

    Without --config, eval and report read the run dir's resolved config.toml, so they see the data dir, crops
    and precision the run trained with; its [launch] table is left out (how to run this job, --detach or
    --nodes, is this command's business)."""
    cli = {name: value for name, value in vars(args).items() if name in FIELDS}
    if args.config:
        return read_toml(args.config), cli, str(args.config)
    run_config = Path(getattr(args, "run_dir", "")) / CONFIG_FILE
    if args.stage in ("eval", "report") and getattr(args, "run_dir", None) and run_config.is_file():
        tables = read_toml(run_config)
        return {section: table for section, table in tables.items() if section != "launch"}, cli, str(run_config)
    return None, cli, "config"


def _absolute_if_file(path: str) -> str:
    return str(Path(path).absolute()) if path and Path(path).exists() else path


def choose_executor(requested: str, out: TextIO) -> str:
    if requested != "auto":
        return requested
    sbatch = shutil.which("sbatch")
    choice = "slurm" if sbatch else "local"
    out.write(f"executor: {choice} ({f'sbatch at {sbatch}' if sbatch else 'no sbatch on PATH'}; "
              "--executor slurm|local|debug picks another)\n")
    return choice


def check_launch(launch: LaunchConfig, stages: list[str], executor: str) -> None:
    """What the chosen executor cannot do; the values themselves are checked by pipeline.core.validate."""
    if launch.nodes > 1 and executor != "slurm" and any(s in TORCHRUN_STAGES for s in stages):
        raise LaunchError(f"--nodes {launch.nodes} needs Slurm: the {executor} executor runs on this machine only. "
                          f"Use --procs-per-node N for N processes here, or --executor slurm")
    if launch.detach and executor != "slurm" and len(stages) > 1:
        raise LaunchError(f"--detach with the {executor} executor runs one stage only (a chain waits on each "
                          "stage here); use --executor slurm, or drop --detach")


































def validate_on_slurm(cfg: Config, stages: list[str], node_cpus: int | None) -> None:
    """Every stage's script passes ``sbatch --test-only`` before the first is submitted."""
    for stage in stages:
        try:
            slurm.test_only(sbatch_script(cfg, executor_parameters("slurm", cfg, stage, node_cpus=node_cpus)))
        except slurm.SlurmError as exc:
            hint = "; on a cluster without GPUs pass --device cpu" if "gres" in str(exc).lower() else ""
            if stage == "prep" and not cfg.launch.cpus_per_task:
                hint += f"; the prep job asks for --workers + 1 = {cfg.data.workers + 1} CPUs: lower --workers"
            raise LaunchError(f"Slurm rejects the {stage} job, nothing was submitted: {exc}{hint}") from None


def submit(executor: str, cfg: Config, stage: str, fn: Callable[[], Any], after: str | None, out: TextIO,
           node_cpus: int | None = None) -> Submitted:
    from submitit.core.utils import FailedJobError

    try:
        job = make_executor(executor, cfg, executor_parameters(executor, cfg, stage, after, node_cpus)).submit(fn)
    except FailedJobError as exc:
        raise LaunchError(f"sbatch rejected the {stage} job: {exc}") from None
    sub = Submitted(stage, job, executor)
    nodes, nproc, _ = stage_resources(cfg, stage)
    waits = f", starts after job {after} succeeds" if after else ""
    out.write(f"[{stage}] job {job.job_id} submitted ({executor}, {nodes} node(s) x {nproc} process(es){waits})\n")
    if executor != "debug":
        out.write(f"    logs: {sub.log_paths()[0].parent}/\n"
                  f"    follow: tail -f {' '.join(map(str, sub.log_paths()))}\n")
    return sub


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


def run_sweep(args: argparse.Namespace, out: TextIO) -> int:
    """Every point of --sweep checked first, then trained: one after another here, as separate jobs on Slurm."""
    plans = []
    for name, point in sweep_points(args):
        try:
            cfg, run_dirs = resolve_config(point)
            validate(cfg, ["train"])
            check_text("--run-dir", run_dirs[0])
        except UserError as exc:
            raise LaunchError(f"sweep point {name}: {exc}") from None
        plans.append((name, cfg, run_dirs))
    executor = choose_executor(plans[0][1].launch.executor, out)
    for _, cfg, _ in plans:
        check_launch(cfg.launch, ["train"], executor)
        parse_sbatch_options(cfg.launch.sbatch)
    out.write(f"sweep: {len(plans)} point(s)\n")
    out.write("".join(f"  {name}: {run_dirs[0]}\n" for name, _, run_dirs in plans))
    if plans[0][1].launch.dry_run:
        out.write(f"===== the first point, {plans[0][0]} =====\n")
        dry_run(plans[0][1], ["train"], plans[0][2], executor, out)
        return 0
    for _, cfg, run_dirs in plans:
        check_inputs(["train"], cfg, run_dirs)
    if executor == "slurm":  # all submitted, none waited for
        slurm.check_partition(plans[0][1].launch.partition)
        for _, cfg, _ in plans:
            validate_on_slurm(cfg, ["train"], partition_cpus(cfg, executor))
        plans = [(name, dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, detach=True)), run_dirs)
                 for name, cfg, run_dirs in plans]
    for name, cfg, run_dirs in plans:
        out.write(f"===== sweep point {name} =====\n")
        run_chain(cfg, ["train"], run_dirs, executor, out)
    out.write(f"sweep finished: {len(plans)} run dir(s) in {args.run_dirs[0]}; tables: launch.py --stage report "
              f"--run-dir {args.run_dirs[0]}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    out = sys.stdout
    try:
        if args.sweeps:
            return run_sweep(args, out)
        cfg, run_dirs = resolve_config(args)
        stages = stage_chain(args.stage, cfg)
        validate(cfg, stages)
        for run_dir in run_dirs:
            check_text("--run-dir", run_dir)
        executor = choose_executor(cfg.launch.executor, out)
        check_launch(cfg.launch, stages, executor)
        parse_sbatch_options(cfg.launch.sbatch)
        if cfg.launch.dry_run:
            dry_run(cfg, stages, run_dirs, executor, out)
            return 0
        check_inputs(stages, cfg, run_dirs)
        return run_chain(cfg, stages, run_dirs, executor, out)
    except UserError as exc:
        out.flush()
        if args.debug:
            traceback.print_exc()
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        out.flush()
        if args.debug:
            traceback.print_exc()
        print(f"launch.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("launch.py: interrupted; submitted Slurm jobs keep running (scancel them by id), local ones stop",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
