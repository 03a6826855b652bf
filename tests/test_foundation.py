"""The shared foundation: atomic writes, typed config precedence and errors, the torchrun environment."""
from __future__ import annotations

import argparse
import stat

import pytest

from pipeline.core.atomic import _UMASK, atomic_path, atomic_write_text
from pipeline.core.config import ConfigError, add_config_arguments, build_config, config_from_args, dumps, load_config
from pipeline.core.distributed import DistributedSetupError, read_env
from pipeline.core.records import append_row


def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "table.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of a new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_atomic_write_gives_the_umask_mode_not_0600(tmp_path):
    atomic_write_text(tmp_path / "config.toml", "x = 1\n")
    mode = stat.S_IMODE((tmp_path / "config.toml").stat().st_mode)
    assert mode == 0o666 & ~_UMASK  # what open() would give; mkstemp alone gives 0600
    assert _UMASK & 0o044 or mode & 0o044, "readable by group and others under the usual umask"


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_precedence_command_line_over_file_over_defaults(tmp_path):
    cfg_file = tmp_path / "r.toml"
    cfg_file.write_text('[optim]\nlr = 0.4\nmomentum = 0.8\n[train]\nepochs = 7\n')
    cfg = _parse(["--config", str(cfg_file), "--lr", "0.2", "--procs-per-node", "3", "--no-channels-last"])
    assert cfg.optim.lr == 0.2          # flag beats file
    assert cfg.optim.momentum == 0.8    # file beats default
    assert cfg.train.epochs == 7
    assert cfg.optim.weight_decay == 1e-4  # default
    assert cfg.launch.gpus_per_node == 3 and cfg.model.channels_last is False


@pytest.mark.parametrize("text, message", [
    ("[optim]\nlearning_rate = 0.1\n", "unknown key 'learning_rate'"),
    ("[optim]\nepochs = 3\n", r"belongs in \[train\]"),
    ("[training]\nepochs = 3\n", r"unknown section \[training\]"),
    ("[train]\nepochs = '3'\n", "epochs must be int"),
    ("[train]\namp = 'fp8'\n", "is not one of"),
    ("[train\n", "not valid TOML"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_resolved_config_round_trips_through_toml(tmp_path):
    """Any legal value reads back equal, even those validation refuses (newlines): eval and resume must read it."""
    cfg = build_config({"launch": {"sbatch": ["mail-type=END", "comment='''x\n\"\"\"y"]}},
                       {"lr": 0.3, "run_dir": 'a "quoted" dir\\ ü', "job_name": "two\nlines\t\x7f", "min_lr": 1e-300})
    path = tmp_path / "config.toml"
    path.write_text(dumps(cfg))
    assert load_config(path) == cfg


def test_partly_set_torchrun_environment_is_an_error():
    assert read_env({}).world_size == 1
    full = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    env = read_env(full)
    assert (env.rank, env.world_size, env.nodes) == (1, 4, 2)
    with pytest.raises(DistributedSetupError, match="MASTER_PORT"):
        read_env({k: v for k, v in full.items() if k != "MASTER_PORT"})


def test_append_row_adds_new_columns_to_an_older_table_and_refuses_other_columns(tmp_path):
    path = tmp_path / "epochs.csv"
    append_row(path, {"a": 1, "b": 2}, ("a", "b"))
    append_row(path, {"a": 3}, ("a", "b"))
    assert path.read_text() == "a,b\n1,2\n3,\n"
    append_row(path, {"a": 4, "c": 5}, ("a", "b", "c"))  # a newer version records one more column
    assert path.read_text() == "a,b,c\n1,2,\n3,,\n4,,5\n"
    with pytest.raises(ValueError, match="other columns"):
        append_row(path, {"a": 1}, ("a", "d"))
