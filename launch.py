"""The one command line: download, prep, train, eval and report as submitit jobs, on Slurm, here, or in-process.

    python launch.py --stage all --config configs/demo.toml --executor local \\
        --archive-dir A --data-dir D --run-dir R
    python launch.py --stage train --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 --run-dir runs/r50
    python launch.py --stage train --nodes 4 --gpus-per-node 8 --executor slurm --dry-run
    python launch.py --stage report --run-dir runs/r50-1node runs/r50-2nodes

Every config field is a flag; precedence: command line > --config file > defaults (pipeline.config).
Executors: slurm (a chain's jobs wait on each other with afterok and kill_on_invalid_dep), local (this
machine, stages one after the other), debug (in this process, for pdb); auto = slurm where sbatch is on
PATH, else local. Each job keeps its sbatch script, logs per task, the config its processes read and
torchrun's logs per node and rank in <run dir>/logs/<job id>/.

Before anything is submitted the resolved config passes pipeline.validate (each job runs it again): bad input
is one line and status 2, with its traceback only under --debug.
This module is the only place that builds executors and sbatch parameters.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from jobs import slurm
from jobs.follow import StageFailed, Submitted, follow
from jobs.stages import STAGES, TORCHRUN_STAGES, StageInputError, check_inputs, stage_chain, stage_job
from jobs.torchrun import REPO_ROOT, STAGE_MODULES, torchrun_command
from pipeline.config import FIELDS, Config, ConfigError, LaunchConfig, add_config_arguments, build_config, read_toml
from pipeline.records import CONFIG_FILE
from pipeline.validate import check_text, validate

SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
OWN_FLAGS = {"nodes": "--nodes", "gpus-per-node": "--gpus-per-node", "cpus-per-task": "--cpus-per-task",
             "mem": "--mem", "time": "--time", "partition": "--partition", "account": "--account", "qos": "--qos",
             "constraint": "--constraint", "exclusive": "--exclusive", "job-name": "--job-name",
             "signal": "--signal-delay-s"}
SET_BY_LAUNCHER = {"ntasks-per-node", "output", "error", "dependency", "array", "open-mode"}
PLACEHOLDER = re.compile(r"(\$(?:NODE_RANK|MASTER_ADDR|MASTER_PORT|JOB_ID|RESTARTS))")  # filled in by the job


class LaunchError(RuntimeError):
    """Input the launcher cannot act on; the message says what to do instead."""


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
                        help="run dir (config: [train] run_dir); several only with --stage report")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, bad input included")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """The resolved config with absolute paths (jobs may start elsewhere), and the run dirs."""
    run_dirs = getattr(args, "run_dirs", None)
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
    """What the chosen executor cannot do; the values themselves are checked by pipeline.validate."""
    if launch.nodes > 1 and executor != "slurm" and any(s in TORCHRUN_STAGES for s in stages):
        raise LaunchError(f"--nodes {launch.nodes} needs Slurm: the {executor} executor runs on this machine only. "
                          f"Use --procs-per-node N for N processes here, or --executor slurm")
    if launch.detach and executor != "slurm" and len(stages) > 1:
        raise LaunchError(f"--detach with the {executor} executor runs one stage only (a chain waits on each "
                          "stage here); use --executor slurm, or drop --detach")


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
    if stage not in TORCHRUN_STAGES:
        return 1, 1, 0
    nproc = cfg.launch.gpus_per_node
    return cfg.launch.nodes, nproc, nproc if cfg.train.device in ("auto", "cuda") else 0


def npu_gres_request(cfg: Config, stage: str) -> dict[str, str]:
    """The sbatch option asking for a node's NPUs (--device npu; Slurm knows them as a generic resource)."""
    if stage not in TORCHRUN_STAGES or cfg.train.device != "npu":
        return {}
    return {"gres": f"{cfg.launch.npu_gres}:{cfg.launch.gpus_per_node}"}


def default_cpus(cfg: Config, stage: str) -> int | None:
    """CPUs a node task needs: one per process and per loader worker (train, eval: processes per node x
    (workers + 1)), or per prep writer thread (--workers) and the reading thread; download, report: Slurm's
    default."""
    _, nproc, _ = stage_resources(cfg, stage)  # prep: one process
    return None if stage in ("download", "report") else nproc * (cfg.data.workers + 1)


def executor_parameters(executor: str, cfg: Config, stage: str, after: str | None = None,
                        node_cpus: int | None = None) -> dict[str, Any]:
    """The parameters of one stage's job for the chosen executor; ``after`` is the job it waits for, ``node_cpus``
    the most a node of the partition has (the default CPU request is capped there)."""
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
        params["dependency"] = f"afterok:{after}"
        params["additional_parameters"] = {**params["additional_parameters"], "kill-on-invalid-dep": "yes"}
    return params


def job_folder(cfg: Config) -> str:
    return str(Path(cfg.train.run_dir) / "logs" / "%j")


def make_executor(executor: str, cfg: Config, params: dict[str, Any]) -> Any:
    import submitit

    folder = job_folder(cfg)
    if executor == "slurm":
        ex: Any = submitit.SlurmExecutor(folder, max_num_timeout=cfg.launch.max_requeues)
    elif executor == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=cfg.launch.max_requeues)
    else:
        ex = submitit.DebugExecutor(folder)
    ex.update_parameters(**params)
    return ex


def sbatch_script(cfg: Config, params: dict[str, Any]) -> str:
    """The script sbatch receives: the same text submitit's SlurmExecutor writes, rendered without Slurm."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = job_folder(cfg)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(folder)}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def node_command(cfg: Config, stage: str) -> str:
    """The torchrun command of each node, with the values the job fills in as shell-style placeholders."""
    nodes, nproc, _ = stage_resources(cfg, stage)
    job_dir = f"{cfg.train.run_dir}/logs/$JOB_ID"
    cmd = torchrun_command(nnodes=nodes, nproc_per_node=nproc, node_rank="$NODE_RANK", master_addr="$MASTER_ADDR",
                           master_port="$MASTER_PORT", run_id="$JOB_ID-$RESTARTS",
                           max_restarts=cfg.launch.max_restarts, log_dir=f"{job_dir}/node$NODE_RANK",
                           module=STAGE_MODULES[stage], args=["--config", f"{job_dir}/{stage}_config.toml"])
    return " ".join(shell_word(arg) for arg in cmd)


def shell_word(arg: str) -> str:
    """``arg`` quoted for a shell, but for the job's placeholders, left to expand (they are never followed by a
    letter, digit or underscore here)."""
    return "".join(part if PLACEHOLDER.fullmatch(part) else shlex.quote(part)
                   for part in PLACEHOLDER.split(arg) if part) or "''"


PLACEHOLDERS = ("NODE_RANK: 0..N-1 ($SLURM_NODEID); MASTER_ADDR: first host of the allocation; MASTER_PORT: "
                "20000 + (job id x 16 + 2 x restarts) mod 12000 on several nodes, a free port on one; "
                "JOB_ID, RESTARTS: the Slurm job id and requeue count")


def cpu_warnings(cfg: Config, stages: list[str], node_cpus: int | None, out: TextIO) -> None:
    """Say where the default CPU request is more than the partition's nodes have (the request is capped)."""
    for stage in stages:
        wanted = None if cfg.launch.cpus_per_task else default_cpus(cfg, stage)
        if wanted and node_cpus and wanted > node_cpus:
            how = ("processes per node x (--workers + 1)" if stage in TORCHRUN_STAGES else "--workers + 1")
            out.write(f"warning: the {stage} job would ask for {wanted} CPUs per node ({how}) but the nodes of "
                      f"partition {cfg.launch.partition or '(default)'} have at most {node_cpus}; it asks for "
                      f"{node_cpus} and its loader workers share them (--workers or --cpus-per-task sets this)\n")


def partition_cpus(cfg: Config, executor: str) -> int | None:
    """CPUs of the partition's largest node, when they matter and Slurm answers."""
    needed = executor == "slurm" and not cfg.launch.cpus_per_task
    return slurm.node_cpus(cfg.launch.partition) if needed else None


def dry_run(cfg: Config, stages: list[str], run_dirs: list[str], executor: str, out: TextIO) -> None:
    node_cpus = partition_cpus(cfg, executor)
    cpu_warnings(cfg, stages, node_cpus, out)
    for i, stage in enumerate(stages):
        after = f"<{stages[i - 1]} job id>" if i and executor == "slurm" else None
        params = executor_parameters(executor, cfg, stage, after, node_cpus)
        if executor == "slurm":
            out.write(f"===== {stage}: sbatch script (saved as {job_folder(cfg)}/%j_submission.sh) =====\n")
            out.write(sbatch_script(cfg, params) + "\n")
        else:
            out.write(f"===== {stage}: {executor} executor on this machine, parameters {params} =====\n")
        if stage not in TORCHRUN_STAGES:
            door = {"download": "download.fetch(cfg)", "prep": "prep.prepare(cfg)"}.get(stage,
                                                                                      "report.report(run_dirs)")
            out.write(f"===== {stage}: the job's one process runs pipeline.{door} =====\n")
            continue
        nodes, nproc, _ = stage_resources(cfg, stage)
        out.write(f"===== {stage}: each of the {nodes} node(s) runs one torchrun =====\n"
                  f"{node_command(cfg, stage)}\n  {PLACEHOLDERS}\n")
        if stage == "train":
            out.write("  training resumes from the newest valid checkpoint in the run dir (resume = auto)\n")
            if nodes * nproc > 1 and cfg.launch.preflight_timeout_s:
                out.write("  each training process first runs the pre-flight (jobs.preflight, asked for through "
                          f"$JOBS_PREFLIGHT_DIR): an all-reduce over all {nodes * nproc} ranks, bounded by "
                          f"{cfg.launch.preflight_timeout_s} s\n")
    try:
        check_inputs(stages, cfg, run_dirs)
    except StageInputError as exc:
        out.write(f"warning: a real launch would stop here: {exc}\n")
    out.write("dry run: nothing was submitted\n")


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    out = sys.stdout
    try:
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
    except (LaunchError, ConfigError, StageInputError, slurm.SlurmError) as exc:
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
