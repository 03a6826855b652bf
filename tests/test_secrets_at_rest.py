"""Secrets at rest: submitit's job inputs hold --header and --url values, so only their owner may read them; a
--sweep never writes a credential into run dir names or sweep.json."""
from __future__ import annotations

import stat

import pytest

from launch_helpers import no_slurm_path, run_main  # noqa: F401 (a fixture)

SECRET = "Bearer s3cret-token"


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_job_inputs_holding_a_header_are_readable_by_their_owner_only(no_slurm_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, _ = run_main(capsys, "--stage", "download", "--executor", "local", "--url", "http://127.0.0.1:9/x.tar",
                          "--header", f"Authorization: {SECRET}", "--archive-dir", tmp_path / "archives",
                          "--run-dir", run_dir, "--download-retries", 0)
    assert code == 1  # nothing listens on port 9: the job fails, its inputs stay
    pickles = list((run_dir / "logs").glob("*/*_submitted.pkl"))
    assert len(pickles) == 1 and SECRET.encode() in pickles[0].read_bytes()  # what is protected
    assert mode(pickles[0]) == 0o600
    assert mode(pickles[0].parent) == 0o700 and mode(run_dir / "logs") == 0o700


@pytest.mark.parametrize("sweep", [f"header=Authorization: {SECRET}", "url=http://h/a?token=s3cret-token,http://h/b",
                                   "cookie-file=a.txt,b.txt"])
def test_a_sweep_over_a_credential_is_refused_without_echoing_it(sweep, no_slurm_path, tmp_path, capsys):
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "local", "--run-dir", tmp_path / "sw",
                              "--data-dir", tmp_path, "--sweep", sweep)
    assert code == 2 and "cannot be swept" in err and len(err.strip().splitlines()) == 1, err
    assert "s3cret" not in out + err and not (tmp_path / "sw").exists()


def test_a_logs_folder_that_cannot_be_made_private_is_one_line(monkeypatch, no_slurm_path, tmp_path, capsys):
    from pathlib import Path

    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(Path, "chmod", refuse)  # as for a run dir another user made
    code, _, err = run_main(capsys, "--stage", "download", "--executor", "local", "--url", "http://127.0.0.1:9/x.tar",
                            "--archive-dir", tmp_path / "archives", "--run-dir", tmp_path / "run")
    assert code == 2 and f"cannot make {tmp_path}/run/logs private (mode 0700)" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.glob("run/logs/*"))


@pytest.mark.parametrize("table", ['header = "Authorization: Bearer s3cret"',
                                   'url = "https://example.org/x.tar?token=s3cret"'])
def test_a_credential_of_the_wrong_type_in_a_config_file_is_refused_without_its_value(table, no_slurm_path, tmp_path,
                                                                                     capsys):
    config = tmp_path / "c.toml"
    config.write_text(f"[download]\n{table}\n")
    code, out, err = run_main(capsys, "--stage", "download", "--executor", "local", "--config", config,
                              "--archive-dir", tmp_path / "a", "--dry-run")
    assert code == 2 and "must be a list of strings, got a str" in err and "s3cret" not in err + out
