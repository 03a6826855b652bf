"""What a failed training or eval process leaves for its job: its error, and whether a restart can cure it.

torchrun restarts the whole group after any failure of one process. That cures a lost process (a rank killed by a
signal leaves no record here) or a lost connection (NCCL/gloo, the rendezvous store), but a model that raises,
a diverging loss or bad input fail the same way again, and the restarts' own pre-flight then reports a network
fault that hides the cause. So a process that fails writes ``attempt<k>_rank<R>.json`` (exception type and message,
host, its log) into the folder named by $JOBS_FAILURE_DIR, which TorchrunJob sets and watches: on a deterministic
failure it stops the torchrun at once and reports that record. The failing process waits for this up to
``LINGER_S`` (so torchrun's agent does not restart the group first); a process started by a restart anyway, or on
another node, finds the record and exits before doing anything (``exit_if_failed_before``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

DIR_ENV = "JOBS_FAILURE_DIR"  # set by TorchrunJob for its processes: one folder per start of the job
LINGER_S = 30.0  # a process with a deterministic failure waits this long for its job to stop the torchrun
ECHO_GRACE_S = 5.0  # a process that lost a connection waits this long for a peer's own error to appear
# RuntimeErrors of gloo/NCCL/the store that a new group can cure (torch raises some as plain RuntimeError)
CONNECTION_ERRORS = re.compile(r"Connection (refused|reset|closed)|connectFullMesh|Broken pipe|Socket Timeout|"
                               r"Transport endpoint|ncclRemoteError|ncclSystemError|unhandled system error")


def cured_by_restart(exc: BaseException) -> bool:
    """A lost connection or peer (torch's DistError family, a ConnectionError, a gloo/NCCL connection message);
    anything else a process raises (bad input, a model or loss that fails, a bug) fails the same way again."""
    dist = sys.modules.get("torch.distributed")  # loaded wherever a DistError can come from
    if isinstance(exc, ConnectionError) or (dist is not None and isinstance(exc, dist.DistError)):
        return True
    return isinstance(exc, RuntimeError) and bool(CONNECTION_ERRORS.search(str(exc)))


@dataclasses.dataclass(frozen=True)
class Failure:
    rank: int
    attempt: int  # torchrun's restart count
    host: str
    error: str  # "Type: first line of the message"
    deterministic: bool
    status: int  # the process's exit status
    log: str = ""  # the rank's own log file, when torchrun keeps one
    at: float = 0.0

    def line(self) -> str:
        return f"rank {self.rank} ({self.host}) raised {self.error}"


def error_text(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def record(exc: BaseException, status: int) -> Failure | None:
    """Write this process's failure for its job (None outside a job); the first one of an attempt only."""
    folder = os.environ.get(DIR_ENV)
    if not folder:
        return None
    from pipeline.core.atomic import atomic_write_text

    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # <torchrun log dir>/.../attempt_K/<local rank>/
    failure = Failure(rank=int(os.environ.get("RANK", "0")), attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT",
                      "0")), host=socket.gethostname(), error=error_text(exc), deterministic=not cured_by_restart(exc),
                      status=status, log=str(Path(error_file).parent / "stderr.log") if error_file else "",
                      at=time.time())
    path = Path(folder) / f"attempt{failure.attempt}_rank{failure.rank}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(dataclasses.asdict(failure)))
    return failure


def failed(exc: BaseException, status: int) -> None:
    """Record a failure for the job watching (if any). A deterministic one, or a lost connection that turns out to
    echo a peer's deterministic failure (the peer closes its sockets before it records its error), then waits
    for the job to stop this torchrun; a lost connection alone ends the process, for torchrun to restart."""
    failure = record(exc, status)
    if failure is None:
        return
    folder = os.environ[DIR_ENV]
    deadline = time.monotonic() + (0 if failure.deterministic else ECHO_GRACE_S)
    while time.monotonic() < deadline and deterministic_failure(folder) is None:
        time.sleep(0.2)
    if deterministic_failure(folder) is not None:
        time.sleep(LINGER_S)  # the job kills this process well before; if not, it exits and a restart finds it


def read_failures(folder: str | Path) -> list[Failure]:
    """Every record in ``folder``: the first attempt first, its deterministic failures first, then by time."""
    found = []
    for path in Path(folder).glob("attempt*_rank*.json"):
        try:
            found.append(Failure(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # being replaced, or not ours
    return sorted(found, key=lambda f: (f.attempt, not f.deterministic, f.at))


def deterministic_failure(folder: str | Path) -> Failure | None:
    return next((f for f in read_failures(folder) if f.deterministic), None)


def exit_if_failed_before() -> None:
    """In a process of a job whose group already failed deterministically: say so and exit, before any work."""
    folder = os.environ.get(DIR_ENV)
    failure = deterministic_failure(folder) if folder else None
    if failure is not None:
        print(f"{failure.line()} (attempt {failure.attempt}); a restart fails the same way, so this one does "
              "nothing", file=sys.stderr, flush=True)
        raise SystemExit(failure.status)


def report(failure: Failure, where: str, lines: int = 15) -> str:
    """The job's message for a deterministic failure: the error first, then the rank's log and its last lines."""
    text = (f"{where}: {failure.line()} (attempt {failure.attempt}); not restarted: a restart fails the same way "
            "(restarts are for lost processes and connections)")
    if not failure.log:
        return text
    try:
        last = "".join(Path(failure.log).read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        last = "(not readable from this node)\n"
    return f"{text}\nIts log: {failure.log}\nLast lines:\n{last}"
