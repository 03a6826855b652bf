"""The one command line: download, prep, train, eval and report as submitit jobs, on Slurm, here, or in-process.

    python launch.py --stage all --config configs/demo.toml --executor local \\
        --archive-dir A --data-dir D --run-dir R
    python launch.py --stage train --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 --run-dir runs/r50
    python launch.py --stage train --nodes 4 --gpus-per-node 8 --executor slurm --dry-run
    python launch.py --stage report --run-dir runs/r50-1node runs/r50-2nodes
    python launch.py --stage train --sweep model=resnet18,resnet50 --sweep nodes=1,2 --run-dir runs/sweep

Every config field is a flag; precedence: command line > --config file > defaults (pipeline.core.config).
Executors, one backend each in launcher/backends/: slurm (a chain's jobs wait on each other with afterok and
kill_on_invalid_dep), local (this machine, stages one after the other), debug (in this process, for pdb);
auto = slurm where sbatch is on PATH, else local. Each job keeps its sbatch script, logs per task, the config its
processes read and torchrun's logs per node and rank in <run dir>/logs/<job id>/.

Before anything is submitted the resolved config passes pipeline.core.validate (each job runs it again): bad input
is one line and status 2, with its traceback only under --debug.
Executors and their parameters are built by the backends only, and --dry-run (launcher/dry_run.py) prints
them; launcher/submit.py submits and follows a chain, launcher/sweep_jobs.py a --sweep (job arrays on Slurm).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence, TextIO

from jobs.stages import check_inputs, stage_chain
from launcher import backends, sweep_jobs
from launcher.backends import Backend
from launcher.container import check_image
from launcher.dry_run import dry_run
from launcher.executors import LaunchError
from launcher.follow import StageFailed
from launcher.submit import run_chain
from launcher.sweep import add_sweep_arguments, sweep_points
from launcher.sweep_jobs import SweepPlan
from pipeline.core.config import (LAUNCH_SECTIONS, Config, LaunchConfig, add_config_arguments, build_config,
                                  flag_values, read_toml)
from pipeline.core.errors import UserError
from pipeline.core.records import CONFIG_FILE
from pipeline.core.stages import STAGES
from pipeline.core.validate import check_run_dirs, validate


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
                             "sweep dir stands for its points (one report of them in the sweep dir)")
    add_sweep_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, bad input included")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """The resolved config with absolute paths (jobs may start elsewhere), and the run dirs."""
    run_dirs = getattr(args, "run_dirs", None)
    if run_dirs:
        if len(run_dirs) > 1 and (args.stage not in STAGES or STAGES[args.stage].door_reads != "run_dirs"):
            raise LaunchError(f"{len(run_dirs)} run dirs given: several --run-dir values are for --stage report")
        args.run_dir = run_dirs[0]
    cfg = build_config(*config_layers(args))
    absolute = {"data_dir": cfg.data.data_dir, "archive_dir": cfg.prep.archive_dir, "run_dir": cfg.train.run_dir}
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, data_dir=str(Path(absolute["data_dir"]).absolute())),
        prep=dataclasses.replace(cfg.prep, archive_dir=str(Path(absolute["archive_dir"]).absolute())),
        train=dataclasses.replace(cfg.train, run_dir=str(Path(absolute["run_dir"]).absolute())),
        eval=dataclasses.replace(cfg.eval, checkpoint=_absolute_if_file(cfg.eval.checkpoint)),
        model=dataclasses.replace(cfg.model, pretrained=_absolute_if_file(cfg.model.pretrained)),
        launch=dataclasses.replace(cfg.launch, container=_absolute_if_file(cfg.launch.container)))
    return cfg, [str(Path(d).absolute()) for d in (run_dirs or [cfg.train.run_dir])]


def config_layers(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any], str]:
    """(file layer, command-line layer, the file's name for errors).

    Without --config, eval and report read the run dir's resolved config.toml, so they see the data dir, crops
    and precision the run trained with; its [launch] and [slurm] tables are left out (how to run this job, --detach or
    --nodes, is this command's business)."""
    cli = flag_values(args)
    if args.config:
        return read_toml(args.config), cli, str(args.config)
    run_config = Path(getattr(args, "run_dir", "")) / CONFIG_FILE
    if args.stage in STAGES and STAGES[args.stage].run_config and getattr(args, "run_dir", None) and \
            run_config.is_file():
        tables = read_toml(run_config)
        return ({section: table for section, table in tables.items() if section not in LAUNCH_SECTIONS}, cli,
                str(run_config))
    return None, cli, "config"


def _absolute_if_file(path: str) -> str:
    return str(Path(path).absolute()) if path and Path(path).exists() else path


def check_launch(launch: LaunchConfig, stages: list[str], backend: Backend) -> None:
    """What the chosen executor cannot do; the values themselves are checked by pipeline.core.validate."""
    if launch.nodes > 1 and not backend.queued and any(STAGES[s].torchrun for s in stages):
        raise LaunchError(f"--nodes {launch.nodes} needs {backends.queued_titles()}: the {backend.name} executor runs "
                          f"on this machine only. Use --procs-per-node N for N processes here, or --executor "
                          f"{backends.queued_names()}")
    if launch.detach and not backend.queued and len(stages) > 1:
        raise LaunchError(f"--detach with the {backend.name} executor runs one stage only (a chain waits on each "
                          f"stage here); use --executor {backends.queued_names()}, or drop --detach")


def run_sweep(args: argparse.Namespace, out: TextIO) -> int:
    """Every point of --sweep resolved and checked before any is submitted (launcher/sweep_jobs.py runs them)."""
    plans = []
    for point in sweep_points(args, out):
        try:
            cfg, run_dirs = resolve_config(point.args)
            validate(cfg, ["train"])
            check_run_dirs(run_dirs)
        except UserError as exc:
            raise LaunchError(f"sweep point {point.name}: {exc}") from None
        plans.append(SweepPlan(point.name, point.values, cfg))
    backend = backends.choose(plans[0].cfg.launch.executor, out)
    for plan in plans:
        check_launch(plan.cfg.launch, ["train"], backend)
        backends.check_options(plan.cfg)
        check_image(plan.cfg)
    return sweep_jobs.run_sweep(plans, backend, out)


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
        check_run_dirs(run_dirs)
        backend = backends.choose(cfg.launch.executor, out)
        check_launch(cfg.launch, stages, backend)
        backends.check_options(cfg)
        check_image(cfg)
        if cfg.launch.dry_run:
            dry_run(cfg, stages, run_dirs, backend, out)
            return 0
        check_inputs(stages, cfg, run_dirs)
        return run_chain(cfg, stages, run_dirs, backend, out)
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
