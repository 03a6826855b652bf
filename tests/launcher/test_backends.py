"""The scheduler seam (launcher/backends/): a backend registered from outside runs a chain through the launcher's
own code, the registry picks by name, Slurm's options live in [slurm] and old [launch] keys still load."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import cloudpickle
import pytest

import launch
from launch_helpers import no_slurm_path, run_main  # noqa: F401 (a fixture)
from launcher import backends
from launcher.backends.base import JobInfo
from launcher.backends.local import LocalBackend
from pipeline.core.config import build_config
from train_helpers import TINY_FLAGS


class AfterOk:
    """What a queue does for a job with a dependency: it starts once the jobs it waits for succeeded, and never
    when one failed (kill_on_invalid_dep)."""

    def __init__(self, fn: Callable[[], Any], waits_for: Sequence[Path]):
        self.fn, self.waits_for = fn, list(waits_for)

    def __call__(self) -> Any:
        import pickle

        for result in self.waits_for:
            while not result.exists():
                time.sleep(0.05)
            if pickle.loads(result.read_bytes())[0] != "success":
                raise RuntimeError(f"never started: the job of {result.name} failed")
        return self.fn()


class FakeQueue(LocalBackend):
    """A queued scheduler in a few lines: jobs are processes of this machine that wait on each other, its state is
    the job's, it records what the launcher asked of it."""

    name, title, queued, auto, poll_s, script_name = "fakequeue", "FakeQueue", True, False, 0.1, "fake script"
    jobs: dict[str, Any] = {}  # class-wide: the launcher makes a backend object per use, a scheduler has one queue
    asked: list[tuple[str, str | None]] = []  # (stage, the job it waits for)
    cancelled: list[str] = []

    def submit(self, cfg, stage, fn, *, after=None, when="afterok", node_cpus=None, run_dirs=()):
        self.asked.append((stage, after))
        waits = [self.jobs[job_id].paths.result_pickle for job_id in after.split(":")] if after else []
        job = super().submit(cfg, stage, AfterOk(fn, waits), after=after, when=when, node_cpus=node_cpus,
                             run_dirs=run_dirs)
        self.jobs[job.job_id] = job
        return job

    def render(self, cfg, stage, params):
        return f"===== {stage}: fake script =====\n{sorted(params)}\n"

    def state(self, job_id: str) -> JobInfo | None:
        return JobInfo("COMPLETED" if self.jobs[job_id].done() else "RUNNING")

    def cancel(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            self.cancelled.append(job_id)
            self.jobs[job_id].cancel()

    def cancel_hint(self, job_ids: Sequence[str]) -> str:
        return f"fakecancel {' '.join(job_ids)}"


@pytest.fixture
def fake_queue(monkeypatch):
    """FakeQueue registered as ``--executor fakequeue``, for this test only; its jobs' processes unpickle AfterOk
    by value (this module is not importable there)."""
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    monkeypatch.setattr(FakeQueue, "jobs", {})
    monkeypatch.setattr(FakeQueue, "asked", [])
    monkeypatch.setattr(FakeQueue, "cancelled", [])
    backends.register(FakeQueue)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield FakeQueue
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_backend_registered_from_outside_runs_a_whole_chain(fake_queue, tmp_path, capsys):
    from pipeline.prep.synthetic import make_imagenet_archives

    archives = tmp_path / "archives"
    make_imagenet_archives(archives, num_classes=2, train_per_class=4, val_per_class=2)
    run_dir = tmp_path / "run"
    code, out, err = run_main(capsys, "--stage", "all", "--executor", "fakequeue", "--archive-dir", archives,
                              "--skip-checksum", "--data-dir", tmp_path / "data", "--run-dir", run_dir,
                              "--epochs", 1, "--preflight-timeout-s", 0, *TINY_FLAGS)
    assert code == 0, out[-3000:] + err
    stages = ["prep", "train", "eval", "report"]
    ids = list(fake_queue.jobs)
    assert fake_queue.asked == list(zip(stages, [None, *ids[:-1]]))  # each waits on the one before
    assert f"[train] job {ids[1]} submitted (fakequeue, 1 node(s) x 1 process(es), starts after job {ids[0]} " \
           "succeeds)" in out
    assert f"    cancel: fakecancel {' '.join(ids)}" in out
    assert out.rstrip().endswith(f"finished: prep -> train -> eval -> report; run dir {run_dir}")
    assert (run_dir / "eval.json").is_file() and (run_dir / "report" / "summary.csv").is_file()


def test_a_failed_stage_cancels_the_queued_jobs_after_it(fake_queue, tmp_path, capsys):
    (tmp_path / "archives").mkdir()  # exists, holds no archive: prep fails in its job
    code, out, err = run_main(capsys, "--stage", "all", "--executor", "fakequeue", "--archive-dir",
                              tmp_path / "archives", "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "run",
                              "--model", "resnet18", "--device", "cpu")
    prep, *later = fake_queue.jobs
    assert code == 1 and f"prep job {prep} failed" in err
    assert fake_queue.cancelled == later and f"later stages not run (cancelled jobs {later})" in err


def test_the_dry_run_shows_what_the_chosen_backend_would_send(fake_queue, no_slurm_path, tmp_path, capsys):
    code, out, _ = run_main(capsys, "--stage", "train", "--executor", "fakequeue", "--dry-run", "--nodes", 2,
                            "--run-dir", tmp_path / "run")
    assert code == 0 and "===== train: fake script =====" in out and "--nnodes 2" in out
    assert not fake_queue.jobs and out.rstrip().endswith("dry run: nothing was submitted")


def test_only_a_queued_backend_may_span_nodes(fake_queue, no_slurm_path, tmp_path, capsys):
    code, _, err = run_main(capsys, "--stage", "train", "--executor", "local", "--nodes", 2, "--dry-run")
    assert code == 2 and "--nodes 2 needs Slurm or FakeQueue" in err and "--executor slurm|fakequeue" in err


def test_auto_picks_slurm_where_sbatch_is_else_local(no_slurm_path, capsys):
    assert backends.choose("auto", sys.stdout).name == "local"
    (no_slurm_path / "sbatch").write_text("#!/bin/sh\n")
    (no_slurm_path / "sbatch").chmod(0o755)
    assert backends.choose("auto", sys.stdout).name == "slurm"
    said = capsys.readouterr().out.splitlines()
    assert said[0] == "executor: local (no sbatch on PATH; --executor slurm|local|debug picks another)"
    assert said[1] == f"executor: slurm (sbatch at {no_slurm_path}/sbatch; --executor slurm|local|debug picks another)"


def test_an_unknown_executor_is_one_line(no_slurm_path, capsys):
    code, _, err = run_main(capsys, "--stage", "train", "--executor", "pbs", "--dry-run")
    assert code == 2 and err.strip() == ("launch.py: error: --executor 'pbs' is not a known executor; choose one of "
                                         "['auto', 'slurm', 'local', 'debug']")


def test_registering_a_name_twice_warns():
    saved = dict(backends.BACKENDS)
    try:
        with pytest.warns(UserWarning, match="registered twice"):
            backends.register(type("Other", (LocalBackend,), {"name": "local"}))
    finally:
        backends.BACKENDS.clear()
        backends.BACKENDS.update(saved)


def test_slurm_options_live_in_their_own_table():
    cfg = build_config({"launch": {"nodes": 2}, "slurm": {"partition": "gpu", "sbatch": ["mail-type=END"]}})
    assert (cfg.launch.nodes, cfg.slurm.partition, cfg.slurm.sbatch) == (2, "gpu", ["mail-type=END"])
    params = backends.get_backend("slurm").parameters(cfg, "train")
    assert params["partition"] == "gpu" and params["additional_parameters"]["mail-type"] == "END"
    assert "partition" not in backends.get_backend("local").parameters(cfg, "train")


def test_an_old_config_with_slurm_keys_in_launch_loads_with_a_note(capsys):
    cfg = build_config({"launch": {"partition": "gpu", "exclusive": True, "time": 30}}, where="old.toml")
    assert (cfg.slurm.partition, cfg.slurm.exclusive, cfg.launch.time) == ("gpu", True, 30)
    assert capsys.readouterr().err.splitlines() == [
        "note: old.toml: [launch] partition is read from [slurm] now; move it there",
        "note: old.toml: [launch] exclusive is read from [slurm] now; move it there"]


def test_a_run_dirs_saved_config_keeps_the_slurm_table_out_of_eval(tmp_path):
    from pipeline.core.config import Config, save_config

    cfg = Config()
    cfg.slurm.partition = "old-partition"
    cfg.train.run_dir = str(tmp_path)
    save_config(cfg, tmp_path / "config.toml")
    args = launch.get_args_parser().parse_args(["--stage", "eval", "--run-dir", str(tmp_path)])
    resolved, _ = launch.resolve_config(args)
    assert resolved.slurm.partition == ""  # how to run this job is this command's business


def test_a_run_dir_from_before_the_slurm_table_loads_without_notes(tmp_path, capsys):
    from pipeline.core.config import load_config

    (tmp_path / "config.toml").write_text('[launch]\nnodes = 2\npartition = "gpu"\nsbatch = []\nnpu_gres = "npu"\n')
    cfg = load_config(tmp_path / "config.toml")
    assert (cfg.launch.nodes, cfg.slurm.partition) == (2, "gpu") and capsys.readouterr().err == ""
