"""A torchrun job's rendezvous and failures, through the launcher's local executor with real processes."""
from __future__ import annotations

import re

import pytest

from jobs.torchrun import TorchrunJob
from job_helpers import follow_to_end, job_config, submit_local, write_module

pytestmark = pytest.mark.slow


def test_a_one_node_job_lets_torchrun_bind_its_own_rendezvous_port(tmp_path, monkeypatch):
    """A port picked by the job, released, then bound by torchrun can be taken in between (EADDRINUSE)."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    module = write_module(tmp_path, "port_worker", """\
        import os, sys
        print(f"rank {os.environ['RANK']} rendezvous at port {os.environ['MASTER_PORT']}", file=sys.stderr)
    """)
    cfg = job_config(tmp_path, preflight_timeout_s=0)
    results, log = follow_to_end(submit_local(cfg, TorchrunJob("train", cfg, module=module)))
    assert results[0]["world_size"] == 2, log
    (command,) = [line for line in log.splitlines() if "running: " in line and "torch.distributed.run" in line]
    assert " --standalone " in command and "--master-port" not in command and "--master-addr" not in command
    assert len(set(re.findall(r"rendezvous at port (\d+)", log))) == 1  # both ranks met at torchrun's port
