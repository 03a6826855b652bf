"""Each stage asks for what it uses ([launch.<stage>], --<stage>-<key>), srun binds each node's task to its cores:
the dry run's scripts, built by the code a real submission uses."""
from __future__ import annotations

import re

import pytest

from launch_helpers import no_slurm_path, run_main  # noqa: F401 (a fixture)


def scripts_and_requests(out: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """{stage: its sbatch script's lines}, {stage: its 'asks for' line}."""
    parts = re.split(r"===== (\w+): sbatch script[^\n]*\n", out)
    scripts = {parts[i]: parts[i + 1].split("=====")[0].splitlines() for i in range(1, len(parts), 2)}
    return scripts, dict(re.findall(r"^  (\w+) asks for: (.*)$", out, re.M))


def test_a_chain_sends_each_stage_where_it_belongs_with_what_it_uses(no_slurm_path, tmp_path, capsys):
    code, out, _ = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", "--partition", "gpu",
                            "--prep-partition", "cpu", "--nodes", 2, "--gpus-per-node", 4, "--workers", 3,
                            "--time", "1-00:00:00", "--run-dir", tmp_path / "run")
    assert code == 0
    scripts, asks = scripts_and_requests(out)
    assert list(scripts) == ["prep", "train", "eval", "report"]
    prep, train, evals, report = scripts.values()
    assert "#SBATCH --partition=cpu" in prep and "#SBATCH --cpus-per-task=4" in prep  # 3 writer threads + reader
    assert not any("gpu" in line for line in prep)  # neither GPUs nor the GPU partition
    assert "#SBATCH --partition=gpu" in report and not any("gpus" in line for line in report)  # no report-partition
    assert "#SBATCH --partition=gpu" in train and "#SBATCH --gpus-per-node=4" in train and "#SBATCH --nodes=2" in train
    assert "#SBATCH --time=1440" in train and "#SBATCH --time=1440" in prep  # --time: every stage without its own
    assert "#SBATCH --nodes=1" in evals and "#SBATCH --gpus-per-node=4" in evals  # eval's 50k images: one node
    assert "#SBATCH --time=30" in report and "cpus-per-task" not in "".join(report)
    assert asks["prep"] == "1 node(s) x 1 process(es), no GPUs, 4 CPUs per node, 1440 min, partition cpu"
    assert asks["train"] == "2 node(s) x 4 process(es), 4 GPU(s) per node, 16 CPUs per node, 1440 min, partition gpu"
    assert asks["eval"].startswith("1 node(s) x 4 process(es), 4 GPU(s) per node")
    assert "note: the report job asks for no GPU but queues in partition gpu with the train job; --report-partition" in out


def test_a_chain_without_a_partition_per_stage_says_how_to_give_one(no_slurm_path, tmp_path, capsys):
    code, out, _ = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", "--partition", "gpu",
                            "--run-dir", tmp_path / "run")
    assert code == 0 and ("note: the prep and report jobs ask for no GPU but queue in partition gpu with the train "
                          "job; --prep-partition, --report-partition NAME send them to a CPU partition") in out


def test_a_config_files_stage_tables_and_the_flags_over_them(no_slurm_path, tmp_path, capsys):
    config = tmp_path / "site.toml"
    config.write_text('[slurm]\npartition = "gpu"\n[launch.report]\npartition = "cpu"\ntime = "0:10:00"\n'
                      '[launch.eval]\nnodes = 2\nmem = "64G"\n')
    code, out, _ = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", "--config", config,
                            "--report-time", 20, "--eval-cpus", 7, "--run-dir", tmp_path / "run")
    assert code == 0
    scripts, _ = scripts_and_requests(out)
    assert {"#SBATCH --partition=cpu", "#SBATCH --time=20"} <= set(scripts["report"])  # the flag over the file
    assert {"#SBATCH --nodes=2", "#SBATCH --mem=64G", "#SBATCH --cpus-per-task=7"} <= set(scripts["eval"])
    assert "#SBATCH --partition=gpu" in scripts["prep"] and "#SBATCH --mem=64G" not in scripts["prep"]


@pytest.mark.parametrize("flags, srun", [([], "--cpu-bind cores"), (["--no-cpu-bind"], "--cpu-bind none")])
def test_srun_binds_each_nodes_task_to_its_cores_unless_told(flags, srun, no_slurm_path, tmp_path, capsys):
    code, out, _ = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", *flags,
                            "--run-dir", tmp_path / "run")
    scripts, _ = scripts_and_requests(out)
    assert code == 0 and len(scripts) == 4
    for lines in scripts.values():
        (line,) = [line for line in lines if line.startswith("srun ")]
        assert f" {srun} " in line


@pytest.mark.parametrize("argv, message", [
    (["--prep-nodes", "2"], "launch.prep.nodes (--prep-nodes) = 2: the prep job runs one process on one node"),
    (["--report-mem", "lots"], "launch.report.mem (--report-mem) = 'lots': write Slurm's format"),
    (["--eval-time", "1"], "launch.eval.time (--eval-time) = 1 min is not longer than launch.signal_delay_s = 90"),
    (["--prep-cpus", "-1"], "launch.prep.cpus (--prep-cpus) = -1: must be at least 0"),
    (["--config", "{tmp}/bad.toml"], "unknown key(s) ['gpus'] in [launch.prep]; known: ['partition', 'nodes',"),
])
def test_a_bad_stage_request_is_one_clear_line(argv, message, no_slurm_path, tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[launch.prep]\ngpus = 1\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, note", [
    (["--device", "cpu"], "note: --device cpu: the train and eval jobs ask for 6 CPUs per node (2 process(es) x "
                          "(--workers 2 + 1)), which leaves each process 1 intra-op thread(s); --cpus-per-task N "
                          "asks for N and gives each N // 2 - 2"),
    (["--device", "cpu", "--cpus-per-task", 16], ""),  # 16 // 2 - 2 = 6 threads: nothing to say
    ([], ""),  # GPUs compute; their processes' threads matter less
])
def test_a_cpu_training_is_told_its_threads_and_how_to_give_more(flags, note, no_slurm_path, tmp_path, capsys):
    from pipeline.core.threads import threads_per_process

    code, out, _ = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", "--procs-per-node", 2,
                            "--workers", 2, *flags, "--run-dir", tmp_path / "run")
    _, asks = scripts_and_requests(out)
    cpus = int(re.search(r"(\d+) CPUs per node", asks["train"]).group(1))
    assert code == 0 and [line for line in out.splitlines() if "--device cpu:" in line] == ([note] if note else [])
    assert not note or threads_per_process(cpus, 2, 2) == 1  # what each process of the job will set itself
