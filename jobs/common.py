"""The parser every stage entry point shares: all config flags plus --config."""
from __future__ import annotations

import argparse
from typing import Sequence

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
