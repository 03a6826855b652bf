"""Staging on the real two-node Slurm test cluster: each node copies the data dir to its own folder (a path with
$SLURMD_NODENAME, expanded on the node: the test cluster's two nodes share this machine's disk) and trains from it."""
from __future__ import annotations

import json

import pytest

from pipeline.core.config import load_config
from pipeline.core.data_manifest import read_manifest
from pipeline.data.staging import staged_dir
from layout_helpers import prep_layouts
from test_slurm import TINY, epoch_rows, launcher, slurm_cluster  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slurm


def test_each_node_stages_to_its_own_folder_and_trains_from_it(launcher, tmp_path):  # noqa: F811
    data_dir = prep_layouts(tmp_path, layouts=("shards",))[1]["shards"]
    run_dir, local = tmp_path / "run", tmp_path / "local"
    result = launcher("--stage", "train", "--nodes", 2, "--procs-per-node", 1, "--data-dir", data_dir,
                      "--run-dir", run_dir, "--layout", "shards", "--epochs", 1, "--preflight-timeout-s", 0, *TINY,
                      "--stage-data-to", f"{local}/$SLURMD_NODENAME")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    copies = {node: staged_dir(data_dir, local / node) for node in ("node1", "node2")}
    for copy in copies.values():
        assert read_manifest(copy).files == read_manifest(data_dir).files
    assert sorted(p.name for p in local.iterdir()) == ["node1", "node2"]
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["staged_data_dir"] == str(copies["node1"]) and provenance["nodes"] == 2  # rank 0's node
    assert load_config(run_dir / "config.toml").data.data_dir == str(data_dir.resolve())
    assert [r["world_size"] for r in epoch_rows(run_dir)] == ["2"]
