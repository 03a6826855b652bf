"""launch.py --sweep: the grid's points, bad keys and values, --dry-run, and a 2-point sweep on the local executor
reported as one table."""
from __future__ import annotations

import csv

import pytest

import launch
from launch_helpers import no_slurm_path, run_main  # noqa: F401 (a fixture)
from launcher.sweep import sweep_points
from train_helpers import TINY_FLAGS, tiny_data


def test_two_keys_make_four_points_with_typed_values_and_named_run_dirs(tmp_path):
    args = launch.get_args_parser().parse_args(["--stage", "train", "--run-dir", str(tmp_path / "sw"),
                                                "--sweep", "model=resnet18,resnet50", "--sweep", "amp=bf16,none",
                                                "--sweep", "lr=0.1", "--sweep", "channels-last=true"])
    points = sweep_points(args)
    assert [point.name for point in points] == [
        "model=resnet18,amp=bf16,lr=0.1,channels_last=true", "model=resnet18,amp=none,lr=0.1,channels_last=true",
        "model=resnet50,amp=bf16,lr=0.1,channels_last=true", "model=resnet50,amp=none,lr=0.1,channels_last=true"]
    assert points[1].values == {"model": "resnet18", "amp": "none", "lr": "0.1", "channels_last": "true"}
    cfg, run_dirs = launch.resolve_config(points[1].args)
    assert run_dirs == [str(tmp_path / "sw" / points[1].name)] and cfg.train.run_dir == run_dirs[0]
    assert cfg.model.model == "resnet18" and cfg.train.amp == "none"
    values = {name: getattr(getattr(cfg, section), name) for name, section in
              [(n, launch.FIELDS[n][0]) for n in ("lr", "channels_last")]}
    assert values == {"lr": 0.1, "channels_last": True} and type(values["lr"]) is float


def test_numbers_are_parsed_as_the_flag_would(tmp_path):
    args = launch.get_args_parser().parse_args(["--stage", "train", "--run-dir", str(tmp_path / "sw"),
                                                "--sweep", "gpus_per_node=1,2", "--sweep", "time=01:30:00"])
    cfgs = [launch.resolve_config(point.args)[0] for point in sweep_points(args)]
    assert [(c.launch.gpus_per_node, c.launch.time) for c in cfgs] == [(1, 90), (2, 90)]


@pytest.mark.parametrize("sweep, message", [
    ("colour=red,blue", "unknown key 'colour'"),
    ("batch_size=8,eight", "--sweep batch_size: bad value 'eight'"),
    ("amp=bf16,fp8", "amp"),
    ("model=resnet18,no_such_net", "no_such_net"),
    ("model", "expected KEY=V1,V2"),
    ("run_dir=a,b", "run_dir cannot be swept"),
])
def test_bad_key_or_value_is_one_line_and_nothing_is_submitted(sweep, message, no_slurm_path, tmp_path, capsys):
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "local", "--run-dir", tmp_path / "sw",
                              "--data-dir", tmp_path, "--sweep", sweep)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "submitted" not in out and not (tmp_path / "sw").exists()


def test_dry_run_lists_the_points_and_the_first_script(no_slurm_path, tmp_path, capsys):
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "local", "--run-dir", tmp_path / "sw",
                              "--data-dir", tmp_path, "--sweep", "model=resnet18,resnet50", "--sweep", "nodes=1",
                              "--dry-run")
    assert code == 0, err
    assert "sweep: 2 point(s)" in out
    for name in ("model=resnet18,nodes=1", "model=resnet50,nodes=1"):
        assert f"  {name}: {tmp_path / 'sw' / name}\n" in out
    assert "===== the first point, model=resnet18,nodes=1 (the points run one after another, then the report of them all) =====" in out
    assert "--nnodes 1" in out
    assert "dry run: nothing was submitted" in out and not (tmp_path / "sw").exists()


def test_dry_run_on_slurm_shows_one_throttled_array_per_resource_shape_and_the_report_after_them(
        no_slurm_path, tmp_path, capsys):
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "slurm", "--device", "cpu", "--run-dir",
                              tmp_path / "sw", "--data-dir", tmp_path, "--sweep", "model=resnet18,resnet50",
                              "--sweep", "nodes=1,2", "--array-parallelism", 1, "--dry-run")
    assert code == 0, err
    assert "sweep: 4 point(s)" in out
    assert ("job array 1 of 2, 2 point(s) (model=resnet18,nodes=1, model=resnet50,nodes=1), at most 1 at once"
            in out)
    assert ("job array 2 of 2, 2 point(s) (model=resnet18,nodes=2, model=resnet50,nodes=2), at most 1 at once"
            in out)
    lines = out.splitlines()
    assert lines.count("#SBATCH --array=0-1%1") == 2
    assert "#SBATCH --nodes=1" in lines and "#SBATCH --nodes=2" in lines
    assert f"#SBATCH --output={tmp_path / 'sw'}/logs/%A_%a/%A_%a_0_log.out" in lines
    assert f"--log-dir {tmp_path / 'sw'}/model=resnet18,nodes=2/logs/$JOB_ID/node$NODE_RANK" in out
    assert f"===== report of the sweep into {tmp_path / 'sw'}/report/: sbatch script =====" in lines
    assert "#SBATCH --dependency='afterany:<array 1 id>:<array 2 id>'" in lines
    assert "dry run: nothing was submitted" in out and not (tmp_path / "sw").exists()


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_two_point_sweep_runs_locally_and_reports_as_one_table(no_slurm_path, tmp_path, capsys):
    data = tiny_data(tmp_path / "data")
    sweep_dir = tmp_path / "sw"
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "local", "--data-dir", data,
                              "--run-dir", sweep_dir, *TINY_FLAGS, "--max-steps", 3, "--preflight-timeout-s", 0,
                              "--sweep", "batch_size=4,8")
    assert code == 0, out[-3000:] + err
    runs = ["batch_size=4", "batch_size=8"]
    assert sorted(p.name for p in sweep_dir.iterdir()) == [*runs, "logs", "report", "sweep.json"]
    assert out.rstrip().endswith(f"sweep finished: 2 point(s); report in {sweep_dir / 'report'}")
    rows = read_rows(sweep_dir / "report" / "summary.csv")
    assert [r["run"] for r in rows] == runs and [r["batch_per_proc"] for r in rows] == ["4", "8"]
    assert not any((sweep_dir / run / "report").exists() for run in runs)  # one report, in the sweep dir
    (sweep_dir / "report" / "summary.csv").unlink()
    code, out, err = run_main(capsys, "--stage", "report", "--executor", "local", "--run-dir", sweep_dir)
    assert code == 0, out[-3000:] + err
    assert [r["run"] for r in read_rows(sweep_dir / "report" / "summary.csv")] == runs


def test_a_failed_point_leaves_the_others_trained_and_reported(no_slurm_path, tmp_path, capsys):
    """The second point's data dir has no train/: its training fails, the first one's report still comes."""
    data = tiny_data(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    sweep_dir = tmp_path / "sw"
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "local", "--run-dir", sweep_dir,
                              *TINY_FLAGS, "--max-steps", 3, "--preflight-timeout-s", 0, "--max-restarts", 0,
                              "--sweep", f"data_dir={data},{tmp_path / 'empty'}")
    assert code == 1, out[-3000:] + err
    good, bad = (f"data_dir={str(path).replace('/', '_')}" for path in (data, tmp_path / "empty"))
    assert f"sweep point {bad} failed:" in out and "===== sweep report =====" in out
    assert f"1 of 2 sweep point(s) failed: {bad} (their logs say why" in err
    assert f"; the report in {sweep_dir / 'report'} holds the others" in err
    assert [r["run"] for r in read_rows(sweep_dir / "report" / "summary.csv")] == [good]
