"""``launch.py --dry-run``: every job's sbatch script (or local parameters) and the torchrun command each node
runs, built by the code a real submission uses; nothing is submitted."""
from __future__ import annotations

import re
import shlex
from typing import TextIO

from jobs.stages import StageInputError, check_inputs
from jobs.torchrun import torchrun_command
from launcher.backends import Backend
from launcher.executors import stage_resources
from pipeline.core.config import Config
from pipeline.core.stages import DATA_DIR, STAGES

PLACEHOLDER = re.compile(r"(\$(?:NODE_RANK|MASTER_ADDR|MASTER_PORT|JOB_ID|RESTARTS))")  # filled in by the job

def node_command(cfg: Config, stage: str) -> str:
    """The torchrun command of each node, with the values the job fills in as shell-style placeholders."""
    nodes, nproc, _ = stage_resources(cfg, stage)
    job_dir = f"{cfg.train.run_dir}/logs/$JOB_ID"
    cmd = torchrun_command(nnodes=nodes, nproc_per_node=nproc, node_rank="$NODE_RANK", master_addr="$MASTER_ADDR",
                           master_port="$MASTER_PORT", run_id="$JOB_ID-$RESTARTS",
                           max_restarts=cfg.launch.max_restarts, log_dir=f"{job_dir}/node$NODE_RANK",
                           module=STAGES[stage].entry, args=["--config", f"{job_dir}/{stage}_config.toml"])
    return " ".join(shell_word(arg) for arg in cmd)

def shell_word(arg: str) -> str:
    """``arg`` quoted for a shell, but for the job's placeholders, left to expand (they are never followed by a
    letter, digit or underscore here)."""
    return "".join(part if PLACEHOLDER.fullmatch(part) else shlex.quote(part)
                   for part in PLACEHOLDER.split(arg) if part) or "''"

PLACEHOLDERS = ("NODE_RANK: 0..N-1 ($SLURM_NODEID); MASTER_ADDR: first host of the allocation; MASTER_PORT: "
                "20000 + (job id x 16 + 2 x restarts) mod 12000 on several nodes (on one node torchrun binds a port "
                "itself, localhost:0); JOB_ID, RESTARTS: the Slurm job id and requeue count (one node adds a "
                "random suffix to the run id)")

DATA_STAGES = {"prep": "writes", "train": "reads", "eval": "reads"}  # stage: what it does with the data dir


def dry_run(cfg: Config, stages: list[str], run_dirs: list[str], backend: Backend, out: TextIO) -> None:
    backend.request_warnings(cfg, stages, out)
    for i, stage in enumerate(stages):
        after = f"<{stages[i - 1]} job id>" if i and backend.queued else None
        params = backend.parameters(cfg, stage, after=after, node_cpus=backend.cpu_cap(cfg, stage),
                                    run_dirs=run_dirs)
        out.write(backend.render(cfg, stage, params) + backend.request_text(cfg, stage, params))
        row = STAGES[stage]
        if stage in DATA_STAGES:
            out.write(f"===== {stage}: {DATA_STAGES[stage]} the {cfg.data.layout!r} layout in {cfg.data.data_dir} "
                      "(--layout) =====\n")
        if not row.torchrun:
            out.write(f"===== {stage}: the job's one process runs {row.door_text()} =====\n")
            continue
        nodes, nproc, _ = stage_resources(cfg, stage)
        if cfg.data.stage_data_to and DATA_DIR in row.reads:
            from pipeline.data.staging import describe  # imports torch (through dir_lock): only when shown

            out.write(f"===== {stage}: {describe(cfg.data.data_dir, cfg.data.stage_data_to)} =====\n")
        out.write(f"===== {stage}: each of the {nodes} node(s) runs one torchrun =====\n"
                  f"{node_command(cfg, stage)}\n  {PLACEHOLDERS}\n")
        if cfg.launch.container:
            out.write(f"  inside {cfg.launch.container}, where python is the image's python3\n")
        if row.on_preemption == "save":
            out.write("  training resumes from the newest valid checkpoint in the run dir (resume = auto)\n"
                      if cfg.train.resume in ("", "auto") else
                      f"  training starts from {cfg.train.resume}; a requeue resumes from the run's own newest "
                      "checkpoint once the job has saved one\n")
            if nodes * nproc > 1 and cfg.launch.preflight_timeout_s:
                out.write("  each training process first runs the pre-flight (jobs.preflight, asked for through "
                          f"$JOBS_PREFLIGHT_DIR): an all-reduce over all {nodes * nproc} ranks, bounded by "
                          f"{cfg.launch.preflight_timeout_s} s; hosts it names are left out of a requeue "
                          f"(jobs/leave_out.py), at most {cfg.launch.max_excluded_hosts} (--max-excluded-hosts)\n")
    try:
        check_inputs(stages, cfg, run_dirs)
    except StageInputError as exc:
        out.write(f"warning: a real launch would stop here: {exc}\n")
    out.write("dry run: nothing was submitted\n")
