"""When a job leaves the hosts its pre-flight named out of a requeue, and when it fails instead (the requeue itself
runs on the real cluster: tests/launcher/test_slurm_citizen.py)."""
from __future__ import annotations

import json

import pytest

from jobs.job_env import JobEnv
from jobs.leave_out import EXCLUDED_FILE, leave_out_and_requeue, why_not


@pytest.mark.parametrize("hosts, job_hosts, earlier, cluster, limit, reason", [
    (["n2"], ["n1", "n2"], [], "slurm", 2, ""),
    (["n1"], ["n1"], [], "slurm", 1, ""),  # a one-node job: its node, so the requeue lands elsewhere
    (["n3"], ["n3", "n4"], ["n1", "n2"], "slurm", 2, "would make 3 hosts, more than --max-excluded-hosts 2"),
    (["n1"], ["n1"], [], "slurm", 0, "more than --max-excluded-hosts 0"),
    (["n1", "n2"], ["n1", "n2"], [], "slurm", 4, "every host of the job"),
    ([], ["n1", "n2"], [], "slurm", 2, "named no host"),
    (["n1"], ["n1"], [], "local", 2, "a local job cannot be requeued"),
])
def test_which_named_hosts_are_left_out(hosts, job_hosts, earlier, cluster, limit, reason):
    assert (why_not(hosts, job_hosts, earlier, cluster, limit) == "") == (reason == "")
    assert reason in why_not(hosts, job_hosts, earlier, cluster, limit)


def test_a_local_job_is_not_requeued_and_records_nothing(tmp_path):
    marker = tmp_path / "failed.json"
    marker.write_text(json.dumps({"code": 3, "message": "pre-flight failed", "hosts": ["box"]}))
    env = JobEnv("local", "7", "7", 0, 0, 1, ("box",))
    assert "cannot be requeued" in leave_out_and_requeue(tmp_path, env, marker, limit=2)
    assert not (tmp_path / EXCLUDED_FILE).exists()
