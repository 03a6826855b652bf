"""launch.py on a real two-node Slurm cluster (the CI one from .ci/slurm: partition debug, node1 and node2).

The ``slurm_cluster`` fixture uses the cluster SLURM_CONF names; without one it starts the CI cluster
(when Slurm is installed) and stops it at the end. With CI set, a missing cluster fails the run.
Each test drives the real CLI in a subprocess with a time bound, and cancels what it submitted.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from train_helpers import TINY_FLAGS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


def _cluster_answers() -> bool:
    if not os.environ.get("SLURM_CONF"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _wait_for_idle_nodes(count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        idle = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix", "-o", "%N"], capture_output=True, text=True)
        if len(set(idle.stdout.split())) >= count:
            return
        time.sleep(1)
    pytest.fail(f"the Slurm test cluster has fewer than {count} usable nodes:\n"
                + subprocess.run(["sinfo", "-N", "-l"], capture_output=True, text=True).stdout, pytrace=False)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """The partition of a running two-node cluster; started from .ci/slurm when none answers."""
    started = False
    patch = pytest.MonkeyPatch()
    ci_conf = Path(os.environ.get("CI_SLURM_DIR", "/tmp/ci-slurm")) / "slurm.conf"
    if not _cluster_answers() and ci_conf.exists():  # the CI cluster may be up already: use it, leave it up
        patch.setenv("SLURM_CONF", str(ci_conf))
    if not _cluster_answers():
        if os.environ.get("CI"):
            pytest.fail("CI is set but no Slurm cluster answers (SLURM_CONF unset or sinfo fails); .ci/run starts it "
                        "with `bash .ci/slurm/start.sh` and `source /tmp/ci-slurm/env.sh`", pytrace=False)
        daemons = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
        if not (shutil.which("sbatch") and shutil.which("slurmctld", path=daemons)):
            pytest.fail("Slurm is not installed: run `bash .ci/slurm/install.sh` (Debian's slurm-wlm and munge); "
                        "these tests then start a two-node cluster on this machine themselves", pytrace=False)
        result = subprocess.run(["bash", str(REPO / ".ci/slurm/start.sh")], capture_output=True, text=True,
                                timeout=180)
        conf = re.search(r"export SLURM_CONF=(\S+)", result.stdout)
        if result.returncode != 0 or not conf:
            pytest.fail(f"could not start the Slurm test cluster:\n{result.stdout}\n{result.stderr}", pytrace=False)
        patch.setenv("SLURM_CONF", conf.group(1))
        started = True
    _wait_for_idle_nodes(2)
    yield "debug"
    if started:
        subprocess.run(["bash", str(REPO / ".ci/slurm/stop.sh")], capture_output=True, timeout=120)
    patch.undo()


class Launcher:
    """Runs ``python launch.py`` as a user would, remembering the job ids it printed."""

    def __init__(self, partition: str):
        self.partition = partition
        self.job_ids: list[str] = []

    def __call__(self, *argv: object, timeout_s: float = 240) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(REPO / "launch.py"), "--executor", "slurm", "--partition", self.partition,
               "--workers", "1", *map(str, argv)]  # prep asks for workers + 1 CPUs: the CI nodes have 2
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        self.job_ids += re.findall(r"job (?:array )?(\d+) submitted", result.stdout)
        return result

    def cancel_all(self) -> None:
        if self.job_ids:
            subprocess.run(["scancel", *self.job_ids], capture_output=True, timeout=60)


@pytest.fixture
def launcher(slurm_cluster) -> Iterator[Launcher]:
    run = Launcher(slurm_cluster)
    yield run
    run.cancel_all()


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def job_state(job_id: str) -> str:
    return job_fields(job_id).get("JobState", "UNKNOWN")


def test_dry_run_prints_the_script_sbatch_receives(launcher, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = ("--stage", "report", "--run-dir", run_dir, "--time", 5)
    dry = launcher(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not launcher.job_ids and not (run_dir / "logs").exists()
    submitted = launcher(*args, "--detach")
    assert submitted.returncode == 0, submitted.stderr
    (job_id,) = launcher.job_ids
    script = (run_dir / "logs" / job_id / f"{job_id}_submission.sh").read_text()
    assert script in dry.stdout
    assert f"tail -f {run_dir}/logs/{job_id}/{job_id}_0_log.out" in submitted.stdout


def test_partition_that_does_not_exist_submits_nothing(launcher, tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    launcher.partition = "no-such-partition"
    result = launcher("--stage", "all", "--archive-dir", archives, "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    assert ("partition 'no-such-partition' does not exist on this cluster; known partitions: ['debug', 'cpu']"
            in result.stderr)
    assert not launcher.job_ids and not (tmp_path / "run" / "logs").exists()


def test_resources_slurm_cannot_give_are_refused_before_any_submission(launcher, tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    result = launcher("--stage", "all", "--archive-dir", archives, "--run-dir", tmp_path / "run", "--nodes", 3,
                      "--device", "cpu")
    assert result.returncode == 2
    assert "Slurm rejects the train job, nothing was submitted" in result.stderr
    assert "Requested node configuration is not available" in result.stderr
    assert not launcher.job_ids
    gpus = launcher("--stage", "train", "--data-dir", archives, "--run-dir", tmp_path / "run")
    assert gpus.returncode == 2 and "on a cluster without GPUs pass --device cpu" in gpus.stderr


def test_failed_stage_cancels_the_rest_of_the_chain(launcher, tmp_path):
    """Without accounting submitit cannot see cancelled jobs; the launcher must still end, not hang."""
    archives = tmp_path / "empty-archives"
    archives.mkdir()
    start = time.monotonic()
    result = launcher("--stage", "all", "--archive-dir", archives, "--data-dir", tmp_path / "data",
                      "--run-dir", tmp_path / "run", "--device", "cpu", "--time", 5)
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - start < 120
    prep, *later = launcher.job_ids
    assert len(later) == 3
    assert f"prep job {prep} failed" in result.stderr and "later stages not run" in result.stderr
    deadline = time.monotonic() + 30
    while any(job_state(j) not in ("CANCELLED", "UNKNOWN") for j in later) and time.monotonic() < deadline:
        time.sleep(1)
    assert {job_state(j) for j in later} <= {"CANCELLED", "UNKNOWN"}


TINY = (*TINY_FLAGS, "--time", "10")  # resnet18 on 32 px crops, a 10-minute limit


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from pipeline.prep.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("slurm") / "data", num_classes=2, train_per_class=16,
                             val_per_class=4, size=(36, 36))


def epoch_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "epochs.csv") as fh:
        return list(csv.DictReader(fh))


def test_two_node_training_has_world_size_two(launcher, tiny_data, tmp_path):
    """Also: the default CPU request, 1 process x (2 loader workers + 1), is more than the 2 CPUs of a CI node;
    the launcher says so and asks for what a node has, for sbatch and for srun (which no longer inherits it)."""
    run_dir = tmp_path / "run"
    result = launcher("--stage", "train", "--nodes", 2, "--procs-per-node", 1, "--data-dir", tiny_data,
                      "--run-dir", run_dir, "--epochs", 1, *TINY, "--workers", 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    (job_id,) = launcher.job_ids
    assert "warning: the train job would ask for 3 CPUs per node" in result.stdout
    assert "nodes of partition debug have at most 2; it asks for 2" in result.stdout
    script = (run_dir / "logs" / job_id / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --cpus-per-task=2" in script.splitlines() and re.search(r"^srun .* --cpus-per-task 2 ", script, re.M)
    assert f"[train {job_id}] RUNNING on node[1-2]" in result.stdout
    assert "pre-flight passed: all-reduce over 2 ranks" in result.stdout
    rows = epoch_rows(run_dir)
    assert [(r["epoch"], r["world_size"], r["nodes"]) for r in rows] == [("0", "2", "2")]
    ranks = json.loads(next((run_dir / "logs" / job_id).glob("preflight-*/ranks.json")).read_text())
    assert [(r["rank"], r["master_addr"]) for r in ranks] == [("0", "node1"), ("1", "node1")]


@pytest.mark.slow
def test_signalled_job_saves_requeues_and_finishes(launcher, tiny_data, tmp_path):
    """USR2 is what Slurm sends signal_delay_s before the time limit; the job must come back and finish."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch.py"), "--executor", "slurm", "--partition", launcher.partition,
           "--stage", "train", "--nodes", 2, "--procs-per-node", 1, "--data-dir", tiny_data, "--run-dir", run_dir,
           "--epochs", 3, "--preflight-timeout-s", 0, *TINY]
    with subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=REPO) as proc:
        try:
            output = []
            for line in proc.stdout:
                output.append(line)
                launcher.job_ids += re.findall(r"job (\d+) submitted", line)
                if "training resnet18 on 2 process(es)" in line:
                    subprocess.run(["scancel", "--signal=USR2", launcher.job_ids[0]], check=True)
                    break
            rest, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
    text = "".join(output) + rest
    assert proc.returncode == 0, text[-4000:]
    job_id = launcher.job_ids[0]
    assert "asked 1 training process(es)" in text and "training stopped (exit code 0); requeueing" in text
    assert f"[train {job_id}] RUNNING on node[1-2] (requeued 1x)" in text
    assert "resumed from" in text and "latest.pt" in text
    assert [r["epoch"] for r in epoch_rows(run_dir)] == ["0", "1", "2"]
    assert job_state(job_id) == "COMPLETED"


@pytest.mark.slow
def test_whole_pipeline_runs_as_a_chain_of_dependent_jobs(launcher, tmp_path):
    from pipeline.prep.synthetic import make_imagenet_archives

    archives = tmp_path / "archives"
    make_imagenet_archives(archives, num_classes=2, train_per_class=8, val_per_class=4)
    run_dir = tmp_path / "run"
    result = launcher("--stage", "all", "--nodes", 2, "--procs-per-node", 1, "--archive-dir", archives,
                      "--skip-checksum", "--data-dir", tmp_path / "data", "--run-dir", run_dir, "--epochs", 1,
                      "--preflight-timeout-s", 0, "--eval-nodes", 2, *TINY, timeout_s=420)  # eval: 1 node unless told
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    prep, train, evaluate, report = launcher.job_ids
    for parent, child in ((prep, train), (train, evaluate), (evaluate, report)):
        script = (run_dir / "logs" / child / f"{child}_submission.sh").read_text().splitlines()
        assert f"#SBATCH --dependency=afterok:{parent}" in script and "#SBATCH --kill-on-invalid-dep=yes" in script
    assert f"[train {train}] RUNNING on node[1-2]" in result.stdout
    assert [r["world_size"] for r in epoch_rows(run_dir)] == ["2"]
    assert json.loads((run_dir / "eval.json").read_text())["world_size"] == 2
    assert (run_dir / "report" / "summary.csv").exists() and f"[report {report}] # Training report" in result.stdout
    assert result.stdout.rstrip().endswith(f"finished: prep -> train -> eval -> report; run dir {run_dir}")


def test_crash_on_every_node_is_reported_per_node_with_rank_and_log(launcher, tmp_path):
    """An empty data dir: the launcher sees it exists, the training processes find no train/ in it."""
    (tmp_path / "empty").mkdir()
    result = launcher("--stage", "train", "--nodes", 2, "--procs-per-node", 1, "--data-dir", tmp_path / "empty",
                      "--run-dir", tmp_path / "run", "--epochs", 1, "--max-restarts", 0, "--preflight-timeout-s", 0,
                      *TINY)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    (job_id,) = launcher.job_ids
    assert f"train job {job_id} failed (FAILED" in result.stderr
    for node in (0, 1):  # each node names the job's first failure, and does not restart it
        assert f"node {node}: jobs.torchrun.WorkerFailedError: train failed on node {node}" in result.stderr
    assert result.stderr.count("raised DataDirError: data dir ") == 2
    assert result.stderr.count("(attempt 0); not restarted: a restart fails the same way") == 2
    logs = re.findall(r"Its log: (\S+)", result.stderr)
    assert len(logs) == 2 and all("has no train/ and val/ folders" in Path(log).read_text() for log in logs)


def test_sweep_is_a_throttled_job_array_then_one_report_of_its_points(launcher, tiny_data, tmp_path):
    """Two points, at most one at a time: the second task starts after the first ends; the report job waits for
    both and its table, in the sweep dir, has both."""
    sweep = tmp_path / "sweep"
    result = launcher("--stage", "train", "--procs-per-node", 1, "--data-dir", tiny_data, "--run-dir", sweep,
                      "--epochs", 1, "--preflight-timeout-s", 0, *TINY, "--sweep", "batch_size=4,8",
                      "--array-parallelism", 1)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    array, report = launcher.job_ids
    assert (f"[train] job array {array} submitted (slurm, a job array, 2 points (batch_size=4, batch_size=8), at most 1 "
            "at once; each 1 node(s) x 1 process(es))") in result.stdout
    assert f"  batch_size=4: job {array}_0\n" in result.stdout and f"  batch_size=8: job {array}_1\n" in result.stdout
    script = (sweep / "logs" / array / f"{array}_submission.sh").read_text().splitlines()
    assert "#SBATCH --array=0-1%1" in script
    first, second = job_fields(f"{array}_0"), job_fields(f"{array}_1")
    assert first["ArrayTaskThrottle"] == "1" and (first["JobState"], second["JobState"]) == ("COMPLETED",) * 2
    assert second["StartTime"] >= first["EndTime"]  # ISO times: string order is time order
    report_script = (sweep / "logs" / report / f"{report}_submission.sh").read_text().splitlines()
    assert f"#SBATCH --dependency=afterany:{array}" in report_script
    with open(sweep / "report" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["run"], r["batch_per_proc"], r["epochs_done"]) for r in rows] == [("batch_size=4", "4", "1"),
                                                                                ("batch_size=8", "8", "1")]
    assert f"[report {report}] # Training report: 2 run(s)" in result.stdout
    assert result.stdout.rstrip().endswith(f"sweep finished: 2 point(s); report in {sweep / 'report'}")


def test_a_failed_sweep_point_is_named_and_the_others_are_still_reported(launcher, tiny_data, tmp_path):
    """The second point's data dir has no train/: its array task fails, the report job (afterany) still runs."""
    (tmp_path / "empty").mkdir()
    sweep = tmp_path / "sweep"
    result = launcher("--stage", "train", "--procs-per-node", 1, "--run-dir", sweep, "--epochs", 1,
                      "--preflight-timeout-s", 0, "--max-restarts", 0, *TINY,
                      "--sweep", f"data_dir={tiny_data},{tmp_path / 'empty'}")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr
    array, _ = launcher.job_ids
    good, bad = (f"data_dir={str(path).replace('/', '_')}" for path in (tiny_data, tmp_path / "empty"))
    assert f"1 of 2 sweep point(s) failed: {bad} (job {array}_1: node 0: " in result.stderr
    assert "WorkerFailedError: train failed on node 0" in result.stderr
    with open(sweep / "report" / "summary.csv", newline="") as fh:
        assert [row["run"] for row in csv.DictReader(fh)] == [good]
