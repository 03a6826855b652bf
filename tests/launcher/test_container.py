"""--container: the job's python is the image's, under Apptainer or Singularity, with the job's folders bound.

No runtime can be installed on this machine (Debian has no apptainer package, and nothing is fetched from outside),
so these tests read the generated command, and run a real prep job through a stand-in ``apptainer`` that checks
the arguments a runtime gets and runs the rest of the command as ``exec IMAGE python3 ...`` would.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
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
    (["--container", "{tmp}", "--layout", "shards", "--stage-data-to", "$TMPDIR/a:b"],
     "data.stage_data_to (--stage-data-to) $TMPDIR/a:b holds a ',' or ':'"),
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


def run_srun_line(line: str, tmp_path: Path, **env: str) -> list[str]:
    """The words the job's shell gives srun for ``line`` (an srun that prints them), with ``env`` set."""
    script = tmp_path / "job.sh"
    script.write_text(f"srun() {{ printf '%s\\n' \"$@\"; }}\nCONTAINER_RUNTIME=/opt/apptainer\n{line}\n")
    shown = subprocess.run(["bash", str(script)], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                           text=True, check=True)
    return shown.stdout.splitlines()


def test_the_staging_folder_is_bound_as_each_nodes_shell_expands_it(no_slurm_path, tmp_path, capsys):
    """--stage-data-to holds a variable and shell-hostile characters: bound and made as the value reads there."""
    image, run_dir, data = tmp_path / "img", tmp_path / "run", tmp_path / "data"
    image.mkdir()
    dest = "$TMPDIR/a \"b;c'd/${USER}"
    code, out, err = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", "--container", image,
                              "--run-dir", run_dir, "--data-dir", data, "--archive-dir", tmp_path / "archives",
                              "--layout", "shards", "--stage-data-to", dest, "--device", "cpu")
    assert code == 0, err
    node_dest = "/node tmp/a \"b;c'd/me"
    for stage in ("train", "eval"):
        words = run_srun_line(srun_line(out, stage), tmp_path, TMPDIR="/node tmp", USER="me")
        start = words.index("/bin/sh")
        assert words[start:start + 5] == ["/bin/sh", "-c", 'mkdir -p -- "$1" && shift && exec "$@"',
                                          "stage-data-to", node_dest]
        runtime = words[start + 5:]
        assert runtime[:4] == ["/opt/apptainer", "exec", "--bind", f"{REPO_ROOT},{run_dir},{data},"
                               f"{tmp_path / 'archives'},{node_dest}"] and runtime[5] == "python3"
    for stage in ("prep", "report"):  # they stage nothing
        words = run_srun_line(srun_line(out, stage), tmp_path, TMPDIR="/node tmp", USER="me")
        assert "/bin/sh" not in words and not any(node_dest in word for word in words)


def test_the_reports_run_dirs_and_the_loaded_files_folders_are_bound(no_slurm_path, tmp_path, capsys):
    image, weights, ckpt = tmp_path / "img", tmp_path / "weights" / "w.pt", tmp_path / "kept" / "best.pt"
    image.mkdir()
    for path in (weights, ckpt):
        path.parent.mkdir()
        path.write_bytes(b"PK\x03\x04")
    runs = [tmp_path / "run-a", tmp_path / "run-b"]
    code, out, err = run_main(capsys, "--stage", "report", "--executor", "slurm", "--dry-run", "--container", image,
                              "--run-dir", *runs)
    assert code == 0, err
    bound = shlex.split(srun_line(out, "report"))
    assert bound[bound.index("--bind") + 1].split(",")[1:3] == [str(run) for run in runs]
    for stage, file in (("eval", ckpt), ("train", weights)):
        code, out, err = run_main(capsys, "--stage", stage, "--executor", "slurm", "--dry-run", "--container",
                                  image, "--run-dir", runs[0], "--checkpoint", ckpt, "--pretrained", weights,
                                  "--model", "resnet18")
        bound = shlex.split(srun_line(out, stage))
        assert code == 0 and bound[bound.index("--bind") + 1].split(",")[-1] == str(file.parent), err
        assert str((weights if stage == "eval" else ckpt).parent) not in srun_line(out, stage)  # not read there
    code, _, err = run_main(capsys, "--stage", "report", "--executor", "slurm", "--dry-run", "--container", image,
                            "--run-dir", runs[0], tmp_path / "x:y")
    assert code == 2 and f"--run-dir {tmp_path / 'x:y'} holds a ',' or ':'" in err


@pytest.mark.slow
def test_a_local_training_stages_through_the_runtime_into_its_bound_folder(tmp_path, monkeypatch, capsys):
    """A real local train job with --stage-data-to '$TMPDIR/x': the runtime binds the expanded folder, made before
    it starts, and the processes train from the copy staged there."""
    from layout_helpers import prep_layouts
    from pipeline.data.staging import staged_dir
    from train_helpers import TINY_FLAGS

    _, dirs = prep_layouts(tmp_path, layouts=("archives",), num_classes=2, train_per_class=8, val_per_class=2,
                           missing_val=(), unlabelled_val=0)
    image, run_dir, node_tmp = tmp_path / "img", tmp_path / "run", tmp_path / "node tmp"
    image.mkdir()
    node_tmp.mkdir()
    bin_dir, log = tmp_path / "bin", tmp_path / "runtime.log"
    stand_in_runtime(bin_dir, image, log)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("TMPDIR", str(node_tmp))
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "local", "--container", image,
                              "--data-dir", dirs["archives"], "--layout", "archives", "--run-dir", run_dir,
                              "--stage-data-to", "$TMPDIR/x", "--epochs", 1, "--preflight-timeout-s", 0, *TINY_FLAGS)
    assert code == 0, out[-2000:] + err
    (call,) = log.read_text().splitlines()
    assert call.startswith(f"exec --bind {REPO_ROOT},{run_dir},{dirs['archives']},") and \
        f",{node_tmp}/x {image} python3 " in call
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["staged_data_dir"] == str(staged_dir(dirs["archives"], node_tmp / "x"))
