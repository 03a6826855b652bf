"""Every recipe in configs/ holds the values of the source it cites, as configs/sources.toml lists them: a config
that drifts from its source, or a recipe without an entry, fails here."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.config import Config, load_config, tomllib
from pipeline.train.optim import lr_for_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SOURCES = tomllib.loads((CONFIGS / "sources.toml").read_text())
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.toml") if p.stem != "sources")


def config_values(cfg: Config, global_batch: int) -> dict[str, Any]:
    """Every field by its name (unique across sections), the lr being the one the recipe runs at ``global_batch``."""
    found = {f.name: getattr(section, f.name) for section in (getattr(cfg, s.name) for s in dataclasses.fields(cfg))
             for f in dataclasses.fields(section)}
    return found | {"lr": lr_for_batch(cfg.optim, global_batch)}


def differences(cfg: Config, entry: dict[str, Any]) -> list[str]:
    """The fields where ``cfg`` differs from its sources.toml ``entry``, each as 'field: config X, source Y'."""
    values = dict(entry["values"])
    processes, global_batch = values.pop("processes"), values.pop("global_batch")
    found = config_values(cfg, global_batch)
    found_batch = cfg.train.batch_size * processes * cfg.optim.accum_steps
    wrong = [f"{name}: config {found[name]!r}, source {value!r}" for name, value in values.items()
             if name not in found or found[name] != value]
    if found_batch != global_batch:
        wrong.append(f"global batch on {processes} processes: config {found_batch}, source {global_batch}")
    return wrong


def test_every_recipe_cites_a_source_and_every_entry_is_a_recipe():
    assert sorted(SOURCES) == RECIPES
    assert all(SOURCES[name]["source"] and {"processes", "global_batch"} <= set(SOURCES[name]["values"])
               for name in RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_holds_its_sources_values(name):
    assert differences(load_config(CONFIGS / f"{name}.toml"), SOURCES[name]) == []


def test_a_recipe_that_drifts_from_its_source_is_named(tmp_path):
    """MobileNetV2 at its old lr 0.036 and batch 48 per GPU: both said, against torchvision's README."""
    drifted = tmp_path / "mobilenet_v2.toml"
    drifted.write_text((CONFIGS / "mobilenet_v2.toml").read_text().replace("lr = 0.045", "lr = 0.036")
                       .replace("batch_size = 32 ", "batch_size = 48 "))
    assert differences(load_config(drifted), SOURCES["mobilenet_v2"]) == [
        "lr: config 0.036, source 0.045", "global batch on 8 processes: config 384, source 256"]
