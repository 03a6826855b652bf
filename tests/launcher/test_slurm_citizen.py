"""On the real two-node Slurm test cluster (.ci/slurm: partitions debug and cpu): a prep job goes to its own
partition without GPUs and runs with srun's CPU binding; a job runs through the container runtime its node finds;
a requeue leaves out the host the pre-flight named."""
from __future__ import annotations

import json
import os

import pytest

from jobs.leave_out import EXCLUDED_FILE
from jobs.torchrun import REPO_ROOT
from test_container import stand_in_runtime
from test_slurm import TINY, epoch_rows, job_fields, launcher, slurm_cluster, tiny_data  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slurm


def test_a_prep_job_asks_its_own_partition_for_cpus_and_no_gpu(launcher, tmp_path):
    from pipeline.prep.synthetic import make_imagenet_archives

    archives, run_dir = tmp_path / "archives", tmp_path / "run"
    make_imagenet_archives(archives, num_classes=2, train_per_class=3, val_per_class=1)
    result = launcher("--stage", "prep", "--prep-partition", "cpu", "--prep-time", 7, "--archive-dir", archives,
                      "--skip-checksum", "--data-dir", tmp_path / "data", "--run-dir", run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    (job_id,) = launcher.job_ids
    fields = job_fields(job_id)
    assert (fields["Partition"], fields["NumCPUs"], fields["TimeLimit"]) == ("cpu", "2", "00:07:00")  # workers 1 + 1
    assert "gpu" not in fields["TRES"] and fields["JobState"] == "COMPLETED"
    script = (run_dir / "logs" / job_id / f"{job_id}_submission.sh").read_text()
    assert " --cpu-bind cores " in script and (tmp_path / "data" / "classes.tsv").is_file()  # bound, and it ran


def test_a_slurm_job_runs_in_the_container_its_node_finds(launcher, tmp_path, monkeypatch):
    """The runtime is found by the job's shell on its node (here a stand-in apptainer on the PATH the job gets)."""
    from pipeline.prep.synthetic import make_imagenet_archives

    archives, data, run_dir, image = tmp_path / "archives", tmp_path / "data", tmp_path / "run", tmp_path / "img"
    make_imagenet_archives(archives, num_classes=2, train_per_class=3, val_per_class=1)
    image.mkdir()
    log = tmp_path / "runtime.log"
    stand_in_runtime(tmp_path / "bin", image, log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    result = launcher("--stage", "prep", "--container", image, "--archive-dir", archives, "--skip-checksum",
                      "--data-dir", data, "--run-dir", run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    (call,) = log.read_text().splitlines()
    assert call.startswith(f"exec --bind {REPO_ROOT},{run_dir},{data},{archives} {image} python3 -u -m submitit")
    assert (data / "classes.tsv").is_file()


@pytest.mark.slow
def test_a_requeue_leaves_out_the_host_the_preflight_named(launcher, tiny_data, tmp_path):
    """A real fault on the first node the job lands on: gloo cannot find its network interface there, so the
    pre-flight of its two processes fails naming that host; the job comes back on the other node and trains."""
    run_dir, first = tmp_path / "run", tmp_path / "first-host"
    fault = (f'[ -e {first} ] || echo "$SLURMD_NODENAME" > {first}; [ "$(cat {first})" != "$SLURMD_NODENAME" ] '
             "|| export GLOO_SOCKET_IFNAME=no-such-interface")
    result = launcher("--stage", "train", "--procs-per-node", 2, "--device", "cpu", "--data-dir", tiny_data,
                      "--run-dir", run_dir, "--epochs", 1, "--max-restarts", 0, "--preflight-timeout-s", 60,
                      "--setup", fault, *TINY, timeout_s=420)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    (job_id,) = launcher.job_ids
    log = (run_dir / "logs" / job_id / f"{job_id}_0_log.err").read_text()
    assert "pre-flight failed" in log and "requeued without" in log, log[-4000:]
    bad = first.read_text().strip()
    good = ({"node1", "node2"} - {bad}).pop()
    rows = json.loads((run_dir / EXCLUDED_FILE).read_text())["hosts"]
    assert [(row["host"], row["job"]) for row in rows] == [(bad, job_id)] and "pre-flight failed" in rows[0]["reason"]
    assert f"[train {job_id}] RUNNING on {good} (requeued 1x)" in result.stdout
    fields = job_fields(job_id)
    assert fields["ExcNodeList"] == bad and fields["NodeList"] == good and fields["JobState"] == "COMPLETED"
    assert [r["world_size"] for r in epoch_rows(run_dir)] == ["2"]
