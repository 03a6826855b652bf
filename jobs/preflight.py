"""Pre-flight of a multi-process job: one all-reduce over every rank, bounded, before training starts.

A job runs it inside its training torchrun: each training process does the check first (``before_training``,
asked for by TorchrunJob through $JOBS_PREFLIGHT_DIR and $JOBS_PREFLIGHT_HOSTS), then leaves the group and trains,
so the job pays for one torchrun and one import of torch per process, not two. Standalone, for a test or by hand::

    torchrun --nnodes 2 --nproc-per-node 4 ... -m jobs.preflight --config C \\
        --timeout-s 120 --heartbeat-dir <run dir>/logs/<job>/preflight-<run id> --hosts node1,node2

Each process logs the environment that decides whether the job can communicate (host, ranks,
MASTER_ADDR/PORT, backend, NCCL_*/HCCL_*/GLOO_* variables, versions) and drops a heartbeat file in the
shared run dir; then all ranks join the process group and sum a tensor. A watchdog thread logs who has
answered every few seconds and, past the timeout, exits with a message naming the ranks (and their
hosts) that did not, instead of hanging in the collective. A failure inside training is written to ``failed.json``
in the job's pre-flight folder; torchrun's restarts of the group then stop at once with the same message instead
of waiting out the timeout again (heartbeats go to one ``attempt<k>`` folder per restart).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from jobs.common import get_args_parser
from jobs.job_env import job_env
from pipeline.core.config import ConfigError, config_from_args

log = logging.getLogger("jobs.preflight")

ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "HCCL_", "ASCEND_", "GLOO_", "TORCH_DISTRIBUTED_", "TORCHELASTIC_",
                "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MASTER_")
EXIT_NO_ANSWER = 3  # a rank did not answer within the timeout
EXIT_WRONG_SUM = 4  # the all-reduce returned a wrong value
DIR_ENV, HOSTS_ENV = "JOBS_PREFLIGHT_DIR", "JOBS_PREFLIGHT_HOSTS"  # set by TorchrunJob for its training processes
FAILED_FILE = "failed.json"  # in the job's pre-flight folder: a failure its restarts repeat without waiting


def preflight_env(folder: str | Path, hosts: Sequence[str]) -> dict[str, str]:
    """The variables that make each training process run the pre-flight first (see ``before_training``)."""
    return {DIR_ENV: str(folder), HOSTS_ENV: ",".join(hosts)}


def record_failure(marker: Path | None, code: int, message: str, hosts: Sequence[str] = ()) -> None:
    """failed.json: the exit status, the message and the hosts it names (jobs/leave_out.py leaves them out)."""
    if marker is not None:
        from pipeline.core.atomic import atomic_write_text

        atomic_write_text(marker, json.dumps({"code": code, "message": message, "hosts": list(hosts)}))


def environment_record(backend: str, device: Any) -> dict[str, Any]:
    """What this process sees: identity (its job's, jobs/job_env.py), rendezvous, backend, communication variables,
    versions."""
    import torch

    job = job_env()
    record: dict[str, Any] = {
        "host": socket.gethostname(), "pid": os.getpid(), "job_id": job.job_id, "node": job.node,
        **{key.lower(): os.environ.get(key, "") for key in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
        "backend": backend, "device": str(device), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda or "",
        "variables": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
    }
    if device.type != "cpu":
        from pipeline.core.accelerator import Accelerator

        accelerator = Accelerator.of(device)
        record.update(device_name=accelerator.name(), **accelerator.versions())
    return record


def summary(record: dict[str, Any]) -> str:
    """One log line per rank; the whole record goes to the heartbeat file."""
    comm = {k: v for k, v in record["variables"].items() if k.startswith(("NCCL_", "HCCL_", "GLOO_"))}
    return (f"host {record['host']} rank {record['rank']}/{record['world_size']} local rank "
            f"{record['local_rank']}/{record['local_world_size']} master {record['master_addr']}:"
            f"{record['master_port']} backend {record['backend']} device {record['device']} torch {record['torch']} "
            f"cuda {record['cuda'] or 'none'} nccl {record.get('nccl', 'none')} torch_npu "
            f"{record.get('torch_npu', 'none')} cann {record.get('cann') or 'none'}; NCCL/HCCL/GLOO variables: "
            f"{comm or 'none set'}")


class Watchdog(threading.Thread):
    """Reports arrivals every ``every_s`` and ends the process, naming the silent ranks, after ``timeout_s``."""

    def __init__(self, folder: Path, rank: int, world_size: int, local_world_size: int, hosts: Sequence[str],
                 timeout_s: float, every_s: float, marker: Path | None = None):
        super().__init__(daemon=True)
        self.marker = marker
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self.local_world_size, self.hosts = local_world_size, list(hosts)
        self.timeout_s, self.every_s = timeout_s, every_s
        self.finished = threading.Event()
        self.start_time = time.monotonic()

    def ranks_with(self, prefix: str) -> set[int]:
        return {int(p.stem.split("_")[1]) for p in self.folder.glob(f"{prefix}_*.json")}

    def host(self, rank: int) -> str:
        node = rank // max(self.local_world_size, 1)
        return self.hosts[node] if node < len(self.hosts) else f"node {node}"

    def describe(self, ranks: Sequence[int]) -> str:
        return ", ".join(f"rank {r} ({self.host(r)})" for r in ranks)

    def give_up(self, cause: str = "") -> None:
        """End the process, naming the ranks that never arrived, else those that did not finish."""
        arrived, done = self.ranks_with("arrived"), self.ranks_with("done")
        absent = [r for r in range(self.world_size) if r not in arrived]
        stuck = [r for r in range(self.world_size) if r in arrived and r not in done]
        if absent:
            what = f"{self.describe(absent)} never started or cannot write to the shared run dir"
        else:
            what = f"{self.describe(stuck)} started but did not finish the all-reduce (network or backend)"
        message = (f"pre-flight failed after {time.monotonic() - self.start_time:.0f} s: no answer from {what}; "
                   f"heartbeats in {self.folder}{f' ({cause})' if cause else ''}")
        log.error("%s", message)
        record_failure(self.marker, EXIT_NO_ANSWER, message, sorted({self.host(r) for r in absent or stuck}))
        logging.shutdown()
        os._exit(EXIT_NO_ANSWER)

    def run(self) -> None:
        while not self.finished.wait(self.every_s):
            arrived, done = self.ranks_with("arrived"), self.ranks_with("done")
            elapsed = time.monotonic() - self.start_time
            absent = [r for r in range(self.world_size) if r not in arrived]
            if elapsed > self.timeout_s:
                self.give_up()
            if self.rank == 0:
                log.info("pre-flight heartbeat %.0f s: %d/%d ranks arrived, %d done%s", elapsed, len(arrived),
                         self.world_size, len(done), f"; waiting for {self.describe(absent)}" if absent else "")


class WrongSum(RuntimeError):
    """The all-reduce answered, with a wrong value."""


def check_all_reduce(device: Any, world_size: int) -> float:
    """Sum (1, rank) over all ranks; returns the time it took, s. Raises if the sums are wrong."""
    import torch
    import torch.distributed as dist

    start = time.monotonic()
    values = torch.tensor([1, dist.get_rank()], dtype=torch.int64, device=device)  # a dtype every backend sums
    dist.all_reduce(values)
    expected = [world_size, world_size * (world_size - 1) // 2]  # count of ranks, sum of 0..W-1
    if values.tolist() != expected:
        raise WrongSum(f"all-reduce returned {values.tolist()}, expected {expected}")
    return time.monotonic() - start


def join_own_group(device: Any, env: Any, backend: str, timeout_s: float) -> None:
    """The process group, its keys under their own prefix in the rendezvous store: the training's group, joined
    after this one is gone, must not read this one's addresses (gloo would dial listeners that have closed), nor
    may the group of a restart (torchrun keeps its store across restarts; torch's own groups use one prefix per
    attempt too). Under torchrun the store is the agent's; standalone, rank 0 serves it."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    serve = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=serve, timeout=timeout,
                          wait_for_workers=False)
    kwargs = {"device_id": device} if device.type != "cpu" else {}  # as pipeline.core.distributed.init binds it
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"preflight/attempt_{attempt}", store), rank=env.rank,
                            world_size=env.world_size, timeout=timeout, **kwargs)


def run_preflight(device_name: str, timeout_s: float, folder: Path, hosts: Sequence[str], report_dir: Path,
                  marker: Path | None = None) -> int:
    """The check in this process: heartbeat, bounded all-reduce, ranks.json in ``report_dir``; leaves the group.
    Returns 0, or the exit status of a failure (``marker`` records it for the restarts)."""
    import torch.distributed as dist

    from pipeline.core import distributed
    from pipeline.core.atomic import atomic_write_text
    from pipeline.core.logs import setup_logging

    env = distributed.read_env()
    setup_logging(env.rank)
    device = distributed.resolve_device(device_name, env.local_rank)
    backend = distributed.BACKENDS[device.type]
    record = environment_record(backend, device)
    log.info("pre-flight: %s", summary(record))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"arrived_{env.rank}.json", json.dumps(record))
    watchdog = Watchdog(folder, env.rank, env.world_size, env.local_world_size, hosts, timeout_s,
                        every_s=min(10.0, max(timeout_s / 6, 1.0)), marker=marker)
    watchdog.start()
    try:
        join_own_group(device, env, backend, timeout_s)
        seconds = check_all_reduce(device, env.world_size)
    except WrongSum as exc:
        log.error("pre-flight failed: %s", exc)
        record_failure(marker, EXIT_WRONG_SUM, f"pre-flight failed: {exc}")
        return EXIT_WRONG_SUM
    except RuntimeError as exc:  # the group's own timeout, or a peer gone: the same message as the watchdog's
        watchdog.give_up(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    atomic_write_text(folder / f"done_{env.rank}.json", json.dumps({"all_reduce_s": seconds}))
    records: list[Any] = [None] * env.world_size
    dist.all_gather_object(records, record)
    watchdog.finished.set()
    if distributed.is_main_process():
        atomic_write_text(report_dir / "ranks.json", json.dumps(records, indent=2, sort_keys=True) + "\n")
        hosts_seen = sorted({r["host"] for r in records})
        log.info("pre-flight passed: all-reduce over %d ranks on %d host(s) %s, backend %s, %.3f s",
                 env.world_size, len(hosts_seen), hosts_seen, backend, seconds)
    distributed.cleanup()  # training joins its own group, with its own timeout (gloo on one host: ~10 ms)
    return 0


def before_training(cfg: Any) -> int:
    """In a training process of a job that asked for it: the pre-flight, or at once the failure an earlier attempt
    of this torchrun recorded (torchrun restarts the group; waiting out the timeout again would say nothing new)."""
    base = os.environ.get(DIR_ENV)
    if not base or cfg.launch.preflight_timeout_s <= 0:
        return 0
    base_dir = Path(base)
    marker = base_dir / FAILED_FILE
    if marker.exists():
        failure = json.loads(marker.read_text())
        print(f"{failure['message']} (an earlier attempt of this job; not tried again)", file=sys.stderr, flush=True)
        return int(failure["code"])
    attempt = base_dir / f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return run_preflight(cfg.train.device, cfg.launch.preflight_timeout_s, attempt,
                         os.environ.get(HOSTS_ENV, "").split(","), base_dir, marker)


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser("Pre-flight: a bounded all-reduce over every rank, with an environment record.")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="give up after this long, naming silent ranks")
    parser.add_argument("--heartbeat-dir", type=Path, required=True, help="shared folder for the heartbeat files")
    parser.add_argument("--hosts", default="", help="comma-separated host of each node rank, for messages")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    return run_preflight(cfg.train.device, args.timeout_s, args.heartbeat_dir, args.hosts.split(","),
                         args.heartbeat_dir)


if __name__ == "__main__":
    sys.exit(main())
