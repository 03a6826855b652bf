"""--container IMAGE: every process of a job inside an Apptainer (or Singularity) image.

A job's command is submitit's ``python -u -m submitit.core._submit FOLDER``, which srun starts on every node; with
a container its ``python`` is the image's, under the runtime::

    $CONTAINER_RUNTIME exec --nv --bind REPO,RUN_DIR,DATA_DIR,ARCHIVE_DIR IMAGE python3 -u -m submitit.core._submit ...

so submitit, torchrun, every training process and its loader workers run in the image, which must hold torch,
torchvision, submitit and tomli_w (the repo itself is bound and on PYTHONPATH). ``--nv`` where the job asks for
GPUs; Ascend's driver and control devices bound for --device npu (the runtime mounts /dev/davinci<N> with /dev).
The login node only writes the command: on Slurm the job's shell finds the runtime (apptainer, else singularity,
on the node's PATH), so the login node needs none; the local executor runs here and looks for it now.
"""
from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from jobs.torchrun import REPO_ROOT
from launcher.executors import LaunchError, stage_resources
from pipeline.core.config import Config
from pipeline.core.stages import STAGES

RUNTIMES = ("apptainer", "singularity")  # --container-runtime auto tries them in this order
RUNTIME_VAR = "CONTAINER_RUNTIME"  # set by the job's setup line where the runtime is found on the node
IMAGE_PYTHON = "python3"
# what a container needs of an Ascend host (Ascend's container guides bind the same): driver, npu-smi, control devices
ASCEND_BINDS = ("/usr/local/Ascend/driver", "/usr/local/dcmi", "/usr/local/bin/npu-smi", "/dev/davinci_manager",
                "/dev/devmm_svm", "/dev/hisi_hdc")


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


def binds(cfg: Config, stage: str) -> list[str]:
    """Folders the job reads or writes, the repo and (Ascend) the NPU driver; each at the same path inside."""
    paths = [str(REPO_ROOT), cfg.train.run_dir, cfg.data.data_dir, cfg.prep.archive_dir]
    if STAGES[stage].torchrun and cfg.train.device == "npu":
        paths += ASCEND_BINDS
    return list(dict.fromkeys(paths))


def job_python(cfg: Config, stage: str, runtime: str | None = None) -> str | None:
    """The command that starts the job's python (submitit's ``python``): None without --container (the launcher's
    own interpreter); ``runtime``: the runtime's path, else the name or variable the job's shell resolves."""
    image = cfg.launch.container
    if not image:
        return None
    if runtime is None:
        runtime = f"${RUNTIME_VAR}" if cfg.launch.container_runtime == "auto" else cfg.launch.container_runtime
    gpus = ["--nv"] if stage_resources(cfg, stage).gpus_per_node else []
    words = [shlex.quote(runtime) if not runtime.startswith("$") else runtime, "exec", *gpus,
             "--bind", shlex.quote(",".join(binds(cfg, stage))), shlex.quote(image), IMAGE_PYTHON]
    return " ".join(words)


def check_image(cfg: Config) -> None:
    """On the login node: the image exists (a path) or is a URI the runtime pulls (docker://, oras://, ...)."""
    image = cfg.launch.container
    if image and "://" not in image and not Path(image).exists():
        raise LaunchError(f"--container {image} does not exist; give an Apptainer/Singularity image (.sif file or "
                          "sandbox dir) on a file system the nodes see")
