"""What every stage entry point shares: the parser (all config flags plus --config) and how bad input ends."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import traceback
from typing import Any, Callable, Sequence

from jobs import failures
from pipeline.core.config import Config, add_config_arguments, config_from_args
from pipeline.core.errors import UserError
from pipeline.core.stages import DATA_DIR, STAGES


def get_args_parser(description: str, add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, add_help=add_help)
    add_config_arguments(parser)
    return parser


def exit_status(prog: str, work: Callable[[], Any]) -> int:
    """0 when ``work`` succeeds. Bad input (config, archives, data dir, model, device, checkpoint, run dir) is
    one ``prog: error:`` line on stderr and SystemExit(2), as argparse does for a bad flag, without a traceback;
    any other error propagates, but in a job's process (jobs/failures.py), which records it for the job and
    ends with status 1 after its traceback."""
    try:
        work()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        failures.failed(exc, 2)
        raise SystemExit(2) from None
    except Exception as exc:
        if not os.environ.get(failures.DIR_ENV):
            raise
        traceback.print_exc()
        sys.stderr.flush()
        failures.failed(exc, 1)
        raise SystemExit(1) from None
    return 0


def run_door(door: str, *args: Any) -> Any:
    """Set up logging and call a stage's door (``module:function``), imported only now so --help stays fast."""
    from pipeline.core.logs import setup_logging

    module, _, name = door.partition(":")
    setup_logging()
    return getattr(importlib.import_module(module), name)(*args)


def run_stage(argv: Sequence[str] | None, stage: str, description: str,
              before: Callable[[Config], int] | None = None,
              adjust: Callable[[Config, argparse.Namespace], Config] | None = None) -> int:
    """The ``main`` of ``python -m jobs.<stage>``: parse the flags, ``adjust`` the config to this start, run
    ``before`` (the pre-flight; a non-zero status ends the process with it), validate the config again (the launcher
    did before submitting; this process may have been started without it), run the stage's door
    (pipeline.core.stages) on it."""
    failures.exit_if_failed_before()
    args = get_args_parser(description).parse_args(argv)

    def work() -> Any:
        cfg = config_from_args(args)
        if adjust is not None:
            cfg = adjust(cfg, args)
        status = before(cfg) if before else 0
        if status:
            raise SystemExit(status)
        return run_door(STAGES[stage].door, staged(validated(cfg, stage), stage))

    return exit_status(f"jobs.{stage}", work)


def staged(cfg: Config, stage: str) -> Config:
    """With --stage-data-to, this process's config reads the node's verified copy of the data dir, staged first
    where none is complete (pipeline/data/staging.py); the run's records still name the data dir given."""
    if not cfg.data.stage_data_to or DATA_DIR not in STAGES[stage].reads:
        return cfg
    from pipeline.core.logs import setup_logging
    from pipeline.data.staging import expand_dest, stage_data

    setup_logging()
    copy = stage_data(cfg.data.data_dir, expand_dest(cfg.data.stage_data_to))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=str(copy)))


def validated(cfg: Config, stage: str) -> Config:
    from pipeline.core.validate import validate

    validate(cfg, [stage])
    return cfg
