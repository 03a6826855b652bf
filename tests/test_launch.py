"""launch.py without Slurm: dry-run scripts, bad input, and real jobs through submitit's local executor."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import launch
from jobs.preflight import EXIT_NO_ANSWER
from jobs.torchrun import TorchrunJob, child_pids, rendezvous_port, torchrun_command
from launch_helpers import no_slurm_path, run_main  # noqa: F401 (a fixture)
from launcher.backends import get_backend
from launcher.backends import slurm as slurm_backend
from launcher.follow import LogFollower, StageFailed, Submitted, failure_text, follow
from pipeline.core.config import Config
from train_helpers import TINY_FLAGS  # resnet18 on 32 px crops: the smallest real training

REPO = Path(launch.__file__).resolve().parent


def sbatch_sections(text: str) -> dict[str, str]:
    """Dry-run output split into {stage: its sbatch script}."""
    parts = re.split(r"===== (\w+): sbatch script[^\n]*\n", text)
    return {parts[i]: parts[i + 1].split("=====")[0] for i in range(1, len(parts), 2)}


def test_dry_run_four_nodes_eight_gpus(no_slurm_path, tmp_path, capsys):
    code, out, _ = run_main(capsys, "--stage", "train", "--nodes", 4, "--gpus-per-node", 8, "--executor", "slurm",
                            "--dry-run", "--partition", "gpu", "--time", 1440, "--run-dir", tmp_path / "run")
    assert code == 0
    script = sbatch_sections(out)["train"]
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=40", "#SBATCH --partition=gpu", "#SBATCH --time=1440",
                 "#SBATCH --signal=USR2@90", "#SBATCH --job-name=imagenet-train",
                 f"#SBATCH --output={tmp_path}/run/logs/%j/%j_0_log.out"):
        assert line in script.splitlines()
    assert "dependency" not in script
    assert re.search(r"^srun .* --cpus-per-task 40 .* -m submitit\.core\._submit .*/run/logs/%j$", script, re.M)
    torchrun = next(line for line in out.splitlines() if "torch.distributed.run" in line)
    assert "--nnodes 4 --nproc-per-node 8 --node-rank $NODE_RANK --master-addr $MASTER_ADDR" in torchrun
    assert "--max-restarts 2" in torchrun and torchrun.endswith(f"-m jobs.train --config {tmp_path}/run/logs/"
                                                                 "$JOB_ID/train_config.toml")
    assert "jobs.preflight" in out and "over all 32 ranks" in out
    assert out.rstrip().endswith("dry run: nothing was submitted")
    assert not (tmp_path / "run").exists()


def test_dry_run_chain_waits_on_each_stage_and_cpu_jobs_ask_for_no_gpus(no_slurm_path, tmp_path, capsys):
    config = tmp_path / "cluster.toml"
    config.write_text('[launch]\npartition = "from-file"\nnodes = 2\nsbatch = ["mail-type=END"]\n'
                      '[train]\ndevice = "cpu"\n')
    code, out, _ = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", "--config", config,
                            "--partition", "from-flag", "--procs-per-node", 2, "--sbatch", "requeue",
                            "--run-dir", tmp_path / "run")
    assert code == 0
    scripts = sbatch_sections(out)
    assert list(scripts) == ["prep", "train", "eval", "report"]
    for stage, script in scripts.items():
        lines = script.splitlines()
        assert "#SBATCH --partition=from-flag" in lines  # command line > file
        assert "#SBATCH --requeue" in lines and "#SBATCH --mail-type=END" not in lines  # a flag's list replaces
        assert not any("gpus" in line for line in lines)  # device cpu: tasks and CPUs, no GRES
        if stage == "prep":
            assert not any("dependency" in line for line in lines) and "#SBATCH --nodes=1" in lines
        else:
            previous = list(scripts)[list(scripts).index(stage) - 1]
            assert f"#SBATCH --dependency='afterok:<{previous} job id>'" in lines
            assert "#SBATCH --kill-on-invalid-dep=yes" in lines
    assert "#SBATCH --nodes=2" in scripts["train"] and "#SBATCH --cpus-per-task=10" in scripts["train"]
    assert "#SBATCH --cpus-per-task=5" in scripts["prep"]  # 4 writer threads (--workers) and the reader
    assert "cpus-per-task" not in scripts["report"]
    assert "--nnodes 2 --nproc-per-node 2" in out
    assert "warning: a real launch would stop here: archive dir" in out


@pytest.mark.parametrize("stage, flags, cpus", [
    ("prep", ["--workers", "7"], 8),  # 7 writer threads and the reader
    ("prep", ["--workers", "7", "--prep-cpus", "3"], 3),
    ("prep", ["--workers", "7", "--cpus-per-task", "64"], 8),  # the training's request is not prep's
    ("train", ["--procs-per-node", "2", "--workers", "3"], 8),  # 2 processes x (3 loader workers + 1)
    ("eval", ["--procs-per-node", "2", "--cpus-per-task", "3"], 3),
])
def test_jobs_ask_for_a_cpu_per_process_and_worker_unless_told(stage, flags, cpus, no_slurm_path, tmp_path, capsys):
    code, out, _ = run_main(capsys, "--stage", stage, "--executor", "slurm", "--dry-run", *flags,
                            "--run-dir", tmp_path / "run")
    script = sbatch_sections(out)[stage]
    assert code == 0 and f"#SBATCH --cpus-per-task={cpus}" in script.splitlines()
    assert re.search(rf"^srun .* --cpus-per-task {cpus} ", script, re.M)  # Slurm >= 22.05: srun does not inherit it


@pytest.mark.parametrize("argv, message", [
    (["--stage", "nope"], "invalid choice: 'nope'"),
    (["--stage", "train", "--nodes", "2", "--executor", "local"], "Use --procs-per-node N for N processes here"),
    (["--stage", "train", "--executor", "local", "--data-dir", "{tmp}/missing"], "data dir {tmp}/missing does not"),
    (["--stage", "prep", "--executor", "local", "--archive-dir", "{tmp}/none"], "archive dir {tmp}/none does not"),
    (["--stage", "eval", "--executor", "local", "--data-dir", "{tmp}", "--checkpoint", "{tmp}/c.pt"],
     "checkpoint {tmp}/c.pt does not exist"),
    (["--stage", "train", "--run-dir", "{tmp}/a", "{tmp}/b", "--executor", "local"], "are for --stage report"),
    (["--stage", "train", "--sbatch", "nodes=3", "--dry-run"], "use --nodes for this option"),
    (["--stage", "train", "--sbatch", "x y", "--dry-run"], "expected key=value"),
    (["--stage", "all", "--detach", "--executor", "local"], "--detach with the local executor runs one stage"),
    (["--stage", "train", "--gpus-per-node", "0", "--dry-run"], "gpus_per_node (--gpus-per-node) = 0: must be at"),
    (["--stage", "train", "--config", "{tmp}/missing.toml"], "config file {tmp}/missing.toml does not exist"),
    (["--stage", "eval", "--model", "builtins:dict", "--dry-run"], "the factory returned dict, not a torch.nn"),
    (["--stage", "report", "--run-dir", "{tmp}/a", "{tmp}/b\tc", "--dry-run"], "--run-dir = "),
])
def test_bad_input_is_a_clear_error(argv, message, no_slurm_path, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with_executor = argv if "--executor" in argv else [*argv, "--executor", "slurm"]
    try:
        code, _, err = run_main(capsys, *with_executor)
    except SystemExit as exc:  # argparse's own errors
        code, err = exc.code, capsys.readouterr().err
    assert code == 2
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("**/*_submitted.pkl"))


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)), "is not text (not UTF-8)"),
    (b'[launch]\njob_name = "a\\nb"\n', "launch.job_name (--job-name) = 'a\\nb' holds control character(s)"),
    (b'[launch]\nsbatch = ["comment=\\u0007"]\n', "holds control character(s) '\\x07'"),
    (b"[model]\nmodel = 'builtins:print'\n", "model 'builtins:print' is not a model factory"),
    (b"lr = 0.5\n[model]\nmodel = 'resnet18'\n", "unknown key 'lr' at the top level; keys belong in sections "
                                                   "[data], [prep], [download], [model], [optim], [train], [eval], "
                                                   "[launch], [slurm] (lr belongs in [optim])"),
    (b"colour = 'red'\n", "unknown key 'colour' at the top level; keys belong in sections [data]"),
    (b"[launch]\nnodes = 1\n[launch.extra]\n", "unknown key 'extra' in [launch]"),
])
def test_bad_config_file_is_one_line(content, message, no_slurm_path, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_bytes(content)
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", "--config", config)
    assert code == 2 and message in err and "Traceback" not in err and "sbatch" not in out


def test_bad_model_in_a_chain_stops_before_prep_runs(no_slurm_path, tmp_path, capsys):
    (tmp_path / "archives").mkdir()
    code, out, err = run_main(capsys, "--stage", "all", "--executor", "local", "--archive-dir", tmp_path / "archives",
                              "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "run", "--model", "no_such_net")
    assert code == 2 and "unknown model 'no_such_net'" in err and "submitted" not in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_debug_shows_the_traceback_of_bad_input(no_slurm_path, tmp_path, capsys):
    code, _, err = run_main(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", "--batch-size", "0",
                            "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.rstrip().splitlines()[-1] == "launch.py: error: train.batch_size (--batch-size) = 0: must be at least 1 " \
                                            "(images per process)"


def test_dry_run_torchrun_line_pastes_into_a_shell(no_slurm_path, tmp_path, capsys):
    """Quoted for the shell, with the job's placeholders left to expand; odd run dirs included."""
    run_dir = tmp_path / "my run's \"dir\" $HOME `x` ü"
    code, out, _ = run_main(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", "--nodes", 2,
                            "--run-dir", run_dir)
    line = next(line for line in out.splitlines() if "torch.distributed.run" in line)
    values = {"NODE_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "20016", "JOB_ID": "42", "RESTARTS": "3"}
    words = subprocess.run(["/bin/bash", "-c", "printf '%s\\n' " + line], env=values, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    job_dir = f"{run_dir}/logs/42"
    assert code == 0 and words == torchrun_command(
        nnodes=2, nproc_per_node=1, node_rank=1, master_addr="node7", master_port=20016, run_id="42-3",
        max_restarts=2, log_dir=f"{job_dir}/node1", module="jobs.train", args=["--config", f"{job_dir}/train_config.toml"])


@pytest.mark.parametrize("flags, message", [
    (["--config", "{tmp}"], "config file {tmp} is a directory"),
    (["--batch-size", "0"], "train.batch_size (--batch-size) = 0: must be at least 1"),
    (["--workers", "-1"], "data.workers (--workers) = -1: must be at least 0"),
    (["--prefetch-factor", "0"], "prefetch_factor (--prefetch-factor) = 0: must"),
    (["--train-crop-size", "0"], "train_crop_size (--train-crop-size) = 0: must"),
    (["--save-every", "0"], "save_every (--save-every) = 0: must be at least 1"),
    (["--epochs", "0"], "epochs (--epochs) = 0: must be at least 1"),
    (["--cpus-per-task", "-4"], "cpus_per_task (--cpus-per-task) = -4: must be"),
    (["--max-restarts", "-1"], "max_restarts (--max-restarts) = -1: must be"),
    (["--time", "10", "--signal-delay-s", "600"], "is not shorter than the time"),
    (["--lr", "nan"], "optim.lr (--lr) = nan: must be a finite number"),
    (["--warmup-epochs", "5", "--epochs", "5"], "leave no epoch of the main"),
    (["--momentum", "0", "--nesterov"], "nesterov needs momentum > 0"),
    (["--device", "cpu", "--sync-bn", "--procs-per-node", "2"], "no CPU kernel"),
    (["--dataset", "cifar10", "--decode", "device"], "use --decode cpu"),
    (["--model", "os:system"], "model 'os:system' is not a model factory"),
    (["--pretrained", "{tmp}/w.pt"], "weights file {tmp}/w.pt does not exist"),
    (["--job-name", "x\nsrun rm -rf ~"], "holds control character(s) '\\n'"),
    (["--sbatch", "comment=a\rb"], "slurm.sbatch (--sbatch) = 'comment=a\\rb' holds"),
    (["--data-dir", "{tmp}/d\x1b[2J"], "holds control character(s) '\\x1b'"),
    (["--train-crop-size", "100000"], "data.train_crop_size (--train-crop-size) = 100000: must be at most 2048"),
    (["--val-resize-size", "4096"], "val_resize_size (--val-resize-size) = 4096: must be at most 2048"),
    (["--val-resize-size", "200", "--val-crop-size", "224"], "data.val_crop_size = 224 is larger than val_resize"),
    (["--mem", "abc"], "launch.mem (--mem) = 'abc': write Slurm's format"),
    (["--mem", "200 GB"], "launch.mem (--mem) = '200 GB'"),
    (["--download-ranges", "100000"], "download.download_ranges (--download-ranges) = 100000: must be at most 64"),
    (["--run-dir", "{tmp}/file"], "train.run_dir (--run-dir) {tmp}/file is a file, not a folder"),
    (["--archive-dir", "{tmp}/file"], "prep.archive_dir (--archive-dir) {tmp}/file is a file, not a folder"),
])
def test_bad_value_is_one_line_before_anything_is_submitted(flags, message, no_slurm_path, tmp_path, capsys):
    """Every value a launcher can judge is refused by the validation of the resolved config (pipeline.core.validate)."""
    (tmp_path / "file").write_text("x")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    code, out, err = run_main(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", *flags)
    assert code == 2 and message.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err and "sbatch" not in out


def test_auto_executor_without_sbatch_is_local_and_says_so(no_slurm_path, tmp_path, capsys):
    code, out, _ = run_main(capsys, "--stage", "train", "--dry-run", "--procs-per-node", 2, "--run-dir", tmp_path)
    assert code == 0
    assert out.startswith("executor: local (no sbatch on PATH")
    assert "local executor on this machine" in out and "--nnodes 1 --nproc-per-node 2" in out


def test_slurm_executor_without_slurm_says_what_to_do(no_slurm_path, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code, _, err = run_main(capsys, "--stage", "train", "--executor", "slurm", "--data-dir", tmp_path / "data",
                            "--run-dir", tmp_path / "run")
    assert code == 2 and "no Slurm client; use --executor local" in err


def test_rendezvous_port_is_shared_by_nodes_and_fresh_after_requeue():
    ports = {rendezvous_port("123456", restarts) for restarts in range(5)}
    assert len(ports) == 5
    assert all(20000 <= p < 32000 and p % 2 == 0 for p in ports)  # p + 1 (pre-flight) stays below 32768
    assert rendezvous_port("123456", 0) == rendezvous_port("123456", 0)


def test_log_follower_prints_only_new_complete_lines(tmp_path):
    log = tmp_path / "a.log"
    out = io.StringIO()
    follower = LogFollower([log, tmp_path / "never.log"], "[x] ", out)
    follower.poll()
    log.write_text("one\ntw")
    follower.poll()
    with open(log, "a") as fh:
        fh.write("o\nthree")
    follower.poll()
    assert out.getvalue() == "[x] one\n[x] two\n"
    follower.poll(final=True)
    assert out.getvalue().endswith("[x] three\n")


def test_failure_text_keeps_the_exception_not_the_frames():
    trace = textwrap.dedent("""\
        Job (task=0) failed during processing with trace:
        ----------------------
        Traceback (most recent call last):
          File "x.py", line 1, in f
            g()
        jobs.torchrun.WorkerFailedError: train failed on node 0: rank 1 exited with code 3
        Last lines:
        Traceback (most recent call last):
          File "w.py", line 2
        ValueError: bad
        ----------------------
        You can check full logs with 'job.stderr(0)'""")
    text = failure_text(RuntimeError(trace))
    assert text.startswith("jobs.torchrun.WorkerFailedError: train failed on node 0: rank 1 exited with code 3")
    assert text.rstrip().endswith("ValueError: bad") and 'File "x.py"' not in text


def write_module(folder: Path, name: str, body: str) -> str:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def local_torchrun_job(tmp_path, module: str, nproc: int, **launch_fields) -> Submitted:
    """Submit a TorchrunJob running ``module`` through the launcher's own local executor."""
    cfg = Config()
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.train.device = "cpu"
    cfg.launch.gpus_per_node = nproc
    for key, value in launch_fields.items():
        setattr(cfg.launch, key, value)
    local = get_backend("local")
    executor = local.executor(cfg, local.parameters(cfg, "train"))
    return Submitted("train", executor.submit(TorchrunJob("train", cfg, module=module)), "local")


def test_crashed_worker_is_retried_then_reported_with_rank_and_log(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    module = write_module(tmp_path, "crashing_worker", """\
        import os, sys
        if os.environ["RANK"] == "1":
            print("rank 1 gives up", file=sys.stderr, flush=True)
            sys.exit(3)
    """)
    sub = local_torchrun_job(tmp_path, module, nproc=2, max_restarts=1, preflight_timeout_s=0)
    with pytest.raises(StageFailed) as failure:
        follow(sub, io.StringIO(), poll_s=0.5)
    message = str(failure.value)
    assert "rank 1 (local rank 1) exited with code 3 after 1 restart(s)" in message
    log_file = Path(re.search(r"Its log: (\S+)", message).group(1))
    assert log_file.name == "stderr.log" and log_file.parent.parent.name == "attempt_1"
    assert "rank 1 gives up" in log_file.read_text() and "rank 1 gives up" in message


def test_preflight_names_the_rank_that_never_answers(tmp_path):
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": str(REPO)}
    beats = tmp_path / "beats"
    cmd = [sys.executable, "-m", "jobs.preflight", "--device", "cpu", "--timeout-s", "4", "--heartbeat-dir",
           str(beats), "--hosts", "node-a,node-b"]
    start = time.monotonic()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_NO_ANSWER, result.stderr
    assert time.monotonic() - start < 60
    assert "no answer from rank 1 (node-b) never started" in result.stderr
    assert "pre-flight: host" in result.stderr and "master 127.0.0.1:" in result.stderr
    assert (beats / "arrived_0.json").exists() and not (beats / "arrived_1.json").exists()


PREFLIGHT_THEN_WORK = """\
    import os, sys, time
    from jobs.common import get_args_parser
    from jobs.preflight import before_training
    from pipeline.core.config import config_from_args
    if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and {hang}:
        time.sleep(300)  # a hung rank: never reaches the process group
    status = before_training(config_from_args(get_args_parser("test").parse_args()))
    if status == 0:
        print(f"rank {{os.environ['RANK']}} would train now", file=sys.stderr, flush=True)
    sys.exit(status)
"""


def test_preflight_runs_inside_the_training_processes(tmp_path, monkeypatch):
    """One torchrun: the same processes check the group, report their hosts, then go on to train."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    module = write_module(tmp_path, "checked_worker", PREFLIGHT_THEN_WORK.format(hang=False))
    sub = local_torchrun_job(tmp_path, module, nproc=2, preflight_timeout_s=30)
    out = io.StringIO()
    follow(sub, out, poll_s=0.5)
    text = out.getvalue()
    assert "pre-flight passed: all-reduce over 2 ranks" in text and "rank 1 would train now" in text
    assert text.count("torch.distributed.run") == 1
    (folder,) = (tmp_path / "run" / "logs" / sub.job.job_id).glob("preflight-*")
    assert [r["rank"] for r in json.loads((folder / "ranks.json").read_text())] == ["0", "1"]
    assert sorted(p.name for p in (folder / "attempt0").iterdir()) == ["arrived_0.json", "arrived_1.json",
                                                                     "done_0.json", "done_1.json"]


def test_preflight_inside_training_names_a_hung_rank_and_restarts_do_not_wait_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    module = write_module(tmp_path, "hung_worker", PREFLIGHT_THEN_WORK.format(hang=True))
    start = time.monotonic()
    sub = local_torchrun_job(tmp_path, module, nproc=2, preflight_timeout_s=4, max_restarts=2)
    with pytest.raises(StageFailed) as failure:
        follow(sub, io.StringIO(), poll_s=0.5)
    message = str(failure.value)
    assert time.monotonic() - start < 90  # one timeout (4 s), then restarts that stop at once
    assert "pre-flight failed on node 0" in message and "after 2 restart(s)" in message
    assert "no answer from rank 1 (" in message and "never started" in message
    assert "not tried again" in message and "would train now" not in message


def job_tasks(pid: int) -> list[int]:
    """Processes below ``pid`` that run submitit's task entry point (what Slurm would signal)."""
    found = []
    for child in child_pids(pid):
        if b"submitit.core._submit" in Path(f"/proc/{child}/cmdline").read_bytes():
            found.append(child)
        else:
            found += job_tasks(child)
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_preemption_signal_saves_and_requeues_the_job(tmp_path, monkeypatch):
    """USR2 to the job's task (what Slurm sends before the time limit): workers get SIGUSR1, save, exit 0; the
    job requeues itself and the new run resumes from what was saved."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    module = write_module(tmp_path, "preemptible_worker", f"""\
        import os, signal, sys, time
        from pathlib import Path
        out = Path({str(tmp_path)!r})
        rank = os.environ["RANK"]
        with open(out / f"starts_{{rank}}", "a") as fh:
            fh.write("x")
        if (out / f"saved_{{rank}}").exists():
            sys.exit(0)  # resumed: finish
        stop = []
        signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
        (out / f"running_{{rank}}").write_text("")
        while not stop:
            time.sleep(0.1)
        (out / f"saved_{{rank}}").write_text("checkpoint")
    """)
    sub = local_torchrun_job(tmp_path, module, nproc=2, preflight_timeout_s=0)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"running_{r}").exists() for r in "01") and time.monotonic() < deadline:
            time.sleep(0.2)
        (task,) = job_tasks(int(sub.job.job_id))  # the local job id is the pid of its controller's shell
        os.kill(task, signal.SIGUSR2)
        results = follow(sub, io.StringIO(), poll_s=0.5)
    finally:
        sub.job.cancel()  # nothing left running if the test fails
    assert results[0]["world_size"] == 2
    assert all((tmp_path / f"saved_{r}").read_text() == "checkpoint" for r in "01")
    assert all((tmp_path / f"starts_{r}").read_text() == "xx" for r in "01")  # stopped once, resumed once
    log = sub.log_paths()[1].read_text()
    assert "asked 2 training process(es)" in log and "requeueing" in log



@pytest.mark.slow
def test_local_executor_runs_the_whole_chain_with_two_processes(tmp_path, capsys):
    from pipeline.prep.synthetic import make_imagenet_archives

    archives = tmp_path / "archives"
    make_imagenet_archives(archives, num_classes=2, train_per_class=8, val_per_class=4, missing_val=[3])
    run_dir = tmp_path / "run"
    code, out, err = run_main(capsys, "--stage", "all", "--executor", "local", "--archive-dir", archives,
                              "--skip-checksum", "--data-dir", tmp_path / "data", "--run-dir", run_dir,
                              "--procs-per-node", 2, "--epochs", 2, "--preflight-timeout-s", 0, *TINY_FLAGS)
    assert code == 0, out[-3000:] + err
    order = [re.search(rf"^\[{stage} (\d+)\] done$", out, re.M) for stage in ("prep", "train", "eval", "report")]
    assert all(order) and [m.start() for m in order] == sorted(m.start() for m in order)
    assert out.rstrip().endswith(f"finished: prep -> train -> eval -> report; run dir {run_dir}")
    assert "--nnodes 1 --nproc-per-node 2" in out
    with open(run_dir / "epochs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["epoch"], r["world_size"]) for r in rows] == [("0", "2"), ("1", "2")]
    assert json.loads((run_dir / "eval.json").read_text())["total"] == 7  # 8 val images, one left out of the tar
    assert (run_dir / "report" / "summary.csv").stat().st_size > 0 and "# Training report" in out
    job_dirs = sorted(p.name for p in (run_dir / "logs").iterdir() if p.name.isdigit())  # one folder per job
    assert len(job_dirs) == 4
    assert any((run_dir / "logs" / d / "train_config.toml").exists() for d in job_dirs)


def run_dir_with_config(tmp_path) -> Path:
    """A run dir whose resolved config.toml says where its data is, its crops, precision and launch options."""
    from pipeline.core.config import build_config, save_config

    run_dir, data_dir = tmp_path / "run", tmp_path / "its-data"
    run_dir.mkdir()
    data_dir.mkdir()
    save_config(build_config({"data": {"data_dir": str(data_dir), "val_crop_size": 48}, "train": {"amp": "bf16"},
                              "launch": {"detach": True, "nodes": 4}}), run_dir / "config.toml")
    return run_dir


@pytest.mark.parametrize("stage", ["eval", "report"])
def test_eval_and_report_read_the_run_dirs_config(stage, tmp_path):
    run_dir = run_dir_with_config(tmp_path)
    args = launch.get_args_parser().parse_args(["--stage", stage, "--run-dir", str(run_dir), "--val-resize-size", "60"])
    cfg, _ = launch.resolve_config(args)
    assert (cfg.data.data_dir, cfg.data.val_crop_size, cfg.train.amp) == (str(tmp_path / "its-data"), 48, "bf16")
    assert cfg.data.val_resize_size == 60  # the command line still wins
    assert (cfg.launch.detach, cfg.launch.nodes) == (False, 1)  # how the training was launched is not inherited


def test_train_and_an_explicit_config_ignore_the_run_dirs_config(tmp_path):
    run_dir = run_dir_with_config(tmp_path)
    other = tmp_path / "other.toml"
    other.write_text("[data]\nval_crop_size = 64\n")
    for argv, crop in ((["--stage", "train"], 224), (["--stage", "eval", "--config", str(other)], 64)):
        cfg, _ = launch.resolve_config(launch.get_args_parser().parse_args([*argv, "--run-dir", str(run_dir)]))
        assert (cfg.data.val_crop_size, cfg.data.data_dir) == (crop, str(Path("data").absolute()))


def test_eval_dry_run_checks_the_run_dirs_data_dir(no_slurm_path, tmp_path, capsys):
    run_dir = run_dir_with_config(tmp_path)
    (run_dir / "checkpoints").mkdir()
    code, out, _ = run_main(capsys, "--stage", "eval", "--executor", "slurm", "--dry-run", "--run-dir", run_dir)
    assert code == 0 and "warning" not in out  # the default data dir (./data) does not exist here
    code, out, _ = run_main(capsys, "--stage", "eval", "--executor", "slurm", "--dry-run", "--run-dir", run_dir,
                            "--data-dir", tmp_path / "gone")
    assert code == 0 and f"data dir {tmp_path}/gone does not exist" in out


def test_torchrun_child_inherits_an_ignored_usr2_and_the_parent_keeps_its_handler():
    from jobs.torchrun import RunningTorchrun

    def handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        child = RunningTorchrun([sys.executable, "-c", "import signal, sys; sys.exit(0 if signal.getsignal("
                                 "signal.SIGUSR2) is signal.SIG_IGN else 5)"], dict(os.environ))
        assert child.wait(timeout_s=60) == 0
        assert signal.getsignal(signal.SIGUSR2) is handler
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_batch_larger_than_a_prepared_data_dir_is_refused_at_submission(no_slurm_path, tmp_path, capsys):
    from pipeline.core.config import build_config
    from pipeline.prep.prepare import prepare
    from pipeline.prep.synthetic import make_imagenet_archives

    make_imagenet_archives(tmp_path / "archives", num_classes=2, train_per_class=8, val_per_class=2)
    data = tmp_path / "data"
    prepare(build_config(cli_values={"archive_dir": str(tmp_path / "archives"), "data_dir": str(data),
                                     "skip_checksum": True, "workers": 1}))
    argv = ["--stage", "train", "--executor", "slurm", "--dry-run", "--data-dir", data, "--procs-per-node", 2]
    assert run_main(capsys, *argv, "--batch-size", 8)[0] == 0  # 16 images: 8 per process
    code, _, err = run_main(capsys, *argv, "--batch-size", 9)
    assert code == 2 and f"= 9 per process is larger than the 8 training images each of the 2 processes gets " \
                          f"(16 in {data})" in err


@pytest.mark.parametrize("device, extra, wanted, unwanted", [
    ("cuda", [], "#SBATCH --gpus-per-node=8", "--gres"),
    ("npu", [], "#SBATCH --gres=npu:8", "--gpus-per-node"),
    ("npu", ["--npu-gres", "ascend910"], "#SBATCH --gres=ascend910:8", "--gpus-per-node"),
    ("cpu", [], "#SBATCH --nodes=1", "--gres"),
])
def test_the_job_asks_for_the_accelerators_its_device_names(no_slurm_path, tmp_path, capsys, device, extra, wanted,
                                                             unwanted):
    code, out, _ = run_main(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", "--device", device,
                            "--gpus-per-node", 8, *extra, "--run-dir", tmp_path / "run")
    script = sbatch_sections(out)["train"]
    assert code == 0 and wanted in script and unwanted not in script
    assert device != "cpu" or "--gpus-per-node" not in script


def test_setup_lines_run_in_every_job_before_its_processes_start(no_slurm_path, tmp_path, capsys):
    lines = ["source /usr/local/Ascend/ascend-toolkit/set_env.sh", "module load 'cuda/12.4'"]
    code, out, _ = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", "--device", "npu",
                            "--setup", lines[0], "--setup", lines[1], "--run-dir", tmp_path / "run")
    assert code == 0
    for stage, script in sbatch_sections(out).items():
        script_lines = script.splitlines()
        srun = next(i for i, line in enumerate(script_lines) if line.startswith("srun "))
        assert [script_lines.index(line) for line in lines] == sorted(script_lines.index(line) for line in lines)
        assert all(script_lines.index(line) < srun for line in lines), stage


def test_the_plain_sbatch_script_asks_for_what_submitits_does(no_slurm_path, tmp_path, capsys):
    """The fallback for a submitit without its private renderer: the same #SBATCH requests, setup, then srun."""
    cfg = launch.resolve_config(launch.get_args_parser().parse_args(
        ["--stage", "train", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--setup", "module load x",
         "--sbatch", "mail-type=END", "--run-dir", str(tmp_path / "run")]))[0]
    params = get_backend("slurm").parameters(cfg, "train")
    plain = slurm_backend.plain_sbatch_script("python -m x", params).splitlines()
    rendered = slurm_backend.sbatch_script(cfg, params).splitlines()
    wanted = ("--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--cpus-per-task=20", "--signal=USR2@90",
              "--mail-type=END", "--time=60")
    for option in wanted:
        assert f"#SBATCH {option}" in plain and f"#SBATCH {option}" in rendered, option
    assert plain.index("module load x") < len(plain) - 1 and plain[-1].startswith("srun --cpus-per-task 20 ")


@pytest.mark.parametrize("stage", ["prep", "report", "download"])
def test_the_launcher_of_a_stage_without_a_model_does_not_import_torch(stage, tmp_path):
    """torch takes seconds to import; the launcher needs it only to check a model (train, eval)."""
    code = textwrap.dedent(f"""
        import sys, launch
        status = launch.main(["--stage", "{stage}", "--executor", "local", "--dry-run", "--run-dir", "{tmp_path}",
                              "--archive-dir", "{tmp_path}", "--url", "https://example.org/a.tar"])
        print(status, "torch" in sys.modules, file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.stderr.splitlines()[-1] == "0 False", result.stdout[-2000:] + result.stderr
