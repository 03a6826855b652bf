"""One writer per run dir: a second training is refused at once, naming the first; a dead holder's run is free."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline.core.dir_lock import LOCK_FILE, RunDirBusyError, locked
from train_helpers import REPO_ROOT, run_module, start_module, tiny_argv, tiny_data, wait_for_line

HOLD = """\
import os, sys, time
from pipeline.core.dir_lock import locked
with locked(sys.argv[1], "training"):
    worker = os.fork()  # as rank 0's DataLoader workers are: they outlive a killed rank 0 by a few seconds
    if worker:
        print("held", worker, flush=True)
    time.sleep(300)
"""


def test_the_lock_names_its_holder_and_is_free_once_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        words = holder.stdout.readline().split()
        assert words[0] == "held"
        worker = int(words[1])
        with pytest.raises(RunDirBusyError) as busy, locked(tmp_path, "training"):
            pass
        assert str(busy.value).startswith(f"run dir {tmp_path} is in use by training on host "
                                          f"{socket.gethostname()}, pid {holder.pid}, started 20")
        assert "\n" not in str(busy.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # as a node failure or Slurm's kill ends it: no cleanup runs
        holder.wait()
    try:
        with locked(tmp_path, "training"):  # the requeued job of the same run, while the holder's worker lives on
            assert f"pid {os.getpid()}," in (tmp_path / LOCK_FILE).read_text()
    finally:
        os.kill(worker, signal.SIGKILL)


@pytest.mark.slow
def test_a_second_training_into_a_busy_run_dir_is_refused_at_once_and_a_requeue_takes_the_run(tmp_path):
    data = tiny_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    first = start_module("jobs.train", tiny_argv(data, run_dir, "--epochs", "50"))
    try:
        wait_for_line(first, "training resnet18")
        started = time.monotonic()
        second = run_module("jobs.train", tiny_argv(data, run_dir, "--epochs", "50"), timeout_s=120)
        assert second.returncode == 2 and time.monotonic() - started < 60
        assert second.stderr.splitlines()[-1] == (
            f"jobs.train: error: run dir {run_dir} is in use by "
            f"{(run_dir / LOCK_FILE).read_text().strip()} (it holds {run_dir / LOCK_FILE}; removing that file does "
            "not stop it); wait for it to end, stop it, or pass another --run-dir")
        assert f"pid {first.pid}," in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    requeued = run_module("jobs.train", tiny_argv(data, run_dir, "--epochs", "1", "--resume", "auto"))
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"pid {first.pid}," not in (run_dir / LOCK_FILE).read_text()


def test_a_lock_file_that_is_a_folder_is_one_line(tmp_path):
    (tmp_path / LOCK_FILE).mkdir()
    with pytest.raises(RunDirBusyError, match=f"cannot open the lock file {tmp_path / LOCK_FILE} of run dir "
                                              f"{tmp_path} .*move what is there away"), locked(tmp_path, "training"):
        pass


def test_a_file_system_without_locks_is_said_and_the_writer_goes_on(tmp_path, monkeypatch, caplog):
    """NFS without lockd answers ENOLCK, Lustre without its flock option ENOSYS: the run is not stopped for it."""
    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    ran = False
    with caplog.at_level(logging.WARNING), locked(tmp_path, "training"):
        ran = True
    assert ran and "its file system takes no locks (No locks available)" in caplog.text


def test_a_lock_file_linked_elsewhere_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(victim)
    with pytest.raises(RunDirBusyError, match="cannot open the lock file .*symbolic links"), \
            locked(tmp_path / "run", "training"):
        pass
    assert victim.read_text() == "keep me\n"
