"""Hang diagnosis: a rank without progress dumps its stacks and names whom it waits for; follow names them too.

The real case: two processes under torchrun (gloo, CPU); rank 1 is stopped (SIGSTOP), so rank 0 waits in a
collective. Nothing in the code under test knows about the test.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from jobs.torchrun import TorchrunJob, child_pids
from launcher.backends import get_backend
from launcher.follow import HEARTBEAT_POLL_S, HangReporter, StageFailed, Submitted, follow
from pipeline.train.tracking import TENSORBOARD_DIR
from pipeline.core.heartbeat import HEARTBEAT_DIR, diagnose, read_heartbeats
from pipeline.train.watchdog import HANG_MARKER, HangWatch
from test_torchrun import worker_with_rank
from train_helpers import start_module, tiny_argv, tiny_config, tiny_data

HOST = socket.gethostname().split(".")[0]
TIMEOUT_S = 4


def beat(rank: int, steps: int, at: float, world: int = 3) -> dict:
    return {"rank": rank, "world_size": world, "host": f"node{rank}", "pid": 100 + rank, "steps": steps,
            "stalled_s": 0.0, "timeout_s": 60, "interval_s": 6.0, "beat_at": at}


def test_diagnose_names_stopped_ranks_first_then_ranks_behind_then_none():
    stopped = diagnose([beat(0, 12, 1000), beat(1, 12, 970), beat(2, 12, 999)])
    assert stopped.silent == (1,) and "rank 1 on node1 (pid 101, no heartbeat for 30 s, after 12 steps" in stopped.text
    behind = diagnose([beat(0, 12, 1000), beat(1, 11, 998), beat(2, 12, 999)])
    assert behind.silent == (1,) and behind.text.startswith("behind: rank 1 on node1 (pid 101) at 11 steps")
    missing = diagnose([beat(0, 12, 1000), beat(2, 12, 999)])
    assert missing.silent == (1,) and "rank 1 (no heartbeat yet" in missing.text
    assert diagnose([beat(r, 12, 1000 - r) for r in range(3)]).silent == ()


def test_a_watched_process_dumps_every_thread_only_when_it_stops_making_progress(tmp_path, caplog):
    log_file = tmp_path / "rank0.log"
    with open(log_file, "w+") as stream, caplog.at_level(logging.ERROR, logger="pipeline.train.watchdog"):
        watch = HangWatch(1.0, tmp_path / "beats", rank=0, world_size=1, stream=stream)
        watch.start()
        try:
            for _ in range(10):  # progress every 0.2 s for 2 s: no dump
                watch.beat()
                time.sleep(0.2)
            assert log_file.read_text() == "" and not caplog.records
            time.sleep(2.2)  # no progress for over twice the timeout
        finally:
            watch.stop()
    stacks = log_file.read_text()
    assert stacks.count("most recent call first") >= 2  # this thread and the watchdog's, once or twice
    assert "test_a_watched_process_dumps_every_thread" in stacks  # where this (main) thread sleeps
    assert HANG_MARKER in caplog.records[0].getMessage() and "after 10 steps" in caplog.records[0].getMessage()
    assert json.loads((tmp_path / "beats" / "rank0.json").read_text())["steps"] == 10


class LineReader:
    """The lines of a process's stderr, read by a thread so a test can wait with a deadline."""

    def __init__(self, stream):
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(stream), daemon=True).start()

    def wait_for(self, marker: str, deadline_s: float, after: int = 0) -> int:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            found = [i for i, line in enumerate(self.lines) if i >= after and marker in line]
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no {marker!r} within {deadline_s} s:\n{''.join(self.lines[-40:])}")


@pytest.mark.slow
def test_a_stopped_rank_makes_the_other_dump_its_stacks_and_follow_names_it(tmp_path):
    data_dir = tiny_data(tmp_path / "data", num_classes=4, train_per_class=32, val_per_class=2)
    run_dir = tmp_path / "run"
    proc = start_module("jobs.train", tiny_argv(data_dir, run_dir, "--epochs", "50", "--hang-timeout-s",
                                                str(TIMEOUT_S)), nproc=2)
    stopped = None
    try:
        out = LineReader(proc.stderr)
        out.wait_for("Epoch: [0] [2/8]", 120)
        stopped = worker_with_rank(proc.pid, 1)
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        at = out.wait_for(HANG_MARKER, TIMEOUT_S + 20)
        waited_s = time.monotonic() - start
        marker = out.lines[at]
        assert f"[{HOST} rank 0] ERROR" in marker and f"silent: rank 1 on {HOST} (pid {stopped}" in marker
        assert TIMEOUT_S - 1 <= waited_s <= TIMEOUT_S + 10
        out.wait_for("most recent call first", 10, after=at)
        out.wait_for("pipeline/train/loop.py", 10, after=at)  # rank 0's main thread, inside a training step
        reporter = HangReporter(run_dir / "logs" / HEARTBEAT_DIR, "", "[train 1] ", io.StringIO(), every_s=0)
        reporter.poll()
        told = reporter.out.getvalue()
        assert told.startswith(f"[train 1] hang: rank 0 on {HOST} made no training progress for ")
        assert f"silent: rank 1 on {HOST} (pid {stopped}" in told
        assert len(list((run_dir / TENSORBOARD_DIR).iterdir())) == 1  # rank 0 alone writes events

        os.kill(stopped, signal.SIGCONT)
        stopped = None
        out.wait_for("Epoch: [", 60, after=len(out.lines))  # training goes on
        time.sleep(2)  # a heartbeat or more later
        assert reporter.report() is None
        assert {b["rank"] for b in read_heartbeats(next((run_dir / "logs" / HEARTBEAT_DIR).iterdir()))} == {0, 1}
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        workers = child_pids(proc.pid)
        proc.terminate()  # torchrun passes it on: the workers save and stop
        try:
            proc.wait(timeout=60)
        except Exception:
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            raise


def descendants(pid: int) -> list[int]:
    return [p for child in child_pids(pid) for p in (child, *descendants(child))]


def descendant_with_rank(pid: int, rank: int) -> int | None:
    """The training process of ``rank`` below ``pid`` (any depth), from its environment."""
    for child in child_pids(pid):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return child
        except OSError:
            continue
        found = descendant_with_rank(child, rank)
        if found is not None:
            return found
    return None


def follow_until_cancelled(sub: Submitted, out: io.StringIO) -> None:
    try:
        follow(sub, out, poll_s=0.5)
    except StageFailed:  # cancelled at the test's end
        pass


@pytest.mark.slow
def test_the_launchers_follow_output_names_the_stopped_rank_and_its_host(tmp_path):
    """launch.py's own path: a local-executor job running torchrun, followed as launch.py follows it."""
    data_dir = tiny_data(tmp_path / "data", num_classes=4, train_per_class=32, val_per_class=2)
    cfg = tiny_config(data_dir, tmp_path / "run", "--epochs", "50", "--hang-timeout-s", str(TIMEOUT_S))
    cfg.launch.gpus_per_node, cfg.launch.preflight_timeout_s = 2, 0
    local = get_backend("local")
    executor = local.executor(cfg, local.parameters(cfg, "train"))
    sub = Submitted("train", executor.submit(TorchrunJob("train", cfg)), "local")
    out = io.StringIO()
    following = threading.Thread(target=follow_until_cancelled, args=(sub, out), daemon=True)
    stopped = None
    try:
        following.start()
        deadline = time.monotonic() + 120
        while "Epoch: [0] [2/8]" not in out.getvalue():
            assert time.monotonic() < deadline, out.getvalue()[-3000:]
            time.sleep(0.2)
        stopped = descendant_with_rank(int(sub.job.job_id), 1)
        os.kill(stopped, signal.SIGSTOP)
        deadline = time.monotonic() + TIMEOUT_S + HEARTBEAT_POLL_S + 20
        while "] hang: " not in out.getvalue():
            assert time.monotonic() < deadline, out.getvalue()[-3000:]
            time.sleep(0.2)
        (told,) = [line for line in out.getvalue().splitlines() if "] hang: " in line]
        assert told.startswith(f"[train {sub.job.job_id}] hang: rank 0 on {HOST} made no training progress for ")
        assert f"silent: rank 1 on {HOST} (pid {stopped}" in told
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        for pid in descendants(int(sub.job.job_id)):  # torchrun would wait for its workers to finish their epochs
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sub.job.cancel()
        following.join(timeout=60)
