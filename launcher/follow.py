"""Following a submitted job to its end: state changes and log lines on the terminal, never a hang.

A queued job's state comes from its backend (Slurm's: scontrol/squeue, no accounting needed), results from the
pickles submitit leaves per task; a job that ends without them is reported with its state and log.
A training rank that reports no progress for its ``hang_timeout_s`` is told with the host and rank it waits
for, read from the ranks' heartbeat files (pipeline/train/watchdog.py), whichever node's log holds the stacks.
A straggler is told at the end of each epoch that has one, from the run dir's ranks.csv
(pipeline/core/rank_figures.py).
"""
from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path
from typing import Any, Protocol, Sequence, TextIO

from launcher.backends import Backend, JobInfo, get_backend
from pipeline.core.config import ConfigError, TrainConfig, load_config
from pipeline.core.heartbeat import HEARTBEAT_DIR, Hang, diagnose, read_heartbeats
from pipeline.core.rank_figures import find_straggler
from pipeline.core.records import CONFIG_FILE, RANKS_FILE

MAX_NODES_SHOWN = 4  # a 64-node job that fails everywhere: the first few say enough
RESULT_GRACE_S = 30  # shared file systems may show the result files a little after the scheduler's state
FORGOTTEN_GRACE_S = 60  # how long a job may be unknown to Slurm (just submitted, or purged) before we give up
HEARTBEAT_POLL_S = 10  # between reads of the heartbeat files (one per rank, on a shared file system)


class StageFailed(RuntimeError):
    """A stage's job failed, was cancelled, or can never run; the message says why and where the logs are."""


@dataclasses.dataclass
class Submitted:
    stage: str
    job: Any  # submitit.Job
    executor: str  # the backend's name (launcher/backends/)

    @property
    def backend(self) -> Backend:
        return get_backend(self.executor)

    @property
    def label(self) -> str:
        return f"{self.stage} {self.job.job_id}"

    def log_paths(self) -> list[Path]:
        """stdout and stderr of the first task (node 0, where rank 0 runs)."""
        paths = self.job.task(0).paths
        return [paths.stdout, paths.stderr]

    def heartbeat_root(self) -> Path:
        """``<run dir>/logs/heartbeat``, beside the job's folder ``<run dir>/logs/<job id>``
        (launcher.executors.job_folder)."""
        return Path(self.job.paths.folder).parent / HEARTBEAT_DIR


class Poller(Protocol):
    def poll(self, final: bool = False) -> None: ...


class LogFollower:
    """Prints the lines appended to some files since the last poll, each with a prefix."""

    def __init__(self, paths: Sequence[Path], prefix: str, out: TextIO):
        self.prefix, self.out = prefix, out
        self.offsets = {Path(p): 0 for p in paths}
        self.partial = {Path(p): b"" for p in paths}

    def poll(self, final: bool = False) -> None:
        for path in self.offsets:
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offsets[path])
                    data = fh.read()
            except FileNotFoundError:
                continue
            self.offsets[path] += len(data)
            *lines, self.partial[path] = (self.partial[path] + data).split(b"\n")
            if final and self.partial[path]:
                lines.append(self.partial[path])
                self.partial[path] = b""
            for line in lines:
                self.out.write(self.prefix + line.decode(errors="replace") + "\n")
        self.out.flush()


class HangReporter:
    """Says which ranks a stalled training waits for, once per change, from the newest heartbeat folder under
    ``root`` whose name (the torchrun run id, ``<job id>-<requeues>``) starts with ``run_prefix``."""

    def __init__(self, root: Path, run_prefix: str, prefix: str, out: TextIO, every_s: float = HEARTBEAT_POLL_S):
        self.root, self.run_prefix, self.prefix, self.out, self.every_s = root, run_prefix, prefix, out, every_s
        self.next_s = 0.0
        self.told: tuple[int, ...] | None = None

    def poll(self, final: bool = False) -> None:
        if final or time.monotonic() < self.next_s:
            return
        self.next_s = time.monotonic() + self.every_s
        hang = self.report()
        if hang is None:
            self.told = None
        elif hang.silent != self.told:
            self.told = hang.silent
            self.out.write(f"{self.prefix}{hang.text}\n")
            self.out.flush()

    def report(self, now: float | None = None) -> Hang | None:
        """The silent ranks and a line naming them, while a rank reports a stall or no rank has beaten for its
        timeout (``now``: this host's clock, which only that second test uses), else None."""
        folders = sorted(self.root.glob(f"{self.run_prefix}*"), key=lambda p: p.stat().st_mtime) if \
            self.root.is_dir() else []
        beats = read_heartbeats(folders[-1]) if folders else []
        if not beats:
            return None
        stalled = [b for b in beats if b["stalled_s"] >= b["timeout_s"]]
        quiet_s = (time.time() if now is None else now) - max(b["beat_at"] for b in beats)
        if stalled:
            worst = max(stalled, key=lambda b: b["stalled_s"])
            hang = diagnose(beats)
            return Hang(hang.silent, f"hang: rank {worst['rank']} on {worst['host']} made no training progress for "
                                     f"{worst['stalled_s']:.0f} s; {hang.text}; Python stacks in the ranks' logs "
                                     f"under {self.root.parent}")
        if quiet_s > max(b["timeout_s"] for b in beats):
            return Hang(tuple(b["rank"] for b in beats), f"hang: no rank has written a heartbeat for {quiet_s:.0f} s "
                                                         f"(every process stopped, or the file system is unreachable); "
                                                         f"last: {folders[-1]}")
        return None


class StragglerReporter:
    """Says which rank held the others back, once per epoch that had a straggler, from the run dir's ranks.csv
    (rank 0 rewrites it whole at each epoch's end); epochs recorded before this job started are not told again. An
    epoch is known by its rows, not its number: a resume forgets the epochs after its checkpoint and redoes them."""

    def __init__(self, run_dir: Path, prefix: str, out: TextIO, every_s: float = HEARTBEAT_POLL_S):
        self.run_dir, self.prefix, self.out, self.every_s = run_dir, prefix, out, every_s
        self.next_s = 0.0
        self.told = {self.key(epoch, rows) for epoch, rows in self.epochs().items()}

    def epochs(self) -> dict[str, list[dict[str, str]]]:
        """ranks.csv's rows by epoch (none while it does not exist)."""
        try:
            with open(self.run_dir / RANKS_FILE, newline="") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, csv.Error, UnicodeDecodeError):
            return {}
        by_epoch: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            by_epoch.setdefault(row.get("epoch", ""), []).append(row)
        return by_epoch

    @staticmethod
    def key(epoch: str, rows: list[dict[str, str]]) -> tuple[Any, ...]:
        return (epoch, *(tuple(row.items()) for row in rows))

    def fraction(self) -> float:
        """The run's straggler_fraction, from the config.toml training wrote (the default before it has)."""
        try:
            return load_config(self.run_dir / CONFIG_FILE).train.straggler_fraction
        except ConfigError:
            return TrainConfig().straggler_fraction

    def poll(self, final: bool = False) -> None:
        if not final and time.monotonic() < self.next_s:
            return
        self.next_s = time.monotonic() + self.every_s
        new = {epoch: rows for epoch, rows in self.epochs().items() if self.key(epoch, rows) not in self.told}
        for epoch, rows in new.items():
            self.told.add(self.key(epoch, rows))
            straggler = find_straggler(rows, self.fraction())
            if straggler is not None:
                self.out.write(f"{self.prefix}epoch {epoch}: {straggler.text}\n")
                self.out.flush()


def failure_text(exc: BaseException, limit: int = 40) -> str:
    """The part of a job's error that matters: its exception line(s), not submitit's frames."""
    lines = str(exc).splitlines()
    dashed = [i for i, line in enumerate(lines) if line.startswith("-" * 10)]
    if len(dashed) >= 2:  # submitit puts the job's traceback between two dashed lines
        lines = lines[dashed[0] + 1:dashed[-1]]
    if lines and lines[0].startswith("Traceback (most recent call last)"):
        skip = ("Traceback", "During handling", "The above exception", " ", "\t")
        first = next((i for i, line in enumerate(lines) if line and not line.startswith(skip)), 0)
        lines = lines[first:]
    return "\n".join(lines[:limit]).rstrip()


def follow(sub: Submitted, out: TextIO, poll_s: float = 2.0) -> list[Any]:
    """Wait for the job while streaming its log; its results (one per task), or StageFailed."""
    backend = sub.backend
    if backend.in_process:
        return collect(sub, None)
    follower = Pollers(LogFollower(sub.log_paths(), f"[{sub.label}] ", out),
                       HangReporter(sub.heartbeat_root(), f"{sub.job.job_id}-", f"[{sub.label}] ", out),
                       StragglerReporter(sub.heartbeat_root().parent.parent, f"[{sub.label}] ", out))
    try:
        info = wait_queued(sub, backend, follower, out, poll_s) if backend.queued else \
            wait_local(sub, follower, poll_s)
    finally:
        follower.poll(final=True)
    return collect(sub, info)


class Pollers:
    def __init__(self, *pollers: Poller):
        self.pollers = pollers

    def poll(self, final: bool = False) -> None:
        for poller in self.pollers:
            poller.poll(final)


def wait_local(sub: Submitted, follower: Poller, poll_s: float) -> None:
    while not sub.job.done():
        follower.poll()
        time.sleep(poll_s)


def wait_queued(sub: Submitted, backend: Backend, follower: Poller, out: TextIO, poll_s: float) -> JobInfo | None:
    """Poll the scheduler until the job is final; None when it forgot the job but left its results."""
    last: tuple[str, int] | None = None
    unknown_since: float | None = None
    while True:
        follower.poll()
        info = backend.state(sub.job.job_id)
        if info is None:
            if all_results_exist(sub):
                return None
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > FORGOTTEN_GRACE_S:
                raise StageFailed(f"{backend.title} no longer knows job {sub.job.job_id} ({sub.stage}) and it left no "
                                  f"result; see {sub.log_paths()[1]}")
        else:
            unknown_since = None
            if (info.state, info.restarts) != last:
                last = (info.state, info.restarts)
                where = f" on {info.nodes}" if info.nodes and info.nodes != "(null)" else ""
                again = f" (requeued {info.restarts}x)" if info.restarts else ""
                out.write(f"[{sub.label}] {info.state}{where}{again}\n")
                out.flush()
            if info.final:
                return info
            if info.dependency_failed:
                raise StageFailed(f"job {sub.job.job_id} ({sub.stage}) will never start: a stage it depends on "
                                  "failed")
        time.sleep(poll_s)


def all_results_exist(sub: Submitted) -> bool:
    return all(sub.job.task(i).paths.result_pickle.exists() for i in range(sub.job.num_tasks))


def collect(sub: Submitted, info: JobInfo | None) -> list[Any]:
    """Results of every task, or StageFailed with each node's error (or log tail) and where its log is."""
    if sub.backend.in_process:
        try:
            return sub.job.results()
        except Exception as exc:  # raised in this process: shown, not re-raised as ours
            raise StageFailed(f"{sub.stage} failed:\n{failure_text(exc)}") from None
    if sub.backend.queued:  # its node's files may reach this host's view of the file system later
        deadline = time.monotonic() + (RESULT_GRACE_S if info is None or info.state == "COMPLETED" else 5)
        while not all_results_exist(sub) and time.monotonic() < deadline:
            time.sleep(1)
    failures = node_failures(sub)
    if not failures:
        return sub.job.results()
    state = f" ({info.state}, exit code {info.exit_code})" if info else ""
    shown = failures[:MAX_NODES_SHOWN] + ([f"... and {len(failures) - MAX_NODES_SHOWN} more node(s)"]
                                         if len(failures) > MAX_NODES_SHOWN else [])
    raise StageFailed(f"{sub.stage} job {sub.job.job_id} failed{state}:\n" + "\n".join(shown))


def node_failures(sub: Submitted) -> list[str]:
    """One text per task (node) that failed: its pickled error, or, without a result, its log's last lines."""
    failures = []
    for i in range(sub.job.num_tasks):
        task = sub.job.task(i)
        if not task.paths.result_pickle.exists():
            failures.append(f"node {i}: no result; last lines of {task.paths.stderr}:\n"
                            f"{tail_text(task.paths.stderr, 20)}")
            continue
        error = task.exception()
        if error is not None:
            failures.append(f"node {i}: {failure_text(error, limit=25)}\n(log: {task.paths.stderr})")
    return failures


def tail_text(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} was not written: the job may not have started)"
