"""The stage table (pipeline/core/stages.py) is the one place the stages are described; what reads it agrees."""
from __future__ import annotations

import importlib.util

import pytest

from jobs.stages import INPUT_CHECKS, ReportJob, StageInputError, check_inputs, stage_chain, stage_job
from jobs.torchrun import TorchrunJob
from pipeline.core.config import Config, ConfigError
from pipeline.core.stages import STAGES, TORCHRUN_STAGES, checks_of
from pipeline.core.validate import validate


def test_every_input_is_written_by_an_earlier_stage_or_checked_on_disk():
    written: set[str] = set()
    for stage in STAGES.values():
        for what in stage.reads:
            assert what in INPUT_CHECKS, f"{stage.name} reads {what}, which nothing checks"
            assert what in written or not any(what in later.writes for later in STAGES.values()), \
                f"{stage.name} reads {what} before the stage that writes it"
        written.update(stage.writes)


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stages_door_and_entry_exist_and_its_job_runs_them(name, tmp_path):
    stage = STAGES[name]
    modules = [stage.door.partition(":")[0], stage.entry or f"jobs.{name}"]
    assert all(importlib.util.find_spec(module) for module in modules)  # found, not imported: no torch here
    job = stage_job(name, Config(), [str(tmp_path)])
    assert isinstance(job, TorchrunJob) == (name in TORCHRUN_STAGES)
    assert isinstance(job, ReportJob) == (stage.door_reads == "run_dirs")


def test_a_chain_does_not_ask_for_what_an_earlier_stage_makes(tmp_path):
    cfg = Config()
    cfg.prep.archive_dir, cfg.data.data_dir = str(tmp_path), str(tmp_path / "not yet")
    check_inputs(["prep", "train"], cfg, [str(tmp_path)])  # prep writes the data dir
    with pytest.raises(StageInputError, match="data dir .* does not exist; run --stage prep first"):
        check_inputs(["train"], cfg, [str(tmp_path)])


def test_all_starts_with_download_only_when_there_are_links():
    cfg = Config()
    assert stage_chain("all", cfg) == ["prep", "train", "eval", "report"]
    cfg.download.url = ["https://example.org/ILSVRC2012_img_val.tar"]
    assert stage_chain("all", cfg) == list(STAGES)


def test_the_validation_checks_what_the_stages_read():
    cfg = Config()
    cfg.model.model = "no_such_net"
    assert checks_of(["prep", "report"]) == set()
    validate(cfg, ["prep", "report"])  # neither builds a model
    with pytest.raises(ConfigError, match="unknown model 'no_such_net'"):
        validate(cfg, ["eval"])
