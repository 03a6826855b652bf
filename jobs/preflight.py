"""Pre-flight of a multi-process job: one all-reduce over every rank, bounded, before training starts.

Runs under the same torchrun layout as the training (``python -m jobs.preflight`` per process)::

    torchrun --nnodes 2 --nproc-per-node 4 ... -m jobs.preflight --config C \\
        --timeout-s 120 --heartbeat-dir <run dir>/logs/<job>/preflight-<port> --hosts node1,node2

Each process logs the environment that decides whether the job can communicate (host, ranks,
MASTER_ADDR/PORT, backend, NCCL_*/HCCL_*/GLOO_* variables, versions) and drops a heartbeat file in the
shared run dir; then all ranks join the process group and sum a tensor. A watchdog thread logs who has
answered every few seconds and, past the timeout, exits with a message naming the ranks (and their
hosts) that did not, instead of hanging in the collective.
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
from pipeline.config import ConfigError, config_from_args

log = logging.getLogger("jobs.preflight")

ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "HCCL_", "ASCEND_", "GLOO_", "TORCH_DISTRIBUTED_", "TORCHELASTIC_",
                "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MASTER_", "SLURM_JOB_ID", "SLURM_NODEID")
EXIT_NO_ANSWER = 3  # a rank did not answer within the timeout
EXIT_WRONG_SUM = 4  # the all-reduce returned a wrong value


def preflight_args(config_path: str | Path, timeout_s: int, heartbeat_dir: str | Path,
                   hosts: Sequence[str]) -> list[str]:
    """Arguments of ``python -m jobs.preflight`` for one job."""
    return ["--config", str(config_path), "--timeout-s", str(timeout_s), "--heartbeat-dir", str(heartbeat_dir),
            "--hosts", ",".join(hosts)]


def environment_record(backend: str, device: Any) -> dict[str, Any]:
    """What this process sees: identity, rendezvous, backend, communication variables, versions."""
    import torch

    record: dict[str, Any] = {
        "host": socket.gethostname(), "pid": os.getpid(),
        **{key.lower(): os.environ.get(key, "") for key in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
        "backend": backend, "device": str(device), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda or "",
        "variables": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
    }
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
        record["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    return record


def summary(record: dict[str, Any]) -> str:
    """One log line per rank; the whole record goes to the heartbeat file."""
    comm = {k: v for k, v in record["variables"].items() if k.startswith(("NCCL_", "HCCL_", "GLOO_"))}
    return (f"host {record['host']} rank {record['rank']}/{record['world_size']} local rank "
            f"{record['local_rank']}/{record['local_world_size']} master {record['master_addr']}:"
            f"{record['master_port']} backend {record['backend']} device {record['device']} torch {record['torch']} "
            f"cuda {record['cuda'] or 'none'} nccl {record.get('nccl', 'none')}; NCCL/HCCL/GLOO variables: "
            f"{comm or 'none set'}")


class Watchdog(threading.Thread):
    """Reports arrivals every ``every_s`` and ends the process, naming the silent ranks, after ``timeout_s``."""

    def __init__(self, folder: Path, rank: int, world_size: int, local_world_size: int, hosts: Sequence[str],
                 timeout_s: float, every_s: float):
        super().__init__(daemon=True)
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self.local_world_size, self.hosts = local_world_size, list(hosts)
        self.timeout_s, self.every_s = timeout_s, every_s
        self.finished = threading.Event()
        self.start_time = time.monotonic()

    def ranks_with(self, prefix: str) -> set[int]:
        return {int(p.stem.split("_")[1]) for p in self.folder.glob(f"{prefix}_*.json")}

    def describe(self, ranks: Sequence[int]) -> str:
        def host(rank: int) -> str:
            node = rank // max(self.local_world_size, 1)
            return self.hosts[node] if node < len(self.hosts) else f"node {node}"
        return ", ".join(f"rank {r} ({host(r)})" for r in ranks)

    def run(self) -> None:
        while not self.finished.wait(self.every_s):
            arrived, done = self.ranks_with("arrived"), self.ranks_with("done")
            elapsed = time.monotonic() - self.start_time
            absent = [r for r in range(self.world_size) if r not in arrived]
            stuck = [r for r in range(self.world_size) if r in arrived and r not in done]
            if elapsed > self.timeout_s:
                if absent:
                    what = f"{self.describe(absent)} never started or cannot write to the shared run dir"
                else:
                    what = f"{self.describe(stuck)} started but did not finish the all-reduce (network or backend)"
                log.error("pre-flight failed after %.0f s: no answer from %s; heartbeats in %s",
                          elapsed, what, self.folder)
                logging.shutdown()
                os._exit(EXIT_NO_ANSWER)
            if self.rank == 0:
                log.info("pre-flight heartbeat %.0f s: %d/%d ranks arrived, %d done%s", elapsed, len(arrived),
                         self.world_size, len(done), f"; waiting for {self.describe(absent)}" if absent else "")


def check_all_reduce(device: Any, world_size: int) -> float:
    """Sum (1, rank) over all ranks; returns the time it took, s. Raises if the sums are wrong."""
    import torch
    import torch.distributed as dist

    start = time.monotonic()
    values = torch.tensor([1.0, float(dist.get_rank())], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    expected = [float(world_size), world_size * (world_size - 1) / 2]  # count of ranks, sum of 0..W-1
    if values.tolist() != expected:
        raise RuntimeError(f"all-reduce returned {values.tolist()}, expected {expected}")
    return time.monotonic() - start


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

    import torch.distributed as dist

    from pipeline import distributed
    from pipeline.atomic import atomic_write_text
    from pipeline.logs import setup_logging

    env = distributed.read_env()
    setup_logging(env.rank)
    device = distributed.resolve_device(cfg.train.device, env.local_rank)
    backend = distributed.BACKENDS[device.type]
    record = environment_record(backend, device)
    log.info("pre-flight: %s", summary(record))
    folder = args.heartbeat_dir
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"arrived_{env.rank}.json", json.dumps(record))
    watchdog = Watchdog(folder, env.rank, env.world_size, env.local_world_size, args.hosts.split(","),
                        args.timeout_s, every_s=min(10.0, max(args.timeout_s / 6, 1.0)))
    watchdog.start()
    distributed.init(device, env, timeout_s=args.timeout_s)
    try:
        seconds = check_all_reduce(device, env.world_size)
    except RuntimeError as exc:
        log.error("pre-flight failed: %s", exc)
        return EXIT_WRONG_SUM
    atomic_write_text(folder / f"done_{env.rank}.json", json.dumps({"all_reduce_s": seconds}))
    records: list[Any] = [None] * env.world_size
    dist.all_gather_object(records, record)
    watchdog.finished.set()
    if distributed.is_main_process():
        atomic_write_text(folder / "ranks.json", json.dumps(records, indent=2, sort_keys=True) + "\n")
        hosts = sorted({r["host"] for r in records})
        log.info("pre-flight passed: all-reduce over %d ranks on %d host(s) %s, backend %s, %.3f s",
                 env.world_size, len(hosts), hosts, backend, seconds)
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
