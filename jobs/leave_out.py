"""Hosts a failed pre-flight named, left out of the job's requeue.

When the pre-flight names the hosts whose ranks never answered or never finished its all-reduce (``hosts`` in its
failed.json), the job's first node records them in ``<run dir>/excluded_hosts.json`` and requeues the job without
them. On Slurm a running job's ExcNodeList cannot change, so it is ``scontrol requeue`` first, then ``scontrol
update ExcNodeList=...`` while the job completes, before it may start again (the hosts of earlier requeues of the
same job included: the update replaces the list). Not done, and the job fails with the pre-flight's message as
before, beyond ``--max-excluded-hosts`` hosts for one job, when every host of a multi-node job is named (a fault
of the network or of the config, not of a node), or on a scheduler that cannot requeue (local).
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from jobs.job_env import JobEnv
from pipeline.core.atomic import atomic_write_text

log = logging.getLogger("jobs.node")

EXCLUDED_FILE = "excluded_hosts.json"  # in the run dir: {"schema": 1, "hosts": [{host, job, reason, at}, ...]}
SCHEMA = 1
CALL_TIMEOUT_S = 60
UPDATE_WITHIN_S = 20  # how long to keep asking Slurm to take the excluded nodes after the requeue, s


class Requeued(SystemExit):
    """This job was requeued without the named hosts: its process ends here, as submitit's own requeue does
    (no result is written; the requeued job writes it)."""


def named_hosts(marker: Path) -> list[str]:
    """The hosts a failed pre-flight named in its failed.json."""
    try:
        return [str(host) for host in json.loads(marker.read_text()).get("hosts", [])]
    except (OSError, ValueError):
        return []


def read_excluded(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every host left out so far, each with the job that left it out, why and when (oldest first)."""
    try:
        return list(json.loads((Path(run_dir) / EXCLUDED_FILE).read_text())["hosts"])
    except (OSError, ValueError, KeyError):
        return []


def scontrol(*args: str) -> str:
    """Run scontrol; its error text, empty on success."""
    result = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
    return "" if result.returncode == 0 else (result.stderr or result.stdout).strip() or f"status {result.returncode}"


def slurm_requeue_excluding(job_id: str, hosts: Sequence[str]) -> None:
    """Requeue the running job, then set its excluded nodes as soon as Slurm takes them (once it is no longer
    running: at once, or within a few seconds), before the job may start again."""
    error = scontrol("requeue", job_id)
    if error:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {error}")
    deadline = time.monotonic() + UPDATE_WITHIN_S
    while error := scontrol("update", f"JobId={job_id}", f"ExcNodeList={','.join(hosts)}"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} was requeued, but Slurm did not take ExcNodeList={','.join(hosts)} "
                               f"within {UPDATE_WITHIN_S} s: {error}")
        time.sleep(0.2)


REQUEUE_EXCLUDING: dict[str, Callable[[str, Sequence[str]], None]] = {"slurm": slurm_requeue_excluding}


def why_not(hosts: Sequence[str], job_hosts: Sequence[str], excluded: Sequence[str], cluster: str,
            limit: int) -> str:
    """Why the named hosts are not left out of a requeue; empty when they are."""
    if not hosts:
        return "the pre-flight named no host"
    if cluster not in REQUEUE_EXCLUDING:
        return f"a {cluster} job cannot be requeued without a host"
    if len(job_hosts) > 1 and set(job_hosts) <= set(hosts):
        return "it named every host of the job: a fault of the network or the config, not of a node"
    total = sorted(set(excluded) | set(hosts))
    if len(total) > limit:
        return (f"leaving out {', '.join(total)} would make {len(total)} hosts, more than --max-excluded-hosts "
                f"{limit}")
    return ""


def leave_out_and_requeue(run_dir: str | Path, env: JobEnv, marker: Path, limit: int) -> str:
    """On the job's first node: requeue the job without the hosts its failed pre-flight named (raises Requeued),
    recorded in the run dir; other nodes end too (Requeued), as the first one requeues. Returns why it did not."""
    hosts = named_hosts(marker)
    earlier = [row["host"] for row in read_excluded(run_dir) if row.get("job") == env.unique_id]
    reason = why_not(hosts, env.hostnames, earlier, env.cluster, limit)
    if reason:
        return reason
    if env.node != 0:
        raise Requeued(-1)
    message = json.loads(marker.read_text()).get("message", "")
    rows = read_excluded(run_dir) + [{"host": host, "job": env.unique_id, "reason": message, "at": time.time()}
                                     for host in hosts if host not in earlier]
    leave = sorted(set(earlier) | set(hosts))
    atomic_write_text(Path(run_dir) / EXCLUDED_FILE, json.dumps({"schema": SCHEMA, "hosts": rows}, indent=2) + "\n")
    REQUEUE_EXCLUDING[env.cluster](env.unique_id, leave)
    log.warning("the pre-flight named %s: job %s requeued without %s (%d of at most %d hosts; %s)",
                ", ".join(hosts), env.unique_id, ",".join(leave), len(leave), limit,
                Path(run_dir) / EXCLUDED_FILE)
    raise Requeued(-1)
