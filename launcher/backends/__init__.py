"""Scheduler backends chosen by name (``--executor``): every module of this folder is imported and registers its
backends with ``@register``, so a new scheduler is one new file here (and its tests), nothing else.

    get_backend("slurm")     # a Backend (launcher/backends/base.py)
    choose("auto", out)      # the first available of those ``auto`` may pick, saying why
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from typing import TextIO

from launcher.backends.base import Backend, JobInfo
from launcher.executors import LaunchError
from pipeline.core.config import Config

__all__ = ["Backend", "JobInfo", "BACKENDS", "register", "get_backend", "choose", "names", "check_options",
           "queued_titles", "queued_names"]

BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` the backend of ``--executor <cls.name>`` (a second one of a name warns and
    replaces the first, as timm's model registry does)."""
    if cls.name in BACKENDS and BACKENDS[cls.name] is not cls:
        warnings.warn(f"executor backend {cls.name!r} registered twice; {cls.__module__}.{cls.__name__} replaces "
                      f"{BACKENDS[cls.name].__module__}.{BACKENDS[cls.name].__name__}", stacklevel=2)
    BACKENDS[cls.name] = cls
    return cls


def names() -> list[str]:
    return [cls.name for cls in sorted(BACKENDS.values(), key=lambda cls: cls.order)]


def queued_titles() -> str:
    """The schedulers that queue jobs across nodes, for messages: "Slurm"."""
    return " or ".join(BACKENDS[name].title for name in names() if BACKENDS[name].queued)


def queued_names() -> str:
    """Their --executor values: "slurm"."""
    return "|".join(name for name in names() if BACKENDS[name].queued)


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise LaunchError(f"--executor {name!r} is not a known executor; choose one of {['auto', *names()]}")
    return BACKENDS[name]()


def choose(requested: str, out: TextIO) -> Backend:
    """The backend of ``--executor``; auto: the first available of those marked ``auto``, said on ``out``."""
    if requested != "auto":
        return get_backend(requested)
    reasons = []
    for name in names():
        if not BACKENDS[name].auto:
            continue
        found, why = BACKENDS[name].available()
        reasons.append(why)
        if found:
            out.write(f"executor: {name} ({'; '.join(filter(None, reasons))}; --executor {'|'.join(names())} picks "
                      "another)\n")
            return BACKENDS[name]()
    raise LaunchError(f"no executor is available here ({'; '.join(filter(None, reasons))}); pass --executor")


def check_options(cfg: Config) -> None:
    """Every backend's own options (its config table) are checked, whichever runs: a typo never waits for a queue."""
    for name in names():
        BACKENDS[name]().check_options(cfg)


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()
