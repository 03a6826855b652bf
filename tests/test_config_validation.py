"""The one validation of a resolved config (pipeline.core.validate): the recipes pass it, and the jobs run it again."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobs import eval as eval_entry
from jobs import train as train_entry
from pipeline.core.config import load_config
from pipeline.core.validate import validate

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.toml")
                 if p.name != "sources.toml")  # the recipes' sources (tests/test_recipe_sources.py)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_passes_validation(recipe):
    validate(load_config(recipe))


@pytest.mark.parametrize("entry", [train_entry, eval_entry])
@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "train.batch_size (--batch-size) = 0: must be at least 1"),
    (["--model", "os:system"], "model 'os:system' is not a model factory"),
    (["--run-dir", "run\nx"], "holds control character(s) '\\n'"),
])
def test_a_job_started_without_the_launcher_refuses_bad_values_in_one_line(entry, flags, message, tmp_path, capsys):
    """What torchrun -m jobs.train runs: bad values end with status 2 and one line, before any data is read."""
    with pytest.raises(SystemExit) as exited:
        entry.main(["--data-dir", str(tmp_path / "no-data"), "--run-dir", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
