"""--container IMAGE: every process of a job inside an Apptainer (or Singularity) image.

A job's command is submitit's ``python -u -m submitit.core._submit FOLDER``, which srun starts on every node; with
a container its ``python`` is the image's, under the runtime::

    $CONTAINER_RUNTIME exec --nv --bind REPO,RUN_DIR,DATA_DIR,ARCHIVE_DIR IMAGE python3 -u -m submitit.core._submit ...

so submitit, torchrun, every training process and its loader workers run in the image, which must hold torch,
torchvision, submitit and tomli_w (the repo itself is bound and on PYTHONPATH). ``--nv`` where the job asks for
GPUs; Ascend's driver and control devices bound for --device npu (the runtime mounts /dev/davinci<N> with /dev).
Also bound: the report's other run dirs, the folder of a --checkpoint, --resume or --pretrained file, and for a
stage that stages, --stage-data-to: its ``$VARIABLES`` are left to the batch script's shell (srun hands its
environment to every task, so the processes expand them alike), and each task makes that folder before the runtime
starts (``/bin/sh -c 'mkdir -p -- "$1" && shift && exec "$@"' stage-data-to DEST RUNTIME exec ...``).
The login node only writes the command: on Slurm the job's shell finds the runtime (apptainer, else singularity,
on the node's PATH), so the login node needs none; the local executor runs here and looks for it now.
"""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Sequence

from jobs.torchrun import REPO_ROOT
from launcher.executors import LaunchError, stage_resources
from pipeline.core.config import Config
from pipeline.core.stages import CHECKPOINT, DATA_DIR, PRETRAINED, RESUME, STAGES
from pipeline.core.validate import VARIABLE, check_bind_path

RUNTIMES = ("apptainer", "singularity")  # --container-runtime auto tries them in this order
RUNTIME_VAR = "CONTAINER_RUNTIME"  # set by the job's setup line where the runtime is found on the node
IMAGE_PYTHON = "python3"
# what a container needs of an Ascend host (Ascend's container guides bind the same): driver, npu-smi, control devices
ASCEND_BINDS = ("/usr/local/Ascend/driver", "/usr/local/dcmi", "/usr/local/bin/npu-smi", "/dev/davinci_manager",
                "/dev/devmm_svm", "/dev/hisi_hdc")
# each task first makes the staging folder ($1), then execs the runtime: a node's own folder, made on every node
MAKE_DEST = "/bin/sh -c 'mkdir -p -- \"$1\" && shift && exec \"$@\"' stage-data-to"


def runtime_setup(cfg: Config) -> list[str]:
    """The job's shell line that finds the runtime on its node (auto), or fails the job saying what to do."""
    if not cfg.launch.container or cfg.launch.container_runtime != "auto":
        return []
    found = " || ".join(f"command -v {name}" for name in RUNTIMES)
    return [f"{RUNTIME_VAR}=$({found}) || {{ echo \"--container: neither apptainer nor singularity is on the PATH "
            f"of $(hostname); load it with --setup 'module load apptainer' or pass --container-runtime\" >&2; "
            "exit 2; }"]


def runtime_here(cfg: Config) -> str:
    """The runtime's path on this machine (the local executor runs jobs here); a LaunchError when it has none."""
    names = RUNTIMES if cfg.launch.container_runtime == "auto" else (cfg.launch.container_runtime,)
    for name in names:
        if shutil.which(name):
            return str(shutil.which(name))
    raise LaunchError(f"--container needs {' or '.join(names)} on this machine's PATH, where the local executor "
                      "runs its jobs; install it, or drop --container")


def binds(cfg: Config, stage: str, run_dirs: Sequence[str] = ()) -> list[str]:
    """Folders the job reads or writes (the report's ``run_dirs``; the folder of a checkpoint or weights file it
    loads), the repo and (Ascend) the NPU driver; each at the same path inside. --stage-data-to: ``stage_dest``."""
    row = STAGES[stage]
    files = [cfg.train.resume if RESUME in row.reads and cfg.train.resume != "auto" else "",
             cfg.eval.checkpoint if CHECKPOINT in row.reads else "",
             cfg.model.pretrained if PRETRAINED in row.checks and Path(cfg.model.pretrained).expanduser().is_file()
             else ""]  # a --pretrained that is no file is a torchvision weights name
    for run_dir in run_dirs:
        check_bind_path("--run-dir", run_dir)
    paths = [str(REPO_ROOT), cfg.train.run_dir, *run_dirs, cfg.data.data_dir, cfg.prep.archive_dir,
             *(str(Path(file).expanduser().absolute().parent) for file in files if file)]
    if row.torchrun and cfg.train.device == "npu":
        paths += ASCEND_BINDS
    return list(dict.fromkeys(paths))


def stage_dest(cfg: Config, stage: str, here: bool) -> str:
    """--stage-data-to of a stage that stages, as one shell word: expanded now where the job runs ``here`` (the
    local executor), else its variables left to the job's shell as ``"${NAME}"`` and the rest single-quoted (the
    value matches validate's STAGE_DEST: '$' only begins a variable); empty for the other stages."""
    dest = cfg.data.stage_data_to
    if not dest or DATA_DIR not in STAGES[stage].reads:
        return ""
    if here:
        from pipeline.data.staging import expand_dest  # imports torch: only for a local job that stages

        return shlex.quote(str(expand_dest(dest)))
    parts = re.split(f"({VARIABLE})", dest)
    return "".join(f'"${{{part.strip("${}")}}}"' if i % 2 else shlex.quote(part) for i, part in enumerate(parts)
                   if part)


def job_python(cfg: Config, stage: str, runtime: str | None = None, run_dirs: Sequence[str] = ()) -> str | None:
    """The command that starts the job's python (submitit's ``python``): None without --container (the launcher's
    own interpreter); ``runtime``: the runtime's path where the job runs here, else the name or variable the job's
    shell resolves. A staging destination is bound too, made first (a runtime refuses to bind a missing folder)."""
    image = cfg.launch.container
    if not image:
        return None
    here = runtime is not None
    if runtime is None:
        runtime = f"${RUNTIME_VAR}" if cfg.launch.container_runtime == "auto" else cfg.launch.container_runtime
    gpus = ["--nv"] if stage_resources(cfg, stage).gpus_per_node else []
    dest = stage_dest(cfg, stage, here)
    words = [MAKE_DEST, dest] if dest else []
    words += [shlex.quote(runtime) if not runtime.startswith("$") else runtime, "exec", *gpus,
              "--bind", ",".join([shlex.quote(",".join(binds(cfg, stage, run_dirs))), *([dest] if dest else [])]),
              shlex.quote(image), IMAGE_PYTHON]
    return " ".join(words)


def check_image(cfg: Config) -> None:
    """On the login node: the image exists (a path) or is a URI the runtime pulls (docker://, oras://, ...)."""
    image = cfg.launch.container
    if image and "://" not in image and not Path(image).exists():
        raise LaunchError(f"--container {image} does not exist; give an Apptainer/Singularity image (.sif file or "
                          "sandbox dir) on a file system the nodes see")
