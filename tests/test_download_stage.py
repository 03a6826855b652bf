"""The download stage as users run it: python -m jobs.download, launch.py's checks, and --stage all from links."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import launch
from download_helpers import ArchiveServer
from pipeline.core.config import build_config, dumps
from pipeline.prep.archives import DEVKIT_TAR, TRAIN_TAR, VAL_TAR
from pipeline.prep.synthetic import make_imagenet_archives
from train_helpers import TINY_FLAGS, run_module

SECRETS = ("SECRET-TOKEN-42", "PASSWORD-17", "BEARER-99")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """16 train and 8 val images in 2 classes: enough for one tiny epoch of the whole chain."""
    root = make_imagenet_archives(tmp_path_factory.mktemp("served"), num_classes=2, train_per_class=8,
                                  val_per_class=4, size=(32, 28)).archive_dir
    with ArchiveServer(root) as running:
        yield running


def secret_links(server) -> list[str]:
    return [server.url(TRAIN_TAR, query=f"token={SECRETS[0]}"), server.url(VAL_TAR, userinfo=f"me:{SECRETS[1]}"),
            server.url(DEVKIT_TAR, folder=SECRETS[0])]


def assert_no_secret(texts: list[str], folders: list[Path]) -> None:
    """No secret in the texts nor in any file under the folders; submitit's job pickles (the job's input, like
    a --url-file) are the one place the links are stored."""
    files = [p for folder in folders for p in folder.rglob("*") if p.is_file() and p.suffix != ".pkl"]
    assert files
    for secret in SECRETS:
        assert not any(secret in text for text in texts), secret
        assert not [p for p in files if secret.encode() in p.read_bytes()], secret


def test_tokens_never_reach_logs_reports_or_saved_configs(server, tmp_path):
    links = secret_links(server)
    (tmp_path / "links.txt").write_text(f"# my links\n{links[1]}\n\n{links[2]}\n")
    server.cut_at[TRAIN_TAR] = 3000  # a retry, so its warning is logged too
    out = tmp_path / "archives"
    argv = ["--archive-dir", str(out), "--url", links[0], "--url-file", str(tmp_path / "links.txt"),
            "--header", f"Authorization: Bearer {SECRETS[2]}", "--skip-checksum"]
    done = run_module("jobs.download", argv)
    assert done.returncode == 0, done.stderr
    assert "retry 1 of 10" in done.stderr and "http://127.0.0.1:" in done.stderr
    assert {r["headers"].get("Authorization") for r in server.requests if r["name"] == TRAIN_TAR} == \
        {f"Bearer {SECRETS[2]}"}
    report = json.loads((out / "download_report.json").read_text())
    assert sorted(report["files"]) == sorted([TRAIN_TAR, VAL_TAR, DEVKIT_TAR])
    server.status[VAL_TAR] = 403
    (out / VAL_TAR).unlink()  # an expired link, the file to fetch again
    refused = run_module("jobs.download", argv)
    del server.status[VAL_TAR]
    assert refused.returncode == 2 and f"error: {VAL_TAR}: HTTP 403 Forbidden from http://127.0.0.1:" in refused.stderr
    cfg = build_config(cli_values={"url": links, "header": [f"Authorization: Bearer {SECRETS[2]}"]})
    assert_no_secret([done.stdout, done.stderr, refused.stdout, refused.stderr, dumps(cfg)], [out])


def run_launch(capsys, *argv):
    code = launch.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("flags, message", [
    ([], "the download stage has no links: pass --url URL"),
    (["--url", "ftp://host/ILSVRC2012_img_val.tar"], "is not an http:// or https:// link"),
    (["--url", "https://host/get/?file=x&token=SECRET-TOKEN-42"], "does not end with a plain file name"),
    (["--url", "https://a/ILSVRC2012_img_val.tar", "--url", "https://b/x/ILSVRC2012_img_val.tar"],
     "two links download to ILSVRC2012_img_val.tar"),
    (["--url", "https://host/v.tar?token=SECRET-TOKEN-42\x1b"], "= https://host/v.tar?... holds control character"),
    (["--url", "http://[::1/SECRET-TOKEN-42/v.tar?token=SECRET-TOKEN-42"], "has a malformed host or port"),
    (["--url", "https://host/v.tar?token=SECRET-TOKEN-42 x"], "link https://host/v.tar?... holds a space"),
    (["--url", "https://host/v.tar", "--header", "X-Key: BEARER-99é"], "value holds a non-ASCII or control character"),
    (["--url", "https://host/a.tar", "--url", "https://host/a.tar.part"], "collide: a.tar is written to a.tar.part"),
    (["--url-file", "{tmp}/none.txt"], "url file {tmp}/none.txt (--url-file) does not exist"),
    (["--url", "https://host/v.tar", "--header", "BEARER-99"], "expected 'Name: value'"),
    (["--url", "https://host/v.tar", "--cookie-file", "{tmp}/none.txt"], "cannot read cookie file"),
    (["--url", "https://host/v.tar", "--cookie-file", "{tmp}/bad.txt"], "{tmp}/bad.txt (--cookie-file) line 2"),
    (["--url", "https://host/v.tar", "--download-workers", "0"], "download_workers (--download-workers) = 0"),
])
def test_bad_download_input_is_one_line_before_any_job(flags, message, tmp_path, capsys):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    (tmp_path / "bad.txt").write_text("# Netscape HTTP Cookie File\nhost\tFALSE\t/\tPASSWORD-17\n")
    code, out, err = run_launch(capsys, "--stage", "download", "--executor", "local", "--dry-run", "--archive-dir",
                                tmp_path / "a", "--run-dir", tmp_path / "run", *flags)
    assert code == 2 and message.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err
    assert not any(secret in err + out for secret in SECRETS) and not (tmp_path / "run").exists()


def test_all_with_links_starts_with_download_and_prep_waits_for_it(server, tmp_path, capsys):
    code, out, _ = run_launch(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", "--url",
                              secret_links(server)[0], "--archive-dir", tmp_path / "new", "--run-dir", tmp_path)
    stages = re.findall(r"^===== (\w+): sbatch script", out, re.M)
    assert code == 0 and stages == ["download", "prep", "train", "eval", "report"]
    assert "#SBATCH --dependency='afterok:<download job id>'" in out and "pipeline.prep.download.fetch(cfg)" in out
    assert "would stop here" not in out  # the archive dir is made by the download
    assert not any(secret in out for secret in SECRETS)


@pytest.mark.slow
def test_all_from_links_on_the_local_executor(server, tmp_path, capsys):
    archives, run_dir = tmp_path / "archives", tmp_path / "run"
    code, out, err = run_launch(capsys, "--stage", "all", "--executor", "local", *sum(
        (["--url", link] for link in secret_links(server)), []), "--archive-dir", archives, "--skip-checksum",
        "--data-dir", tmp_path / "data", "--run-dir", run_dir, "--epochs", 1, *TINY_FLAGS)
    assert code == 0, out[-3000:] + err
    order = [re.search(rf"^\[{stage} (\d+)\] done$", out, re.M) for stage in launch.STAGES]
    assert all(order) and [m.start() for m in order] == sorted(m.start() for m in order)
    assert out.rstrip().endswith(f"finished: download -> prep -> train -> eval -> report; run dir {run_dir}")
    assert json.loads((run_dir / "eval.json").read_text())["total"] == 8
    assert_no_secret([out, err], [run_dir, archives, tmp_path / "data"])
