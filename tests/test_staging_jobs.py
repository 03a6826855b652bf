"""Staging in the jobs, under a real torchrun with gloo, on a real ``archives`` data dir: of two processes one copies
and the other waits, both train from the copy; the run's records keep the data dir given and note the copy; eval from
the saved config reuses it and counts what eval of the data dir in place counts."""
from __future__ import annotations

import json
import re

import pytest

from pipeline.core.config import load_config
from pipeline.data.staging import staged_dir
from layout_helpers import prep_layouts
from train_helpers import run_module, tiny_argv

pytestmark = pytest.mark.slow


def staging_lines(log: str) -> tuple[list[str], list[str]]:
    """The ranks that copied, and those that used a complete copy."""
    return (re.findall(r"rank (\d)\] INFO pipeline\.data\.staging: staging \d+ of the", log),
            re.findall(r"rank (\d)\] INFO pipeline\.data\.staging: data dir .* using its staged copy", log))


def test_two_processes_stage_once_train_from_the_copy_and_eval_reuses_it(tmp_path):
    _, dirs = prep_layouts(tmp_path, layouts=("archives",))
    data_dir = dirs["archives"]
    dest, run_dir = tmp_path / "node-local", tmp_path / "run"
    copy = staged_dir(data_dir, dest)
    result = run_module("jobs.train", tiny_argv(data_dir, run_dir, "--epochs", "1", "--layout", "archives",
                                                          "--stage-data-to", str(dest)),
                        nproc=2, timeout_s=300)
    assert result.returncode == 0, result.stderr[-4000:]
    copied, reused = staging_lines(result.stderr)
    assert len(copied) == 1 and len(reused) == 1 and {*copied, *reused} == {"0", "1"}, result.stderr[-4000:]
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert (provenance["data_dir"], provenance["staged_data_dir"], provenance["world_size"]) == (
        str(data_dir.resolve()), str(copy), 2)
    saved = load_config(run_dir / "config.toml")
    assert saved.data.data_dir == str(data_dir.resolve()) and saved.data.stage_data_to == str(dest)

    evaluated = run_module("jobs.eval", ["--config", str(run_dir / "config.toml")], timeout_s=120)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    assert staging_lines(evaluated.stderr) == ([], ["0"])
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["staged_data_dir"] == str(copy)
    in_place = run_module("jobs.eval", ["--config", str(run_dir / "config.toml"), "--stage-data-to", ""],
                          timeout_s=120)
    assert in_place.returncode == 0 and staging_lines(in_place.stderr) == ([], []), in_place.stderr[-4000:]
    unstaged = json.loads((run_dir / "eval.json").read_text())
    assert "staged_data_dir" not in unstaged and unstaged["total"] == 23  # 4 x 6 val images, one unlabelled
    assert [record[k] for k in ("top1_correct", "top5_correct", "total")] == [
        unstaged[k] for k in ("top1_correct", "top5_correct", "total")]
