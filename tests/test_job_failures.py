"""A torchrun job's rendezvous and failures, through the launcher's local executor with real processes."""
from __future__ import annotations

import re
import socket
import time

import pytest
import torch.distributed as dist

from jobs import failures
from jobs.failures import cured_by_restart
from jobs.torchrun import TorchrunJob
from job_helpers import follow_to_end, job_config, submit_local, submit_stage, write_module
from launcher.follow import StageFailed
from pipeline.core.config import ConfigError
from pipeline.train.loop import NonFiniteLossError
from train_helpers import tiny_config, tiny_data


@pytest.mark.parametrize("exc, cured", [
    (ConfigError("--wandb needs the wandb package"), False),
    (NonFiniteLossError("loss is nan at step 3"), False),
    (RuntimeError("this model's forward is broken"), False),
    (ValueError("a bug"), False),
    (ConnectionResetError("peer gone"), True),
    (dist.DistNetworkError("store gone"), True),
    (RuntimeError("Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: SO_ERROR: Connection "
                  "refused"), True),
])
def test_only_a_lost_process_or_connection_counts_as_cured_by_a_restart(exc, cured):
    assert cured_by_restart(exc) is cured

@pytest.mark.slow
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
    assert " --rdzv-endpoint localhost:0 " in command and "--master-port" not in command
    assert len(set(re.findall(r"rendezvous at port (\d+)", log))) == 1  # both ranks met at torchrun's port


BROKEN_MODEL = """\
    import os
    import torch.nn as nn

    class Broken(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.fc = nn.Linear(3, num_classes)

        def forward(self, x):
            if os.environ.get("RANK") == "1":  # rank 0 goes on, into the gradients' all-reduce
                raise RuntimeError("this model's forward is broken")
            return self.fc(x.mean((2, 3)))

    def broken(*, num_classes):
        return Broken(num_classes)
"""


@pytest.mark.slow
@pytest.mark.parametrize("flags, error", [
    ([], f"rank 1 ({socket.gethostname()}) raised RuntimeError: this model's forward is broken"),
    (["--resume", "/nonexistent/latest.pt"], "raised CheckpointError: checkpoint /nonexistent/latest.pt does not "
                                             "exist"),
])
def test_a_deterministic_failure_is_not_restarted_and_the_job_reports_it_not_the_network(flags, error, tmp_path,
                                                                                           monkeypatch):
    """2 processes, gloo, the pre-flight on, 2 restarts allowed: a model that raises on one rank (the other waits
    in the all-reduce), or bad input in the job, fails the same way on every attempt."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    model = write_module(tmp_path, "broken_model", BROKEN_MODEL)
    cfg = tiny_config(tiny_data(tmp_path / "data", num_classes=2, train_per_class=8, val_per_class=2),
                      tmp_path / "run", "--model", f"{model}:broken", "--procs-per-node", "2",
                      "--preflight-timeout-s", "60", "--max-restarts", "2", *flags)
    started = time.monotonic()
    failure, log = follow_to_end(submit_stage(cfg), bound_s=240)
    assert isinstance(failure, StageFailed), log[-3000:]
    assert time.monotonic() - started < 120
    headline = str(failure).splitlines()[1]
    assert error in headline and "(attempt 0); not restarted" in headline, str(failure)
    assert "pre-flight failed" not in str(failure) and "no answer" not in str(failure)
    assert "(network or backend)" not in str(failure)
    assert not list((tmp_path / "run" / "logs").glob("*/node0/*/attempt_1"))  # torchrun never restarted


RESTARTABLE_WORKER = """\
    import os, signal, sys
    from jobs.common import exit_status, get_args_parser
    from jobs.preflight import before_training
    from pipeline.core.config import config_from_args

    def work():
        status = before_training(config_from_args(get_args_parser("test").parse_args()))
        if status:
            raise SystemExit(status)
        if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            {failure}
        print(f"rank {{os.environ['RANK']}} trained in attempt {{os.environ['TORCHELASTIC_RESTART_COUNT']}}",
              file=sys.stderr, flush=True)

    sys.exit(exit_status("worker", work))
"""


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["os.kill(os.getpid(), signal.SIGKILL)",
                                     "raise ConnectionResetError('peer gone')"])
def test_a_failure_a_restart_cures_is_restarted_and_the_restart_passes_its_pre_flight(failure, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    module = write_module(tmp_path, "flaky_worker", RESTARTABLE_WORKER.format(failure=failure))
    cfg = job_config(tmp_path, preflight_timeout_s=30, max_restarts=1)
    results, log = follow_to_end(submit_local(cfg, TorchrunJob("train", cfg, module=module)), bound_s=240)
    assert not isinstance(results, StageFailed), str(results)
    assert "rank 0 trained in attempt 1" in log and "rank 1 trained in attempt 1" in log
    assert log.count("pre-flight passed") == 2


def test_a_lost_connection_that_echoes_a_peers_error_waits_for_the_job_which_names_the_peers_error(tmp_path,
                                                                                                   monkeypatch):
    """Rank 1 raises and closes its sockets; rank 0's collective then fails with a lost connection, which alone
    would be restarted. Rank 0 sees rank 1's record appear and waits to be stopped; the report names rank 1."""
    monkeypatch.setattr(failures, "LINGER_S", 0.0)
    monkeypatch.setenv(failures.DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    failures.record(RuntimeError("this model's forward is broken"), 1)
    monkeypatch.setenv("RANK", "0")
    failures.failed(ConnectionResetError("Connection reset by peer"), 1)
    assert [(f.rank, f.deterministic) for f in failures.read_failures(tmp_path)] == [(1, True), (0, False)]
    assert failures.report(failures.deterministic_failure(tmp_path), "train failed on node 0").startswith(
        f"train failed on node 0: rank 1 ({socket.gethostname()}) raised RuntimeError: this model's forward is broken "
        "(attempt 0); not restarted")
