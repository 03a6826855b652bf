"""What the login node can judge is refused before anything is submitted, in one line (pipeline.core.validate):
missing trackers, files that are no weights, absurd sizes, Slurm's formats, ports, folders that are files, a run
dir given twice, a sweep point whose run dir name no file system takes."""
from __future__ import annotations

import sys

import pytest

from launch_helpers import no_slurm_path, run_main  # noqa: F401 (a fixture)


def one_line_refusal(capsys, *argv):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "sbatch" not in out and "submitted" not in out
    return err


def test_wandb_not_installed_is_refused_at_the_login_node(monkeypatch, no_slurm_path, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec finds nothing
    err = one_line_refusal(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", "--wandb",
                           "--run-dir", tmp_path / "run")
    assert "train.wandb (--wandb) needs the wandb package" in err and "--no-wandb" in err


@pytest.mark.parametrize("content, message", [
    (None, "is a folder, not a weights file"),
    (b"<html>login</html>", "is not a PyTorch weights file"),
    (b"", "is not a PyTorch weights file"),
])
def test_pretrained_that_is_no_weights_file_is_refused(content, message, no_slurm_path, tmp_path, capsys):
    weights = tmp_path / "w.pt"
    weights.mkdir() if content is None else weights.write_bytes(content)
    err = one_line_refusal(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", "--model", "resnet18",
                           "--pretrained", weights, "--run-dir", tmp_path / "run")
    assert f"model.pretrained (--pretrained) {weights} {message}" in err


def test_a_torch_saved_file_passes_the_weights_check(tmp_path):
    import torch

    from pipeline.core.validate import check_weights_file

    for legacy in (False, True):
        path = tmp_path / f"w{legacy}.pt"
        torch.save({"w": torch.zeros(1)}, path, _use_new_zipfile_serialization=not legacy)
        check_weights_file(str(path))


@pytest.mark.parametrize("mem", ["0", "4096", "200G", "512m", "2T"])
def test_slurm_memory_formats_pass(mem, no_slurm_path, tmp_path, capsys):
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", "--mem", mem,
                              "--run-dir", tmp_path / "run")
    assert code == 0 and f"#SBATCH --mem={mem}" in out, err


@pytest.mark.parametrize("url, message", [
    ("http://example.org:99999/a/x.tar?token=s3cret", "has a malformed host or port (a port is a number in 1..65535"),
    ("http://example.org:0/x.tar", "link http://example.org/x.tar has a malformed host or port"),
])
def test_a_link_with_an_impossible_port_is_refused_without_its_token(url, message, no_slurm_path, tmp_path, capsys):
    err = one_line_refusal(capsys, "--stage", "download", "--executor", "slurm", "--dry-run", "--url", url,
                           "--archive-dir", tmp_path / "a", "--run-dir", tmp_path / "run")
    assert message in err and "s3cret" not in err


def test_a_report_run_dir_given_twice_is_refused(no_slurm_path, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    err = one_line_refusal(capsys, "--stage", "report", "--executor", "local", "--run-dir", tmp_path / "a",
                           f"{tmp_path}/x/../a")
    assert f"--run-dir {tmp_path}/x/../a is given twice (also as {tmp_path}/a)" in err
    assert not (tmp_path / "a" / "logs").exists()


def test_a_sweep_point_name_longer_than_a_file_name_is_refused_before_any_point_runs(no_slurm_path, tmp_path,
                                                                                      capsys):
    err = one_line_refusal(capsys, "--stage", "train", "--executor", "local", "--run-dir", tmp_path / "sw",
                           "--sweep", "model=resnet18,resnet34", "--sweep", f"job_name=short,{'y' * 260}")
    assert "point model=resnet18,job_name=yyy" in err  # model=resnet18,job_name= and 260 y
    assert "is 284 bytes, more than a file name may be (255)" in err
    assert not (tmp_path / "sw").exists()

