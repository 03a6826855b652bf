"""What the launcher asks Slurm, with a time bound on every call and no use of accounting (sacct).

Clusters without accounting exist (the CI one is one of them): there ``sacct`` fails and submitit cannot
tell a cancelled job from a running one. Job state comes from ``scontrol show job`` (which keeps finished
jobs for MinJobAge) and ``squeue`` instead.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
from typing import Sequence

from pipeline.core.errors import UserError

CALL_TIMEOUT_S = 60
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


class SlurmError(UserError, RuntimeError):
    """Slurm refused a request or cannot be reached; the message carries Slurm's own words."""


@dataclasses.dataclass(frozen=True)
class JobInfo:
    state: str
    reason: str = ""
    nodes: str = ""
    restarts: int = 0
    exit_code: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def dependency_failed(self) -> bool:
        """A pending job whose parent failed (cancelled by kill_on_invalid_dep, or waiting forever without it)."""
        return self.state == "PENDING" and self.reason == "DependencyNeverSatisfied"


def call(args: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run a Slurm client command; a missing binary or a hang becomes a SlurmError."""
    try:
        return subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} is not on PATH: this machine has no Slurm client; use --executor local") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(args)}` did not answer within {CALL_TIMEOUT_S} s; is slurmctld up?") from None


def partitions() -> list[str]:
    """Partitions of the cluster; raises SlurmError when the controller cannot be reached."""
    result = call(["sinfo", "-h", "-o", "%P"])
    if result.returncode != 0:
        raise SlurmError(f"cannot reach the Slurm controller (sinfo: {result.stderr.strip()}); "
                         "check SLURM_CONF, or use --executor local")
    return [p.strip().rstrip("*") for p in result.stdout.split()]


def check_partition(name: str) -> None:
    known = partitions()
    if name and name not in known:
        raise SlurmError(f"partition {name!r} does not exist on this cluster; known partitions: {known}")


def node_cpus(partition: str) -> int | None:
    """CPUs of the largest node of ``partition`` (of the default partition when empty); None when sinfo cannot say
    (a dry run works without Slurm)."""
    try:
        result = call(["sinfo", "-h", "-o", "%P %c", *(["-p", partition] if partition else [])])
    except SlurmError:
        return None
    rows = [line.split() for line in result.stdout.splitlines() if len(line.split()) == 2]
    if not partition:  # the default partition is marked with a *
        rows = [row for row in rows if row[0].endswith("*")] or rows
    counts = [int(found.group()) for _, cpus in rows if (found := re.match(r"\d+", cpus))]
    return max(counts) if result.returncode == 0 and counts else None


def test_only(script: str) -> str:
    """Let sbatch validate a script without submitting it (``--test-only``); returns Slurm's estimate."""
    result = call(["sbatch", "--test-only"], stdin=script)
    if result.returncode != 0:
        raise SlurmError(result.stderr.strip() or result.stdout.strip())
    return result.stderr.strip()


def job_info(job_id: str) -> JobInfo | None:
    """State of a job from scontrol, else squeue; None when Slurm no longer knows the job."""
    result = call(["scontrol", "show", "job", "-o", job_id])
    if result.returncode == 0 and "JobState=" in result.stdout:
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout.splitlines()[0]))
        return JobInfo(state=fields["JobState"], reason=fields.get("Reason", ""), nodes=fields.get("NodeList", ""),
                       restarts=int(fields.get("Restarts", "0") or 0), exit_code=fields.get("ExitCode", ""))
    result = call(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r|%N"])
    line = result.stdout.strip().splitlines()[:1] if result.returncode == 0 else []
    if not line:
        return None
    state, reason, nodes = (line[0].split("|") + ["", ""])[:3]
    return JobInfo(state=state, reason=reason, nodes=nodes)


def cancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        call(["scancel", *job_ids])
