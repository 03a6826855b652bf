"""``launch.py --stage train --sweep KEY=V1,V2 [--sweep KEY2=...]``: the cartesian grid of config values, one
run dir per point under the given --run-dir (the sweep dir), named after its values (``model=resnet18,nodes=1``).

Values are converted as the command line converts the field's flag (int, float, true/false, a choice, Slurm
times), then checked by the config's own check; every point passes pipeline.core.validate before the first is
submitted; launcher/sweep_jobs.py runs them. ``--stage report --run-dir SWEEP_DIR`` reports on the points the
sweep dir's sweep.json lists (pipeline/report/inputs.py).
"""
from __future__ import annotations

import argparse
import itertools
import re
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence, TextIO

from launcher.executors import LaunchError
from pipeline.core import flags as tv_flags
from pipeline.core.config import FIELDS, _check_value
from pipeline.core.errors import UserError
from pipeline.core.records import POINT_NAME_CHARS
from pipeline.core.validate import NAME_MAX

NOT_SWEPT = {"run_dir": "it is the sweep dir, each point gets a run dir in it",
             "executor": "one sweep runs on one executor", "dry_run": "pass --dry-run alone",
             "detach": "pass --detach alone", "array_parallelism": "it is the sweep's own limit"}
# Values that may hold a token: a point's values name its run dir and are saved in sweep.json, so never swept.
SECRET_KEYS = {"url": "a link may hold a token", "header": "a header value is a credential",
               "cookie_file": "cookies are credentials"}
BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
UNSAFE = re.compile(f"[^{POINT_NAME_CHARS}]")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="KEY=V1,V2",
                        help="train every combination of these values (repeatable; KEY: any config field, e.g. "
                             "model, nodes, gpus_per_node, batch_size, amp, lr), one run dir per point in --run-dir")


def convert(name: str, text: str) -> Any:
    """``text`` as the value of config field ``name``, as its command-line flag would read it."""
    kind = FIELDS[name][2]
    origin = typing.get_origin(kind)
    try:
        if name in tv_flags.TYPES:
            value: Any = tv_flags.TYPES[name](text)
        elif kind is bool:
            value = BOOLS[text.lower()]
        elif origin is Literal:
            value = tv_flags.choice_type(name, typing.get_args(kind))(text)
        elif origin is list:
            value = [text]
        else:
            value = kind(text)
    except (ValueError, KeyError, argparse.ArgumentTypeError) as exc:
        expected = "true or false" if kind is bool else getattr(kind, "__name__", str(kind))
        why = f": {exc}" if isinstance(exc, argparse.ArgumentTypeError) else f" (expected {expected})"
        raise LaunchError(f"--sweep {name}: bad value {text!r}{why}") from None
    try:
        return _check_value(name, kind, value, f"--sweep {name}")
    except UserError as exc:
        raise LaunchError(str(exc)) from None


def parse_sweeps(items: Sequence[str], notes: list[str]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """``KEY=V1,V2`` items as [(field name, [(text, typed value), ...]), ...], a value equal to an earlier one
    dropped with a line added to ``notes``; bad input is a LaunchError."""
    axes: list[tuple[str, list[tuple[str, Any]]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        if name in SECRET_KEYS:  # the values are not echoed
            raise LaunchError(f"--sweep {name}=...: {name} cannot be swept: {SECRET_KEYS[name]}, and a point's values "
                              "name its run dir and are saved in sweep.json; a sweep trains, so download options "
                              "have no effect on it")
        texts = [v.strip() for v in values.split(",")]
        if not sep or not name or not all(texts):  # the values are not echoed: one may be a credential
            raise LaunchError(f"--sweep {key.strip()!r}=...: expected KEY=V1,V2,..., e.g. --sweep "
                              "model=resnet18,resnet50")
        if name not in FIELDS:
            raise LaunchError(f"--sweep {key.strip()!r}=...: unknown key {name!r}; keys are config fields, e.g. model, "
                              "nodes, gpus_per_node, batch_size, amp, lr (launch.py --help lists them as flags)")
        if name in NOT_SWEPT:
            raise LaunchError(f"--sweep {item!r}: {name} cannot be swept: {NOT_SWEPT[name]}")
        if any(name == other for other, _ in axes):
            raise LaunchError(f"--sweep {item!r}: {name} is swept twice; give all its values in one --sweep")
        axes.append((name, distinct_values(name, [(text, convert(name, text)) for text in texts], notes)))
    return axes


def distinct_values(name: str, values: list[tuple[str, Any]], notes: list[str]) -> list[tuple[str, Any]]:
    """``values`` without those equal to an earlier one once typed (``lr=0.1,0.10``), each drop noted: two points
    would train the same config into two run dirs."""
    kept: dict[str, tuple[str, Any]] = {}
    for text, value in values:
        if repr(value) in kept:
            first = kept[repr(value)][0]
            notes.append(f"--sweep {name}: {text} is the same value as {first} ({value!r}); swept once, as {first}")
        else:
            kept[repr(value)] = (text, value)
    return list(kept.values())


def point_name(point: Sequence[tuple[str, str]]) -> str:
    """The run dir name of a point: ``key=value`` pairs joined by commas, other characters as ``_``."""
    return UNSAFE.sub("_", ",".join(f"{key}={text}" for key, text in point))


class Point(NamedTuple):
    name: str  # its run dir's name
    values: dict[str, str]  # swept key -> value as typed
    args: argparse.Namespace  # the command line of this point alone


def sweep_points(args: argparse.Namespace, out: TextIO | None = None) -> list[Point]:
    """Each point of the grid, in order; a repeated value's note goes to ``out``."""
    if args.stage != "train":
        raise LaunchError(f"--sweep is for --stage train (got --stage {args.stage}); report on the sweep afterwards "
                          "with --stage report --run-dir SWEEP_DIR")
    run_dirs = getattr(args, "run_dirs", None)
    if not run_dirs or len(run_dirs) != 1:
        raise LaunchError("--sweep needs one --run-dir: the sweep dir, which gets one run dir per point")
    notes: list[str] = []
    axes = parse_sweeps(args.sweeps, notes)
    if out:
        out.write("".join(f"note: {note}\n" for note in notes))
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        values = {key: text for (key, _), (text, _) in zip(axes, combo)}
        name = point_name(list(values.items()))
        point = argparse.Namespace(**vars(args))
        for (key, _), (_, value) in zip(axes, combo):
            setattr(point, key, value)
        point.run_dirs = [str(Path(run_dirs[0]) / name)]
        points.append(Point(name, values, point))
    names = [point.name for point in points]
    too_long = next((name for name in names if len(name.encode()) > NAME_MAX), None)
    if too_long:
        raise LaunchError(f"--sweep: the run dir name of point {too_long[:60]}... is {len(too_long.encode())} bytes, "
                          f"more than a file name may be ({NAME_MAX}); sweep fewer keys or shorter values")
    if len(set(names)) != len(names):
        raise LaunchError("--sweep: two points get the same run dir name; give values that differ in letters, "
                          "digits or . _ - +")
    return points
