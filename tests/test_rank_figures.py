"""Threads per process, each rank's figures, stragglers and the report's flags, on real runs.

Two real runs of the same model and batch: one process under torchrun, and two processes started by launch.py
through the local executor (torchrun inside the job), with rank 1's data path slowed by a ``sitecustomize`` put
on PYTHONPATH by the test alone: production code has no hook for it.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from launcher.follow import StragglerReporter
from pipeline.core.rank_figures import find_straggler
from pipeline.core.records import EPOCHS_FILE, RANK_COLUMNS, RANKS_FILE, append_rows
from pipeline.core.threads import threads_per_process, usable_cpus
from pipeline.report.build import report
from train_helpers import REPO_ROOT, read_rows, run_module, tiny_argv, tiny_data

SLOW_S = 0.1  # per sample on rank 1: 0.8 s per batch of 8, well above a step's compute here
SLOW_RANK_HOOK = f"""\
    import os
    if os.environ.get("RANK") == "1":  # torchrun's rank 1 and its loader workers
        import time
        from pipeline.data import datasets

        original = datasets.SampleSet.__getitem__

        def slowed(self, key):
            time.sleep({SLOW_S})
            return original(self, key)

        datasets.SampleSet.__getitem__ = slowed
"""
ARGS = ("--epochs", "1", "--workers", "1", "--no-tensorboard", "--min-steady-steps", "20", "--min-steady-s", "10")


@pytest.mark.parametrize("cpus, processes, workers, threads", [
    (64, 8, 4, 4),   # 64 // 8 - 4
    (2, 1, 0, 2), (2, 1, 1, 1), (2, 2, 1, 1),  # this machine's CPUs: never below 1
    (8, 1, 4, 4), (16, 3, 2, 3),  # 16 // 3 = 5, less 2
])
def test_threads_are_the_share_of_cpus_less_the_loader_workers(cpus, processes, workers, threads):
    assert threads_per_process(cpus, processes, workers) == threads


def rank_rows(**waits_ms: float) -> list[dict]:
    return [{"rank": rank, "host": f"node{rank}", "step_ms": 200.0, "input_wait_ms": wait, "data_wait_ms": wait}
            for rank, wait in enumerate(waits_ms.values())]


def test_a_straggler_is_the_rank_waiting_for_its_input_longer_than_the_median_by_the_fraction():
    straggler = find_straggler(rank_rows(a=5, b=6, c=55, d=4), fraction=0.1)  # median 5.5 ms, step 200 ms
    assert (straggler.rank, straggler.host, straggler.excess_ms) == (2, "node2", 49.5)
    assert "rank 2 on node2 waited 55.0 ms per step for its input, 49.5 ms more than the median rank (25%" in \
        straggler.text
    assert find_straggler(rank_rows(a=5, b=6, c=55, d=4), fraction=0.3) is None  # 49.5 ms < 30% of 200 ms
    assert find_straggler(rank_rows(a=5, b=20), fraction=0.1) is None  # 7.5 ms over the median < 20 ms
    assert find_straggler(rank_rows(a=5), fraction=0.0) is None  # one rank: nobody to compare with
    text_rows = [{k: str(v) for k, v in row.items()} for row in rank_rows(a=1, b=90)]  # as follow reads ranks.csv
    assert find_straggler(text_rows, fraction=0.1).rank == 1


def test_follow_tells_each_new_epoch_with_a_straggler_once_and_not_the_epochs_before_the_job(tmp_path):
    def epoch_rows(epoch: int, **waits_ms: float) -> list[dict]:
        return [{**row, "epoch": epoch} for row in rank_rows(**waits_ms)]

    append_rows(tmp_path / RANKS_FILE, epoch_rows(0, a=1, b=90), RANK_COLUMNS)  # an earlier job's epoch
    out = io.StringIO()
    reporter = StragglerReporter(tmp_path, "[train 7] ", out, every_s=0)
    reporter.poll()
    append_rows(tmp_path / RANKS_FILE, epoch_rows(1, a=2, b=3) + epoch_rows(2, a=80, b=1), RANK_COLUMNS)
    reporter.poll()
    reporter.poll(final=True)
    assert out.getvalue().splitlines() == ["[train 7] epoch 2: " + find_straggler(rank_rows(a=80, b=1), 0.1).text]



def test_follow_tells_the_straggler_of_an_epoch_a_resume_redid(tmp_path):
    from pipeline.train.trainer import forget_epochs_from

    def epoch_rows(epoch: int, **waits_ms: float) -> list[dict]:
        return [{**row, "epoch": epoch} for row in rank_rows(**waits_ms)]

    append_rows(tmp_path / RANKS_FILE, epoch_rows(0, a=2, b=3) + epoch_rows(1, a=2, b=3), RANK_COLUMNS)
    out = io.StringIO()
    reporter = StragglerReporter(tmp_path, "[train 8] ", out, every_s=0)  # the requeued job, resumed at epoch 1
    forget_epochs_from(tmp_path / RANKS_FILE, 1)  # as training does before it redoes epoch 1
    reporter.poll()
    append_rows(tmp_path / RANKS_FILE, epoch_rows(1, a=2, b=90), RANK_COLUMNS)
    reporter.poll()
    reporter.poll(final=True)
    assert out.getvalue().splitlines() == ["[train 8] epoch 1: " + find_straggler(rank_rows(a=2, b=90), 0.1).text]

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process run dir, two-process run dir, launch.py's output of the latter)."""
    root = tmp_path_factory.mktemp("ranks")
    data = tiny_data(root / "data", num_classes=4, train_per_class=32, val_per_class=2)  # 8 steps on 2 ranks
    one = root / "one"
    done = run_module("jobs.train", tiny_argv(data, one, *ARGS), nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SLOW_RANK_HOOK))
    two = root / "two"
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{REPO_ROOT}")
    env.pop("OMP_NUM_THREADS", None)
    launched = subprocess.run([sys.executable, "launch.py", "--stage", "train", "--executor", "local",
                               "--procs-per-node", "2", "--preflight-timeout-s", "0",
                               *tiny_argv(data, two, *ARGS)], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    return one, two, launched.stdout


@pytest.mark.slow
def test_each_process_runs_its_share_of_the_cpus_less_its_workers(runs):
    one, two, _ = runs
    cpus = usable_cpus()
    assert [int(r["threads"]) for r in read_rows(one / RANKS_FILE)] == [max(1, cpus - 1)]  # 1 process, 1 worker
    assert [int(r["threads"]) for r in read_rows(two / RANKS_FILE)] == [max(1, cpus // 2 - 1)] * 2


@pytest.mark.slow
def test_the_slowed_rank_is_named_while_the_job_runs_and_in_the_report(runs, tmp_path):
    _, two, launched = runs
    rows = read_rows(two / RANKS_FILE)
    assert [(r["epoch"], r["rank"], r["host"]) for r in rows] == [("0", "0", socket.gethostname()),
                                                                   ("0", "1", socket.gethostname())]
    waits = [float(r["input_wait_ms"]) for r in rows]
    assert waits[1] - waits[0] > 8 * SLOW_S * 1000 / 4  # its loader worker sleeps while it computes: not all waited
    host = socket.gethostname()
    assert f"epoch 0: straggler: rank 1 on {host} waited" in launched  # launcher/follow.py, while it ran
    summary = report([two], out_dir=tmp_path / "report", echo=False).summary.iloc[0]
    assert f"straggler: rank 1 on {host}" in summary["flags"] and "(epoch 0, a straggler in 1 of 1 epoch(s))" in \
        summary["flags"]


@pytest.mark.slow
def test_the_report_flags_short_windows_and_efficiency_above_100_percent(runs, tmp_path):
    one, two, _ = runs
    slowed_base = Path(shutil.copytree(one, tmp_path / "one-held-back"))
    epochs = pd.read_csv(slowed_base / EPOCHS_FILE)
    two_fps = pd.read_csv(two / EPOCHS_FILE)["img_per_s_all_ranks"].iloc[0]
    epochs["img_per_s_all_ranks"] = epochs["img_per_s_per_rank"] = round(two_fps / 4, 2)  # held back, as
    epochs.to_csv(slowed_base / EPOCHS_FILE, index=False)  # oversubscribed CPUs held a sweep's base (673%): 200%
    result = report([slowed_base, two], out_dir=tmp_path / "report", echo=False)
    steady = int(epochs["steady_steps"].iloc[0])
    flags = result.summary.set_index("run")["flags"]
    assert flags["one-held-back"].startswith(f"short steady-state window ({steady} steps < 20, ")
    (scaling,) = result.scaling[result.scaling["world_size"] == 2].to_dict("records")
    assert scaling["efficiency_pct"] > 100
    assert scaling["flags"].startswith(f"efficiency above 100% ({scaling['efficiency_pct']:.1f}%): not a result")
    assert "this run and the base run: short steady-state window" in scaling["flags"]
    flag_section = result.markdown.split("## Flags\n\n", 1)[1]
    assert "- scaling, two at world size 2: efficiency above 100%" in flag_section
    assert "- one-held-back: short steady-state window" in flag_section
    latex = (tmp_path / "report" / "tables.tex").read_text()
    assert f"{scaling['efficiency_pct']:.1f}$^\\dagger$" in latex and "Marked: flagged, not a result" in latex
