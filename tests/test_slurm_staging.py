"""Staging on the real two-node Slurm test cluster: a chain preps the ``shards`` layout, then each node of the train
and of the eval job copies the data dir to its own folder (a path with $SLURMD_NODENAME, expanded on the node: the
test cluster's two nodes share this machine's disk) and reads from it; eval counts what the folders layout holds."""
from __future__ import annotations

import json

import pytest

from layout_helpers import prep_layouts
from pipeline.core.config import load_config
from pipeline.core.data_manifest import read_manifest
from pipeline.core.file_index import read_index
from pipeline.data.staging import staged_dir
from test_slurm import TINY, epoch_rows, launcher, slurm_cluster  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slurm


def test_a_chain_preps_shards_and_each_node_stages_them_for_train_and_eval(launcher, tmp_path):  # noqa: F811
    archives, dirs = prep_layouts(tmp_path, layouts=("folders",))  # the reference: the same archives extracted
    data_dir, run_dir, local = tmp_path / "shards", tmp_path / "run", tmp_path / "local"
    result = launcher("--stage", "all", "--layout", "shards", "--archive-dir", archives, "--skip-checksum",
                      "--shard-size-mb", 1, "--data-dir", data_dir, "--run-dir", run_dir, "--nodes", 2,
                      "--procs-per-node", 1, "--eval-nodes", 2, "--epochs", 1, "--preflight-timeout-s", 0, *TINY,
                      "--stage-data-to", f"{local}/$SLURMD_NODENAME", timeout_s=420)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    copies = {node: staged_dir(data_dir, local / node) for node in ("node1", "node2")}
    for copy in copies.values():
        assert read_manifest(copy).files == read_manifest(data_dir).files
    assert sorted(p.name for p in local.iterdir()) == ["node1", "node2"]
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["staged_data_dir"] == str(copies["node1"]) and provenance["nodes"] == 2  # rank 0's node
    assert provenance["data_layout"] == "shards"
    assert load_config(run_dir / "config.toml").data.data_dir == str(data_dir.resolve())
    assert [r["world_size"] for r in epoch_rows(run_dir)] == ["2"]
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["world_size"] == 2 and record["staged_data_dir"] == str(copies["node1"])
    assert record["total"] == len(read_index(dirs["folders"], "val")) == 23  # every labelled val image, once
    assert (run_dir / "report" / "summary.csv").exists()
