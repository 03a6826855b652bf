"""Run dirs survive upgrades: records say which version wrote them, the report reads a run dir written by the
previous version (tests/fixtures/*_v1, made by that version's own training and eval), a resumed run goes on in the
same files, and a record from a newer version is refused in one line."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.records import EPOCH_COLUMNS, EPOCHS_FILE, SCHEMA_VERSION, append_row
from pipeline.report.build import ReportError, report
from train_helpers import tiny_config, tiny_data

FIXTURES = Path(__file__).parent / "fixtures"


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_a_run_dir_of_the_previous_version_is_reported_with_the_new_columns_empty(tmp_path):
    run_dir = copy_fixture("run_dir_v1", tmp_path)
    result = report([run_dir], echo=False)
    epochs = result.epochs["run_dir_v1"]
    assert list(epochs["epoch"]) == [0, 1] and list(epochs["val_acc1"]) == [25.0, 62.5]
    assert epochs["device_wait_pct"].isna().all()  # not recorded then
    summary = result.summary.iloc[0]
    assert summary["eval_acc1"] == 62.5 and summary["status"] == "finished"


def test_a_perf_run_of_the_previous_version_is_reported(tmp_path):
    summary = report([copy_fixture("perf_dir_v1", tmp_path)], echo=False).summary.iloc[0]
    assert summary["img_per_s_all_ranks"] == 204.0 and summary["status"] == "perf"


def test_runs_of_version_2_are_reported_without_energy_and_judged_on_what_they_recorded(tmp_path):
    result = report([copy_fixture("run_dir_v2", tmp_path), copy_fixture("perf_dir_v2", tmp_path)], echo=False)
    fit, perf = result.summary.to_dict("records")
    assert (fit["eval_acc1"], fit["status"], fit["device_wait_pct"]) == (62.5, "finished", 1.3)
    assert fit["energy_source"] == perf["energy_source"] == "not available" and pd.isna(fit["energy_kwh"])
    assert fit["flags"] == ""  # its steady-state window was not recorded: not judged
    assert perf["img_per_s_all_ranks"] == 16.2  # rounded to 0.1
    assert perf["flags"].startswith("short steady-state window (3 steps < 20)")  # 6 steps less 3 of warm-up


@pytest.mark.parametrize("fixture, schemas", [("run_dir_v1", ["", ""]), ("run_dir_v2", ["2", "2"])])
def test_a_run_resumed_on_newer_code_goes_on_in_the_same_table(tmp_path, fixture, schemas):
    run_dir = copy_fixture(fixture, tmp_path)
    with (run_dir / EPOCHS_FILE).open() as fh:
        last = list(csv.DictReader(fh))[-1]
    row = {**last, "epoch": 2, "steps": 24, "device_wait_frac": 0.125, "finished_at": "2026-12-06T07:00:00+00:00",
           "steady_steps": 4, "steady_s": 0.5, "images": 64, "energy_j": "", "energy_source": ""}
    row.pop("schema", None)
    append_row(run_dir / EPOCHS_FILE, row, EPOCH_COLUMNS)  # what the trainer does at the end of an epoch
    with (run_dir / EPOCHS_FILE).open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["schema"] for r in rows] == schemas + [str(SCHEMA_VERSION)]  # each row says who wrote it
    epochs = report([run_dir], echo=False).epochs[fixture]
    assert list(epochs["epoch"]) == [0, 1, 2] and epochs["device_wait_pct"].isna().tolist() == \
        [fixture == "run_dir_v1"] * 2 + [False]


@pytest.mark.parametrize("record", ["epochs.csv", "eval.json"])
def test_a_record_of_a_newer_version_is_refused_in_one_line(tmp_path, record):
    run_dir = copy_fixture("run_dir_v1", tmp_path)
    if record == "eval.json":
        counts = json.loads((run_dir / record).read_text())
        (run_dir / record).write_text(json.dumps({**counts, "schema": SCHEMA_VERSION + 1}))
    else:
        with (run_dir / EPOCHS_FILE).open() as fh:
            last = list(csv.DictReader(fh))[-1]
        append_row(run_dir / EPOCHS_FILE, {**last, "epoch": 2}, EPOCH_COLUMNS)
        text = (run_dir / EPOCHS_FILE).read_text()
        (run_dir / EPOCHS_FILE).write_text(text[:text.rstrip().rindex(",") + 1] + f"{SCHEMA_VERSION + 1}\n")
    with pytest.raises(ReportError, match=f"{record} was written by a newer version of the pipeline \\(record "
                                          f"schema {SCHEMA_VERSION + 1}; this one reads up to {SCHEMA_VERSION}\\)"):
        report([run_dir], echo=False)


def test_a_training_records_its_version_in_every_record(tmp_path):
    from pipeline.train.trainer import train

    cfg = tiny_config(tiny_data(tmp_path / "data"), tmp_path / "run", "--epochs", "1", "--no-tensorboard")
    train(cfg)
    with (tmp_path / "run" / EPOCHS_FILE).open() as fh:
        assert [row["schema"] for row in csv.DictReader(fh)] == [str(SCHEMA_VERSION)]
    for record in ("provenance.json", "run_state.json"):
        assert json.loads((tmp_path / "run" / record).read_text())["schema"] == SCHEMA_VERSION
