"""What a running job learns about itself comes from jobs/job_env.py alone: submitit's view of its cluster."""
from __future__ import annotations

import submitit

from jobs.job_env import JobEnv, job_env
from jobs.torchrun import node_hosts, node_rendezvous, rendezvous_port


def test_a_slurm_array_task_knows_its_own_id_its_requeues_and_its_nodes(monkeypatch):
    for key, value in {"_TEST_CLUSTER_": "slurm", "SLURM_JOB_ID": "1234", "SLURM_ARRAY_JOB_ID": "1200",
                       "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "2", "SLURM_NODEID": "1",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]"}.items():
        monkeypatch.setenv(key, value)
    env = job_env()
    assert env == JobEnv("slurm", "1200_3", "1234", 2, 1, 2, ("node1", "node2"))
    rdzv = node_rendezvous(env)
    assert (rdzv.node_rank, rdzv.master_addr, rdzv.run_id) == (1, "node1", "1200_3-2")
    assert rdzv.master_port == rendezvous_port("1234", 2)  # the task's own number: tasks of an array differ
    assert node_hosts(env) == ["node1", "node2"]


def test_a_process_outside_any_job_is_one_node_started_once(monkeypatch):
    for key in ("_TEST_CLUSTER_", "SUBMITIT_EXECUTOR", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    env = job_env()
    assert (env.cluster, env.restarts, env.node, env.num_nodes) == ("none", 0, 0, 1)
    assert node_rendezvous(env).master_port == 0  # torchrun binds its own port on one node


def test_a_local_job_knows_its_id(tmp_path):
    executor = submitit.LocalExecutor(tmp_path / "logs")
    executor.update_parameters(timeout_min=5)
    job = executor.submit(job_env)
    env = job.result()
    assert (env.cluster, env.job_id, env.restarts, env.num_nodes) == ("local", job.job_id, 0, 1)
