"""The parser every stage entry point shares: all config flags plus --config."""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, Sequence

from pipeline.config import Config, ConfigError, add_config_arguments, config_from_args


def get_args_parser(description: str, add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, add_help=add_help)
    add_config_arguments(parser)
    return parser


def parse_config(argv: Sequence[str] | None, description: str) -> Config:
    """Config from argv; a bad config exits with its message (status 2) rather than a traceback."""
    parser = get_args_parser(description)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))


def bad_input_errors() -> tuple[type[Exception], ...]:
    """Errors whose message says all (what is wrong, what to do): shown without a traceback."""
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataDirError
    from pipeline.distributed import DistributedSetupError
    from pipeline.models import PretrainedWeightsError, UnknownModelError
    from pipeline.precision import PrecisionError

    return (ConfigError, CheckpointError, DataDirError, DistributedSetupError, PretrainedWeightsError,
            UnknownModelError, PrecisionError)


@contextlib.contextmanager
def exit_on_bad_input(prog: str) -> Iterator[None]:
    """Bad input (config, data dir, model, device, checkpoint) exits with status 2 and its message."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, bad_input_errors()):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
