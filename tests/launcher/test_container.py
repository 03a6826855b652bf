"""--container: the job's python is the image's, under Apptainer or Singularity, with the job's folders bound.

No runtime can be installed on this machine (Debian has no apptainer package, and nothing is fetched from outside),
so these tests read the generated command, and run a real prep job through a stand-in ``apptainer`` that checks
the arguments a runtime gets and runs the rest of the command as ``exec IMAGE python3 ...`` would.
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from jobs.torchrun import REPO_ROOT
from launch_helpers import no_slurm_path, run_main  # noqa: F401 (a fixture)
from launcher.container import ASCEND_BINDS

STAND_IN = """#!/bin/bash
echo "$@" >> {log}
[ "$1" = exec ] || exit 97
shift
while [ "$#" -gt 0 ] && [ "$1" != {image} ]; do shift; done
shift
[ "$1" = python3 ] || exit 98
shift
exec {python} "$@"
"""


def stand_in_runtime(bin_dir: Path, image: Path, log: Path) -> None:
    """``bin_dir/apptainer``: checks what a runtime is given, logs it, runs the rest as the image's python3."""
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(STAND_IN.format(log=log, image=image, python=sys.executable))
    (bin_dir / "apptainer").chmod(0o755)


def srun_line(out: str, stage: str) -> str:
    script = out.split(f"===== {stage}: sbatch script")[1].split("=====")[1]
    return next(line for line in script.splitlines() if line.startswith("srun "))


def test_every_process_of_a_slurm_job_runs_in_the_image(no_slurm_path, tmp_path, capsys):
    image = tmp_path / "torch.sif"
    image.write_bytes(b"SIF")
    run_dir, data = tmp_path / "run", tmp_path / "data"
    code, out, _ = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", "--container", image,
                            "--gpus-per-node", 2, "--run-dir", run_dir, "--data-dir", data, "--archive-dir",
                            tmp_path / "archives")
    assert code == 0
    binds = f"{REPO_ROOT},{run_dir},{data},{tmp_path / 'archives'}"
    for stage, gpu in (("prep", ""), ("train", "--nv "), ("eval", "--nv "), ("report", "")):
        assert srun_line(out, stage).endswith(f" $CONTAINER_RUNTIME exec {gpu}--bind {binds} {image} python3 -u -m "
                                              f"submitit.core._submit {run_dir}/logs/%j")
    assert f"  inside {image}, where python is the image's python3" in out
    setup = out.split("===== train: sbatch script")[1].split("# command")[0]
    assert re.search(r"^CONTAINER_RUNTIME=\$\(command -v apptainer \|\| command -v singularity\) \|\| \{ echo .*"
                     r"exit 2; \}$", setup, re.M)


def test_a_named_runtime_and_the_npu_binds(no_slurm_path, tmp_path, capsys):
    image = tmp_path / "sandbox"
    image.mkdir()
    code, out, _ = run_main(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", "--container", image,
                            "--container-runtime", "singularity", "--device", "npu", "--run-dir", tmp_path / "run")
    line = srun_line(out, "train")
    assert code == 0 and " singularity exec --bind " in line and "--nv" not in line  # NPUs: no CUDA libraries
    assert all(path in shlex.split(line)[shlex.split(line).index("--bind") + 1].split(",") for path in ASCEND_BINDS)
    assert "CONTAINER_RUNTIME" not in out


@pytest.mark.parametrize("argv, message", [
    (["--container", "{tmp}/missing.sif"], "--container {tmp}/missing.sif does not exist"),
    (["--container", "{tmp}", "--data-dir", "{tmp}/a,b"], "holds a ',' or ':', which the container's --bind"),
    (["--container", "{tmp}", "--executor", "local"], "--container needs apptainer or singularity on this machine"),
])
def test_a_container_that_cannot_work_is_refused_before_submitting(argv, message, no_slurm_path, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with_executor = argv if "--executor" in argv else [*argv, "--executor", "slurm"]
    code, _, err = run_main(capsys, "--stage", "train", "--dry-run", *with_executor)
    assert code == 2 and message.replace("{tmp}", str(tmp_path)) in err


def test_a_local_job_runs_through_the_runtime(tmp_path, monkeypatch, capsys):
    """A real prep job of the local executor, started through the (stand-in) runtime with its folders bound."""
    from pipeline.prep.synthetic import make_imagenet_archives

    archives, data, run_dir, image = tmp_path / "archives", tmp_path / "data", tmp_path / "run", tmp_path / "img"
    make_imagenet_archives(archives, num_classes=2, train_per_class=3, val_per_class=1)
    image.mkdir()
    bin_dir, log = tmp_path / "bin", tmp_path / "runtime.log"
    stand_in_runtime(bin_dir, image, log)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    code, out, err = run_main(capsys, "--stage", "prep", "--executor", "local", "--container", image,
                              "--archive-dir", archives, "--data-dir", data, "--run-dir", run_dir, "--skip-checksum")
    assert code == 0, out[-2000:] + err
    (call,) = log.read_text().splitlines()
    assert call.startswith(f"exec --bind {REPO_ROOT},{run_dir},{data},{archives} {image} python3 -u -m "
                           "submitit.core._submit")
    assert (data / "classes.tsv").is_file()


def test_a_sweeps_points_share_one_array_that_binds_the_sweep_dir(no_slurm_path, tmp_path, capsys):
    image, sweep_dir = tmp_path / "img", tmp_path / "sweep"
    image.mkdir()
    code, out, _ = run_main(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", "--container", image,
                            "--sweep", "model=resnet18,resnet50", "--run-dir", sweep_dir)
    assert code == 0 and "train 1 of 1: a job array, 2 points" in out
    array = out.split("===== train 1 of 1")[1].split("=====")[1]
    (line,) = [line for line in array.splitlines() if line.startswith("srun ")]
    assert f" --bind {REPO_ROOT},{sweep_dir}," in line  # every point's run dir lies in it
