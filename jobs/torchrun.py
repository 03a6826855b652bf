"""One node of a torchrun job: the command it runs, and the submitit callable that runs it.

A job of N nodes is N submitit tasks, one per node; each task starts one torchrun with a static
rendezvous on the first host of the allocation, so global rank = node rank * P + local rank and
rank 0 (the one that writes checkpoints and tables) is on the first node (one node: ``--rdzv-endpoint
localhost:0``, torchrun binds a free port itself; a port picked here and bound later by torchrun could be taken
in between. Not ``--standalone``: it replaces the run id, which names the heartbeat folders the launcher reads)::

    python -m torch.distributed.run --nnodes N --nproc-per-node P --node-rank K \\
        --master-addr <first host> --master-port <port from the job id> --rdzv-id <job id> \\
        --max-restarts R --log-dir <run dir>/logs/<job id>/node<K> --tee 3 -m jobs.train --config ...

Requeue: Slurm sends USR2 ``signal_delay_s`` before the time limit (or on ``scancel --signal=USR2``);
submitit calls ``checkpoint()`` on the first task, which asks the training processes to save (SIGUSR1:
they agree on a step boundary, write latest.pt and exit 0), waits for them within a bound, and returns
itself for the requeue. The requeued job derives a fresh port from its restart count and resumes
(resume = auto, or the path given to --resume until the job has saved a checkpoint: jobs/resume.py). USR2
itself is ignored below torchrun: its default action would kill the workers.

Failures: torchrun restarts the group (``--max-restarts``) only for what a restart can cure, a lost process or
connection; a process that raises anything else records it (jobs/failures.py), this job stops the torchrun at once
and its error names that rank's exception instead of what the restarts would have said.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from jobs import failures
from jobs.job_env import JobEnv, job_env
from jobs.leave_out import leave_out_and_requeue
from jobs.preflight import FAILED_FILE, preflight_env
from jobs.resume import resume_for_this_start
from pipeline.core.config import Config, save_config
from pipeline.core.stages import STAGES
from pipeline.core.threads import threads_per_process, usable_cpus

log = logging.getLogger("jobs.node")

REPO_ROOT = Path(__file__).resolve().parents[1]
PORT_BASE, PORT_SPAN = 20000, 12000  # below Linux's ephemeral range (32768+)


class WorkerFailedError(RuntimeError):
    """A training or eval process failed beyond torchrun's restarts; the message names rank and log file."""


@dataclasses.dataclass(frozen=True)
class Rendezvous:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int  # the stage's torchrun (master_port + 1 stays free, as earlier pre-flights used it); 0: one node
    job_id: str
    restarts: int = 0  # times the scheduler requeued the job
    nonce: str = ""  # one node: tells this start from an earlier one of the same job and restart count

    @property
    def run_id(self) -> str:
        return "-".join(part for part in (self.job_id, str(self.restarts), self.nonce) if part)

    @property
    def master(self) -> str:
        return f"{self.master_addr}:{self.master_port}" if self.nnodes > 1 else "localhost, a port torchrun binds"


def rendezvous_port(job_id: str, restart_count: int) -> int:
    """An even port every node derives alike from the job id; each requeue (restart) gets a fresh one."""
    number = int(re.sub(r"\D", "", job_id) or 0)
    return PORT_BASE + (number * 16 + 2 * restart_count) % PORT_SPAN


def node_rendezvous(env: JobEnv) -> Rendezvous:
    """This node's place in the job (jobs/job_env.py: what the job knows about itself)."""
    if env.num_nodes == 1:  # torchrun binds the port: none to agree on; a fresh id keeps starts' files apart
        return Rendezvous(1, 0, "127.0.0.1", 0, env.job_id, env.restarts, nonce=uuid.uuid4().hex[:8])
    # the port from the job's own number (an array task's, not "<array>_<task>")
    return Rendezvous(env.num_nodes, env.node, env.hostnames[0], rendezvous_port(env.unique_id, env.restarts),
                      env.job_id, env.restarts)


def node_hosts(env: JobEnv) -> list[str]:
    """Host of each node rank in the scheduler's names (those it can leave out of a requeue), for messages that
    name the node a silent rank lives on."""
    return list(env.hostnames)


def torchrun_command(*, nnodes: int, nproc_per_node: int, node_rank: int | str, master_addr: str,
                     master_port: int | str, run_id: str, max_restarts: int, log_dir: str | Path, module: str,
                     args: Sequence[str]) -> list[str]:
    """The command one node runs; the same on every node but for --node-rank (placeholders allowed for display).
    One node: torchrun binds a free port for its rendezvous itself (``master_*`` unused)."""
    where = (["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"] if nnodes == 1 else
             ["--node-rank", str(node_rank), "--master-addr", master_addr, "--master-port", str(master_port)])
    rendezvous = [*where, "--rdzv-id", run_id]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
           "--nproc-per-node", str(nproc_per_node), *rendezvous,
           "--max-restarts", str(max_restarts), "--log-dir", str(log_dir), "--tee", "3",
           "--log-line-prefix-template", "[rank${rank}]: "]
    return cmd + ["-m", module, *args]


def node_command(rdzv: Rendezvous, **kwargs: Any) -> list[str]:
    """torchrun_command for this node's place in the job."""
    return torchrun_command(nnodes=rdzv.nnodes, node_rank=rdzv.node_rank, master_addr=rdzv.master_addr,
                            master_port=rdzv.master_port, run_id=rdzv.run_id, **kwargs)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the worker processes of a torchrun), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def _preemption_signal() -> signal.Signals:
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


@contextlib.contextmanager
def preemption_signal_ignored() -> Iterator[None]:
    """USR2 ignored in this process while a child starts: the child (torchrun, and its workers) inherits SIG_IGN,
    which survives exec. Done here rather than in a preexec_fn, which is unsafe with threads running; a USR2 in
    the few milliseconds of the fork is lost, Slurm sends it ``signal_delay_s`` (minutes) before the limit."""
    signum = _preemption_signal()
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def process_env(nproc_per_node: int, workers: int = 0) -> dict[str, str]:
    """The children's environment: this repo importable, OpenMP threads as each process will set them itself
    (pipeline/core/threads.py: its share of the CPUs less its loader workers), not torchrun's 1."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = str(threads_per_process(usable_cpus(), nproc_per_node, workers))
    return env


class RunningTorchrun:
    """A torchrun child: its stderr copied to ours with a tail kept for the error report.

    The exit code is set by a reaper thread and read as a plain attribute, so the signal handler that
    calls checkpoint() never waits on a lock the interrupted main thread may hold.
    """

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.tail: collections.deque[str] = collections.deque(maxlen=300)
        self.returncode: int | None = None
        with preemption_signal_ignored():
            self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                                         bufsize=1)
        self._threads = [threading.Thread(target=self._copy_stderr, daemon=True),
                         threading.Thread(target=self._reap, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _copy_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.tail.append(line)
            sys.stderr.write(line)
            sys.stderr.flush()

    def _reap(self) -> None:
        self.returncode = self.proc.wait()

    def wait(self, timeout_s: float | None = None, until: Callable[[], bool] = lambda: False) -> int | None:
        """Exit code, or None when ``timeout_s`` passed or ``until()`` came true first; sleeps instead of blocking
        in waitpid."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.returncode is None and (deadline is None or time.monotonic() < deadline) and not until():
            time.sleep(0.2)
        if self.returncode is not None:
            for thread in self._threads:
                thread.join(timeout=5)
        return self.returncode

    def signal_workers(self, signum: int) -> list[int]:
        pids = child_pids(self.proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        return pids

    def kill(self) -> None:
        """Workers first: killed alone, torchrun would leave them waiting on their peers."""
        self.signal_workers(signal.SIGKILL)
        self.proc.kill()


def failure_report(what: str, returncode: int, tail: Sequence[str], log_dir: Path, rdzv: Rendezvous,
                   max_restarts: int, first: failures.Failure | None = None) -> str:
    """Name the first failed rank, its exit code and its log file, from torchrun's own summary; and the first
    error a process raised (``first``), which the restarts may have hidden."""
    text = "".join(tail)
    root = text.split("Root Cause", 1)[-1]
    rank = re.search(r"rank\s*:\s*(\d+) \(local_rank: (\d+)\)", root)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    where = f"{what} failed on node {rdzv.node_rank} ({socket.gethostname()})"
    if first is not None:
        where += f" (first error: {first.line()}, attempt {first.attempt})"
    if not rank:
        last = "".join(tail[-20:])
        return f"{where}: torchrun exited with code {returncode}; its last lines:\n{last}"
    local_rank = rank.group(2)
    logs = sorted(log_dir.glob(f"*/attempt_*/{local_rank}/stderr.log"), key=lambda p: p.stat().st_mtime)
    log_file = logs[-1] if logs else log_dir
    last_lines = "".join(logs[-1].read_text(errors="replace").splitlines(keepends=True)[-15:]) if logs else ""
    return (f"{where}: rank {rank.group(1)} (local rank {local_rank}) exited with code "
            f"{code.group(1) if code else '?'} after {max_restarts} restart(s) (--max-restarts {max_restarts}).\n"
            f"Its log: {log_file}\nLast lines:\n{last_lines}")


def setup_node_logging(node_rank: int) -> None:
    """Node-level lines (not a training rank) in the task's log, once per process."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    host = socket.gethostname().split(".")[0]
    handler.setFormatter(logging.Formatter(f"%(asctime)s [{host} node {node_rank}] %(levelname)s %(name)s: "
                                           "%(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class TorchrunJob:
    """Submitit callable for train and eval: one per node, each running one torchrun.

    ``cfg`` travels in the pickle (a requeue reuses it unchanged); it is written into the job's log
    folder as the ``--config`` of the processes.
    """

    def __init__(self, stage: str, cfg: Config, module: str | None = None):
        self.stage = stage
        self.cfg = cfg
        self.module = module or STAGES[stage].entry
        self._running: RunningTorchrun | None = None

    @property
    def graceful_stop(self) -> bool:
        """Training saves on SIGUSR1 before a requeue (and runs the pre-flight first); eval simply starts over."""
        return STAGES[self.stage].on_preemption == "save"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_running"] = None
        return state

    def __call__(self) -> dict[str, Any]:
        job = job_env()
        rdzv = node_rendezvous(job)
        setup_node_logging(rdzv.node_rank)
        launch = self.cfg.launch
        job_dir = Path(self.cfg.train.run_dir) / "logs" / rdzv.job_id
        config_path = job_dir / f"{self.stage}_config.toml"
        save_config(resume_for_this_start(self.cfg, job_dir) if self.graceful_stop else self.cfg, config_path)
        nproc = launch.gpus_per_node
        env = process_env(nproc, self.cfg.data.workers)
        world = rdzv.nnodes * nproc
        log.info("%s: node %d of %d, %d processes here, world size %d, rendezvous %s, config %s",
                 self.stage, rdzv.node_rank, rdzv.nnodes, nproc, world, rdzv.master, config_path)
        preflight_dir = job_dir / f"preflight-{rdzv.run_id}"
        if world > 1 and self.graceful_stop and launch.preflight_timeout_s > 0:
            env.update(preflight_env(preflight_dir, node_hosts(job)))
            log.info("each training process first runs the pre-flight: an all-reduce over %d ranks, bounded by %d s",
                     world, launch.preflight_timeout_s)
        log_dir = job_dir / f"node{rdzv.node_rank}"
        failure_dir = job_dir / f"failures-{rdzv.run_id}"
        env[failures.DIR_ENV] = str(failure_dir)
        cmd = node_command(rdzv, nproc_per_node=nproc, max_restarts=launch.max_restarts, log_dir=log_dir,
                           module=self.module, args=["--config", str(config_path)])
        log.info("running: %s", shlex.join(cmd))
        returncode = self.run(cmd, env, until=lambda: failures.deterministic_failure(failure_dir) is not None)
        where = f"{self.stage} failed on node {rdzv.node_rank} ({socket.gethostname()})"
        failure = failures.deterministic_failure(failure_dir)
        if failure is not None:
            raise WorkerFailedError(failures.report(failure, where))
        if returncode != 0:
            assert self._running is not None
            what = "pre-flight" if (preflight_dir / FAILED_FILE).exists() else self.stage
            kept = (leave_out_and_requeue(self.cfg.train.run_dir, job, preflight_dir / FAILED_FILE,
                                          launch.max_excluded_hosts) if what == "pre-flight" else "")
            first = failures.read_failures(failure_dir)
            report = failure_report(what, returncode, list(self._running.tail), log_dir, rdzv, launch.max_restarts,
                                    first[0] if first else None)
            raise WorkerFailedError(f"{report}\nno requeue without the named hosts: {kept}" if kept else report)
        return {"stage": self.stage, "node": rdzv.node_rank, "host": socket.gethostname(), "world_size": world,
                "log_dir": str(log_dir)}

    def run(self, cmd: list[str], env: dict[str, str], timeout_s: float | None = None,
            until: Callable[[], bool] = lambda: False) -> int | None:
        """Run one torchrun to its end (None if ``timeout_s`` passed or ``until()`` came true: then it is killed)."""
        self._running = RunningTorchrun(cmd, env)
        returncode = self._running.wait(timeout_s, until)
        if returncode is None:
            self._running.kill()
            self._running.wait(10)
        return returncode

    def checkpoint(self) -> Any:
        """Called by submitit on the preemption signal: let training save, then requeue this same job."""
        import submitit

        running = self._running
        if running is not None and running.returncode is None and self.graceful_stop:
            pids = running.signal_workers(signal.SIGUSR1)
            bound_s = max(self.cfg.launch.signal_delay_s - 10, 5)
            log.info("preemption: asked %d training process(es) %s to save a checkpoint; waiting up to %d s",
                     len(pids), pids, bound_s)
            if running.wait(bound_s) is None:
                log.warning("training did not stop within %d s; requeueing anyway, it resumes from the "
                            "newest valid checkpoint", bound_s)
            else:
                log.info("training stopped (exit code %s); requeueing", running.returncode)
        return submitit.helpers.DelayedSubmission(self)
