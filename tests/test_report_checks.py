"""Records no training could have written are refused with one line naming the file, the line and what is wrong:
an epoch twice (two trainers in one run dir), accuracies outside [0, 100], inf or NaN, absurd row counts."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from pipeline.report.build import ReportError, report
from test_report import one_process


def edit_cell(run_dir, line: int, column: str, value: str) -> None:
    """Set one cell of epochs.csv (line 1 is the header)."""
    lines = (run_dir / "epochs.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[line - 1].split(",")
    cells[header.index(column)] = value
    lines[line - 1] = ",".join(cells)
    (run_dir / "epochs.csv").write_text("\n".join(lines) + "\n")


def test_two_trainings_interleaved_in_one_run_dir_are_refused(tmp_path):
    run_dir = one_process(tmp_path)
    header, *rows = (run_dir / "epochs.csv").read_text().splitlines()
    (run_dir / "epochs.csv").write_text("\n".join([header, rows[0], rows[0], rows[1], rows[1]]) + "\n")  # 0,0,1,1
    with pytest.raises(ReportError, match=r"epochs.csv line 3: epoch 0 after epoch 0 \(line 2\): two trainings wrote "
                                          "this run dir") as info:
        report([run_dir], echo=False)
    assert "\n" not in str(info.value) and not (run_dir / "report").exists()


def test_an_epoch_recorded_again_at_the_end_is_refused(tmp_path):
    run_dir = one_process(tmp_path)
    lines = (run_dir / "epochs.csv").read_text().splitlines()
    (run_dir / "epochs.csv").write_text("\n".join(lines + [lines[3]]) + "\n")  # a resume drops what it redoes
    with pytest.raises(ReportError, match="line 5: epoch 2 after epoch 2"):
        report([run_dir], echo=False)


@pytest.mark.parametrize("column, value, message", [
    ("val_acc1", "-5.0", r"line 3: val_acc1 = -5 is not an accuracy in \[0, 100\]"),
    ("train_acc5", "100.5", r"line 3: train_acc5 = 100.5 is not an accuracy in \[0, 100\]"),
    ("ema_val_acc1", "250", r"line 3: ema_val_acc1 = 250 is not an accuracy"),
    ("val_acc1", "inf", r"line 3: val_acc1 = 'inf' is not a finite number"),
    ("train_loss", "nan", r"line 3: train_loss = 'nan' is not a finite number"),
    ("img_per_s_all_ranks", "-inf", r"line 3: img_per_s_all_ranks = '-inf' is not a finite number"),
    ("lr", "fast", r"line 3: lr = 'fast' is not a finite number"),
])
def test_an_impossible_value_is_refused_naming_file_line_and_column(tmp_path, column, value, message):
    run_dir = one_process(tmp_path)
    edit_cell(run_dir, 3, column, value)
    with pytest.raises(ReportError, match=message) as info:
        report([run_dir], echo=False)
    assert str(run_dir / "epochs.csv") in str(info.value) and "\n" not in str(info.value)


def test_an_empty_ema_column_is_still_a_run_without_ema(tmp_path):
    run_dir = one_process(tmp_path)  # written with empty ema_val_acc1/5
    assert len(report([run_dir], echo=False).epochs["r18-1x1"]) == 3


def test_a_table_of_200000_rows_is_refused_in_well_under_a_second(tmp_path):
    run_dir = one_process(tmp_path)
    header, first, *_ = (run_dir / "epochs.csv").read_text().splitlines()
    rest = first.split(",", 1)[1]
    (run_dir / "epochs.csv").write_text(header + "\n" + "".join(f"{i},{rest}\n" for i in range(200_000)))
    started = time.monotonic()
    with pytest.raises(ReportError, match=r"epochs.csv holds more than 10,000 rows; a run's records are one row per "
                                          "epoch"):
        report([run_dir], echo=False)
    assert time.monotonic() - started < 2.0  # was 25 s and 0.7 GB (the Markdown of every row)


@pytest.mark.parametrize("change, message", [
    ({"acc1": -5}, r"acc1 = -5 is not top1_correct / total in %"),
    ({"acc1": float("inf")}, r"acc1 = inf is not top1_correct / total in %"),
    ({"acc5": 1e9}, r"acc5 = 1000000000.0 is not top5_correct / total in %"),
    ({"top1_correct": 30}, r"are not whole numbers with top-1 <= top-5 <= total"),
    ({"total": "24"}, r"are not whole numbers with top-1 <= top-5 <= total"),
])
def test_eval_counts_no_eval_stage_writes_are_refused(tmp_path, change, message):
    run_dir = Path(shutil.copytree(Path(__file__).parent / "fixtures" / "run_dir_v1", tmp_path / "run"))
    record = json.loads((run_dir / "eval.json").read_text())
    (run_dir / "eval.json").write_text(json.dumps({**record, **change}))
    with pytest.raises(ReportError, match=message):
        report([run_dir], echo=False)
