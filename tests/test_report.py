"""The report stage on hand-written records: exact tables, scaling efficiency, Markdown = CSV, plots, errors."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import Config, build_config, save_config
from pipeline.core.records import EPOCH_COLUMNS, PERF_COLUMNS, append_row, write_json
from pipeline.prep.synthetic import make_image_folder
from pipeline.report.build import ReportError, parquet_available, report
from pipeline.report.markdown import TITLES
from pipeline.report.tables import PROVENANCE_COLUMNS, SUMMARY_COLUMNS
from pipeline.train.trainer import train

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROVENANCE = {"git_commit": "0123abc", "python": "3.11.9", "torch": "2.14.1", "torchvision": "0.29.1",
              "cuda": "12.4", "cudnn": "90100", "device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
              "hostname": "gpu-node-01", "seed": 7, "started_at": "2025-01-01T00:00:00+00:00"}


def write_config(run_dir: Path, *, model: str, epochs: int, batch_size: int = 32, amp: str = "bf16") -> None:
    cfg = Config()
    cfg.model.model = model
    cfg.train = dataclasses.replace(cfg.train, run_dir=str(run_dir), epochs=epochs, batch_size=batch_size, amp=amp,
                                    seed=7)
    save_config(cfg, run_dir / "config.toml")


def make_run(root: Path, name: str, *, world_size: int, nodes: int, fps: Sequence[float],
             val_acc1: Sequence[float], val_acc5: Sequence[float], planned: int = 3, model: str = "resnet18",
             batch_size: int = 32, ema: Sequence[float] = ()) -> Path:
    """A training run dir as the train stage leaves it: config, provenance, one epochs.csv row per fps value."""
    run_dir = root / name
    write_config(run_dir, model=model, epochs=planned, batch_size=batch_size)
    write_json(run_dir / "provenance.json", {**PROVENANCE, "world_size": world_size, "nodes": nodes})
    for epoch, img_per_s in enumerate(fps):
        append_row(run_dir / "epochs.csv", {
            "epoch": epoch, "steps": 10 * (epoch + 1), "train_loss": 2.0 - 0.25 * epoch,
            "train_acc1": 5.0 + 15 * epoch, "train_acc5": 20.0 + 20 * epoch, "val_loss": 1.9 - 0.125 * epoch,
            "val_acc1": val_acc1[epoch], "val_acc5": val_acc5[epoch], "val_top1_correct": 2 * val_acc1[epoch],
            "val_top5_correct": 2 * val_acc5[epoch], "val_total": 200, "lr": 0.1 / 3 if epoch < 2 else 0.01,
            "epoch_time_s": 60.5 if epoch == 0 else 50.25, "img_per_s_all_ranks": img_per_s,
            "img_per_s_per_rank": img_per_s / world_size, "data_wait_frac": 0.0125, "device_wait_frac": 0.25,
            "world_size": world_size,
            "nodes": nodes, "amp": "bf16", "model": model, "peak_mem_mib": 1024.0,
            "finished_at": f"2025-01-01T0{epoch}:00:00+00:00",
            "ema_val_acc1": ema[epoch] if ema else "", "ema_val_acc5": ema[epoch] + 10 if ema else ""}, EPOCH_COLUMNS)
    return run_dir


def make_perf_run(root: Path, name: str, *, img_per_s: float, world_size: int = 1) -> Path:
    run_dir = root / name
    write_config(run_dir, model="mobilenet_v2", epochs=90, batch_size=64)
    write_json(run_dir / "provenance.json", {**PROVENANCE, "world_size": world_size, "nodes": 1})
    append_row(run_dir / "perf.csv", {
        "steps": 100, "warmup_steps": 10, "batch_size": 64, "img_per_s_all_ranks": img_per_s,
        "img_per_s_per_rank": img_per_s / world_size, "data_wait_frac": 0.01, "world_size": world_size, "nodes": 1,
        "amp": "bf16", "model": "mobilenet_v2", "channels_last": True, "device": "cuda",
        "finished_at": "2025-01-01T00:00:00+00:00", "device_wait_frac": 0.125, "input_wait_ms": 12.5,
        "fwd_bwd_ms": 70.25, "optimizer_ms": 17.25}, PERF_COLUMNS)
    return run_dir


def one_process(root: Path) -> Path:
    """Finished, 3 of 3 epochs; steady img/s (99 + 101) / 2 = 100; best Acc@1 at epoch 1."""
    run_dir = make_run(root, "r18-1x1", world_size=1, nodes=1, fps=[80, 99, 101], val_acc1=[10.0, 30.5, 25.25],
                       val_acc5=[40.0, 60.0, 70.0])
    write_json(run_dir / "eval.json", {"checkpoint": "best.pt", "weights": "ema", "top1_correct": 61,
                                       "top5_correct": 121,
                                       "total": 200, "acc1": 30.5, "acc5": 60.5, "loss": 1.6, "world_size": 1})
    return run_dir


def two_processes(root: Path) -> Path:
    """Finished; steady img/s (180 + 200) / 2 = 190, 95 per process."""
    return make_run(root, "r18-1x2", world_size=2, nodes=1, fps=[150, 180, 200], val_acc1=[12.0, 28.0, 33.0],
                    val_acc5=[41.0, 61.0, 72.0])


def four_processes_cut_off(root: Path) -> Path:
    """Two nodes x 2, cut off after 2 of 3 epochs; steady img/s 340 (epoch 1 only), 85 per process."""
    return make_run(root, "r18-2x2", world_size=4, nodes=2, fps=[300, 340], val_acc1=[9.0, 27.0],
                    val_acc5=[39.0, 59.0])


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    root = tmp_path / "runs"
    return [one_process(root), two_processes(root), four_processes_cut_off(root),
            make_perf_run(root, "mnv2-perf", img_per_s=512.5)]


def by_run(table: pd.DataFrame) -> dict[str, dict]:
    return {row["run"]: row for row in table.to_dict("records")}


def test_summary_has_best_final_eval_steady_fps_and_status(runs):
    summary = by_run(report(runs, echo=False).summary)
    one, two, four, perf = (summary[name] for name in ("r18-1x1", "r18-1x2", "r18-2x2", "mnv2-perf"))
    assert (one["best_epoch"], one["best_val_acc1"], one["best_val_acc5"]) == (1, 30.5, 60.0)
    assert (one["final_val_acc1"], one["final_val_acc5"]) == (25.25, 70.0)
    assert (one["eval_acc1"], one["eval_acc5"], one["eval_weights"]) == (30.5, 60.5, "ema")
    assert (one["img_per_s_all_ranks"], one["img_per_s_per_rank"], one["fps_basis"]) == (100.0, 100.0,
                                                                                        "mean of epochs 1-2")
    assert (one["train_time_s"], one["epochs_done"], one["epochs_planned"], one["status"]) == (161.0, 3, 3, "finished")
    assert (two["img_per_s_all_ranks"], two["img_per_s_per_rank"], two["nodes_x_procs"]) == (190.0, 95.0, "1x2")
    assert pd.isna(two["eval_acc1"]) and pd.isna(two["eval_weights"])
    assert (four["img_per_s_all_ranks"], four["img_per_s_per_rank"], four["fps_basis"]) == (340.0, 85.0, "epoch 1")
    assert (four["nodes_x_procs"], four["world_size"], four["epochs_done"]) == ("2x2", 4, 2)
    assert four["status"] == "running/cut off (2 of 3 epochs)"
    assert (perf["status"], perf["img_per_s_all_ranks"], perf["batch_per_proc"]) == ("perf", 512.5, 64)
    assert perf["fps_basis"] == "perf: 100 steps, first 10 left out" and pd.isna(perf["epochs_done"])
    for row in summary.values():
        assert (row["git_commit"], row["torch"], row["cuda"], row["seed"]) == ("0123abc", "2.14.1", "12.4", 7)
        assert (row["device_name"], row["hostname"], row["amp"]) == ("NVIDIA H100 80GB HBM3", "gpu-node-01", "bf16")
        assert Path(row["config"]).is_file() and Path(row["config"]).name == "config.toml"


def test_scaling_efficiency_against_one_process(runs):
    scaling = report(runs, echo=False).scaling
    assert list(scaling["run"]) == ["r18-1x1", "r18-1x2", "r18-2x2"]  # the perf run is another model, alone
    assert list(scaling["world_size"]) == [1, 2, 4] and set(scaling["base_world_size"]) == {1}
    assert list(scaling["ideal_img_per_s"]) == [100.0, 200.0, 400.0]
    assert list(scaling["speedup"]) == [1.0, 1.9, 3.4]
    assert list(scaling["efficiency_pct"]) == [100.0, 95.0, 85.0]  # 190 / (2 x 100), 340 / (4 x 100)


def test_scaling_base_is_the_smallest_world_size_present(tmp_path):
    runs = [two_processes(tmp_path), four_processes_cut_off(tmp_path)]
    scaling = report(runs, echo=False).scaling
    assert set(scaling["base_world_size"]) == {2} and set(scaling["base_img_per_s_all_ranks"]) == {190.0}
    assert list(scaling["efficiency_pct"]) == [100.0, 89.5]  # 340 / (4 / 2 x 190) = 0.8947


def test_runs_differing_in_batch_or_model_are_not_compared(tmp_path):
    runs = [one_process(tmp_path), make_run(tmp_path, "b64", world_size=2, nodes=1, fps=[1, 2], batch_size=64,
                                            val_acc1=[1, 2], val_acc5=[3, 4])]
    result = report(runs, echo=False)
    assert result.scaling.empty and "Scaling" not in result.markdown
    assert not (runs[0] / "report" / "scaling.csv").exists() and not (runs[0] / "report" / "scaling.png").exists()


def test_per_epoch_table_values_and_ema_columns(tmp_path):
    plain = one_process(tmp_path)
    ema = make_run(tmp_path, "ema", world_size=2, nodes=1, fps=[10, 20], val_acc1=[1, 2], val_acc5=[3, 4],
                   ema=[1.5, 2.5])
    epochs = report([plain, ema], echo=False).epochs
    table = epochs["r18-1x1"]
    assert list(table.columns) == ["epoch", "train_loss", "train_acc1", "train_acc5", "val_loss", "val_acc1",
                                   "val_acc5", "img_per_s_all_ranks", "img_per_s_per_rank", "data_wait_pct",
                                   "device_wait_pct", "epoch_time_s", "lr"]
    assert list(table["epoch"]) == [0, 1, 2] and list(table["val_acc1"]) == [10.0, 30.5, 25.25]
    assert list(table["device_wait_pct"]) == [25.0] * 3
    assert list(table["train_loss"]) == [2.0, 1.75, 1.5] and list(table["data_wait_pct"]) == [1.2] * 3  # 1.25 rounds
    assert list(table["lr"]) == [0.0333333, 0.0333333, 0.01]  # 6 significant digits
    assert list(epochs["ema"]["ema_val_acc1"]) == [1.5, 2.5] and list(epochs["ema"]["ema_val_acc5"]) == [11.5, 12.5]
    columns = list(epochs["ema"].columns)
    assert columns[columns.index("val_acc5") + 1:][:2] == ["ema_val_acc1", "ema_val_acc5"]


@pytest.mark.parametrize("state, status", [
    ("training", "running or killed (2 of 3 epochs)"),
    ("preempted", "preempted, resumes when requeued (2 of 3 epochs)"),
    ("failed", "failed (2 of 3 epochs)"),
    (None, "running/cut off (2 of 3 epochs)"),  # a run dir from before run_state.json
])
def test_status_of_an_unfinished_run_comes_from_its_run_state(tmp_path, state, status):
    run_dir = four_processes_cut_off(tmp_path)
    if state:
        write_json(run_dir / "run_state.json", {"state": state, "epochs_done": 2, "at": "2025-01-01T02:00:00+00:00"})
    assert report([run_dir], echo=False).summary["status"].tolist() == [status]


def parse_markdown_tables(markdown: str) -> dict[str, list[list[str]]]:
    """Each pipe table under its '## ' heading, as rows of cells (header first, separator dropped)."""
    tables, heading = {}, ""
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set(":-") for c in cells):
                tables.setdefault(heading, []).append(cells)
    return tables


def assert_markdown_equals_csv(rows: list[list[str]], csv_path: Path, columns: Sequence[str] | None = None) -> None:
    csv = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    columns = list(columns or csv.columns)
    assert rows[0] == [TITLES[c] for c in columns]
    assert rows[1:] == csv[columns].values.tolist()  # the same text, so the same numbers


def test_markdown_holds_the_same_numbers_as_the_csv(runs, capsys):
    result = report(runs)
    printed = capsys.readouterr().out
    assert printed == result.markdown
    report_dir = runs[0] / "report"
    tables = parse_markdown_tables((report_dir / "report.md").read_text())
    assert set(tables) == {"Summary", "Provenance", "Scaling efficiency", "Per epoch: r18-1x1"}
    assert_markdown_equals_csv(tables["Summary"], report_dir / "summary.csv", SUMMARY_COLUMNS)
    assert_markdown_equals_csv(tables["Provenance"], report_dir / "summary.csv", PROVENANCE_COLUMNS)
    assert_markdown_equals_csv(tables["Scaling efficiency"], report_dir / "scaling.csv")
    assert_markdown_equals_csv(tables["Per epoch: r18-1x1"], report_dir / "epochs-r18-1x1.csv")
    assert "| r18-2x2 " in printed and "## Per epoch: r18-2x2" in printed  # the terminal shows every run


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
        assert image.size[0] >= 800 and image.size[1] >= 400


def test_each_run_dir_gets_its_epochs_the_comparison_and_plots(runs):
    report(runs, echo=False)
    for run_dir in runs:
        files = {p.name for p in (run_dir / "report").iterdir()}
        own = {f"epochs-{run_dir.name}.csv"} if run_dir.name != "mnv2-perf" else set()
        expected = {"summary.csv", "scaling.csv", "report.md", "tables.tex", "accuracy.png", "loss.png", "fps.png",
                    "scaling.png"}
        parquet = {f.replace(".csv", ".parquet") for f in expected | own if f.endswith(".csv")}
        assert files == expected | own | parquet  # the test extra installs pyarrow
        assert len(pd.read_csv(run_dir / "report" / "summary.csv")) == 4
        for png in ("accuracy.png", "loss.png", "fps.png", "scaling.png"):
            assert_valid_png(run_dir / "report" / png)


def test_out_dir_gets_everything_and_a_later_report_removes_what_no_longer_applies(runs, tmp_path):
    out = tmp_path / "results"
    report(runs, out, echo=False)
    assert {f"epochs-{name}.csv" for name in ("r18-1x1", "r18-1x2", "r18-2x2")} <= {p.name for p in out.iterdir()}
    assert not any((run_dir / "report").exists() for run_dir in runs)
    (out / "notes.txt").write_text("mine")
    report(runs[:1], out, echo=False)
    left = {p.name for p in out.iterdir()}
    assert "scaling.csv" not in left and "scaling.png" not in left and "epochs-r18-1x2.csv" not in left
    assert {"notes.txt", "epochs-r18-1x1.csv", "summary.csv", "accuracy.png"} <= left


def test_parquet_tables_equal_the_csv(runs, tmp_path):
    assert parquet_available(), "the test extra installs pyarrow: pip install -e '.[test]'"
    report(runs, tmp_path / "out", echo=False)
    tables = sorted(p.stem for p in (tmp_path / "out").glob("*.csv"))
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.parquet")) == tables and len(tables) == 5
    for stem in tables:  # same values and types: the parquet table written as CSV is the CSV file
        from_parquet = pd.read_parquet(tmp_path / "out" / f"{stem}.parquet")
        assert from_parquet.to_csv(index=False) == (tmp_path / "out" / f"{stem}.csv").read_text(), stem


def latex_rows(tex: str) -> list[list[str]]:
    """The cells of each row of the table in ``tex`` (header first)."""
    body = tex.split("\\toprule\n", 1)[1].split("\n\\bottomrule", 1)[0]
    return [[cell.strip() for cell in line.removesuffix(" \\\\").split(" & ")]
            for line in body.splitlines() if line != "\\midrule"]


def test_tables_tex_holds_the_results_and_scaling_tables_for_a_paper(runs, tmp_path):
    runs.append(make_run(tmp_path / "runs", "r18_odd&name", world_size=1, nodes=1, fps=[50.0], val_acc1=[76.1],
                         val_acc5=[93.0], planned=1))
    report(runs, tmp_path / "out", echo=False)
    tex = (tmp_path / "out" / "tables.tex").read_text()
    results, scaling = tex.split("\n\n")
    assert results.startswith("\\begin{table}") and "\\begin{tabular}{llllrrrrrr}" in results
    header, *rows = latex_rows(results)
    assert header == ["run", "model", "nodes x procs/node", "AMP", "batch/proc", "best Acc@1 \\%", "best Acc@5 \\%",
                      "eval Acc@1 \\%", "eval Acc@5 \\%", "img/s all ranks"]
    by_run = {row[0]: row for row in rows}
    assert by_run["r18-1x1"][5:] == ["30.50", "60.00", "30.50", "60.50", "100.0"]  # the CSV's, fixed decimals
    assert by_run["r18-1x2"][7:9] == ["--", "--"]  # no eval stage
    assert by_run["r18\\_odd\\&name"][5] == "76.10"  # escaped, trailing zero kept
    assert len(rows) == 5 and results.rstrip().endswith("\\end{table}")
    header, *rows = latex_rows(scaling)
    assert header[:3] == ["model", "AMP", "world size"] and len(rows) == len(report(runs, echo=False).scaling)


def test_same_dir_names_are_told_apart_by_their_parents(tmp_path):
    runs = [one_process(tmp_path / "a"), one_process(tmp_path / "b")]
    result = report(runs, tmp_path / "out", echo=False)
    assert list(result.summary["run"]) == ["a/r18-1x1", "b/r18-1x1"]
    assert (tmp_path / "out" / "epochs-a_r18-1x1.csv").is_file()


def test_a_run_without_provenance_is_reported_with_empty_provenance(tmp_path, caplog):
    run_dir = one_process(tmp_path)
    (run_dir / "provenance.json").unlink()
    with caplog.at_level(logging.WARNING):
        row = report([run_dir], echo=False).summary.iloc[0]
    assert pd.isna(row["git_commit"]) or row["git_commit"] == ""
    assert row["seed"] == 7 and row["best_val_acc1"] == 30.5 and "provenance.json is missing" in caplog.text


def test_a_run_dir_without_records_is_an_error_naming_it(runs, tmp_path):
    empty = tmp_path / "started"
    write_config(empty, model="resnet18", epochs=3)
    with pytest.raises(ReportError, match=r"started holds no records: expected epochs.csv .* or perf.csv"):
        report([runs[0], empty], echo=False)
    assert not (runs[0] / "report").exists()  # nothing written when one run dir is unusable
    with pytest.raises(ReportError, match="does not exist"):
        report([tmp_path / "missing"], echo=False)


@pytest.mark.parametrize("edit, message", [
    (lambda header: header.replace(",val_acc5,", ",val_acc_5,"), r"missing \['val_acc5'\], unexpected \['val_acc_5'\]"),
    (lambda header: header.replace(",ema_val_acc1,ema_val_acc5", ""), r"missing \['ema_val_acc1', 'ema_val_acc5'\]"),
    (lambda header: header.replace("train_acc1,train_acc5", "train_acc5,train_acc1"), "in another order"),
])
def test_an_epochs_csv_with_other_columns_is_an_error(tmp_path, edit, message):
    run_dir = one_process(tmp_path)
    header, *rows = (run_dir / "epochs.csv").read_text().splitlines(keepends=True)
    (run_dir / "epochs.csv").write_text(edit(header) + "".join(rows))
    with pytest.raises(ReportError, match=rf"epochs.csv has other columns than the pipeline writes \({message}"):
        report([run_dir], echo=False)


def run_jobs_report(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("DISPLAY", None)  # headless, as in a batch job
    return subprocess.run([sys.executable, "-m", "jobs.report", *argv], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_jobs_report_end_to_end(runs, tmp_path):
    done = run_jobs_report("--run-dir", *map(str, runs[:2]), "--run-dir", str(runs[2]), "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    tables = parse_markdown_tables(done.stdout)
    assert [row[0] for row in tables["Summary"][1:]] == ["r18-1x1", "r18-1x2", "r18-2x2"]
    header, *rows = tables["Scaling efficiency"]
    efficiency = header.index(TITLES["efficiency_pct"])
    assert [row[efficiency] for row in rows] == ["100.0", "95.0", "85.0"]
    assert json.loads(pd.read_csv(tmp_path / "o" / "summary.csv")["world_size"].to_json()) == {"0": 1, "1": 2, "2": 4}
    assert_valid_png(tmp_path / "o" / "scaling.png")

    failed = run_jobs_report("--run-dir", str(tmp_path / "nothing-here"))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "nothing-here does not exist" in failed.stderr and failed.stdout == ""


def test_report_reads_what_the_real_train_stage_writes(tmp_path):
    """Two epochs and a performance run of a tiny model on real JPEGs: the contract holds end to end."""
    data_dir = make_image_folder(tmp_path / "data", train_per_class=8, val_per_class=2)
    flags = dict(data_dir=str(data_dir), model="resnet18", batch_size=8, workers=0, train_crop_size=32,
                 val_resize_size=36, val_crop_size=32, device="cpu", print_freq=100)
    train(build_config(cli_values=dict(flags, run_dir=str(tmp_path / "fit"), epochs=2)))
    train(build_config(cli_values=dict(flags, run_dir=str(tmp_path / "perf"), max_steps=6)))
    result = report([tmp_path / "fit", tmp_path / "perf"], echo=False)
    records = pd.read_csv(tmp_path / "fit" / "epochs.csv")
    fit, perf = (by_run(result.summary)[name] for name in ("fit", "perf"))
    assert (fit["status"], fit["epochs_done"], fit["fps_basis"]) == ("finished", 2, "epoch 1")
    assert fit["img_per_s_all_ranks"] == round(records["img_per_s_all_ranks"].iloc[1], 1) > 0
    assert fit["final_val_acc1"] == round(records["val_acc1"].iloc[1], 2)
    assert fit["torch"] and fit["hostname"] and fit["git_commit"]
    assert perf["status"] == "perf" and perf["img_per_s_all_ranks"] > 0
    assert list(result.epochs) == ["fit"] and len(result.epochs["fit"]) == 2
    assert_valid_png(tmp_path / "fit" / "report" / "accuracy.png")


def test_a_sweep_dir_stands_for_its_points_with_records_and_gets_the_one_report(tmp_path, caplog):
    """sweep.json lists four points; two have no records yet (one waits, one was resumed to before its only epoch,
    which leaves the header alone): left out and named."""
    sweep = tmp_path / "sweep"
    one_process(sweep), two_processes(sweep)
    (sweep / "r18-pending").mkdir()
    write_config(sweep / "r18-forgotten", model="resnet18", epochs=3)
    (sweep / "r18-forgotten" / "epochs.csv").write_text(",".join(EPOCH_COLUMNS) + "\n")
    write_json(sweep / "sweep.json", {"points": [{"name": n, "values": {}} for n in
                                                 ("r18-1x1", "r18-pending", "r18-1x2", "r18-forgotten")]})
    with caplog.at_level(logging.WARNING):
        result = report([sweep], echo=False)
    assert list(result.summary["run"]) == ["r18-1x1", "r18-1x2"]
    assert list(result.scaling["efficiency_pct"]) == [100.0, 95.0]
    assert "2 of 4 point(s) have no records yet" in caplog.text
    assert "left out: r18-pending, r18-forgotten" in caplog.text
    written = {path.relative_to(sweep).as_posix() for path in result.files}
    assert {"report/summary.csv", "report/scaling.csv", "report/epochs-r18-1x1.csv",
            "report/epochs-r18-1x2.csv"} <= written
    assert all(path.startswith("report/") for path in written)


@pytest.mark.parametrize("points", [[{"name": "../elsewhere"}], [{"name": "/abs"}], [{"name": ".."}], [], "x"])
def test_a_sweep_json_naming_paths_outside_the_sweep_dir_is_refused(tmp_path, points):
    sweep = tmp_path / "sweep"
    one_process(sweep)
    write_json(sweep / "sweep.json", {"points": points})
    with pytest.raises(ReportError, match="should list the sweep's points.*fix or remove it"):
        report([sweep], echo=False)
    assert not (sweep / "report").exists()


def test_a_sweep_without_any_records_says_so(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "a").mkdir(parents=True)
    write_json(sweep / "sweep.json", {"points": [{"name": "a"}]})
    with pytest.raises(ReportError, match="none of its 1 point"):
        report([sweep], echo=False)


def test_a_perf_run_shows_where_its_step_time_goes(tmp_path):
    summary = report([make_perf_run(tmp_path, "perf", img_per_s=500.0)], echo=False).summary
    row = summary.iloc[0]
    assert (row["device_wait_pct"], row["input_wait_ms"], row["fwd_bwd_ms"], row["optimizer_ms"]) == \
        (12.5, 12.5, 70.25, 17.25)
