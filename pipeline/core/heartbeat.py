"""Heartbeat files: each training rank's proof of life, written by its hang watchdog (pipeline/train/watchdog.py)
and read by the launcher's follow (launcher/follow.py) to name a silent rank wherever its log is.

A shared format, so it lives in the core: ``<run dir>/logs/heartbeat/<torchrun run id>/rank<R>.json`` holds
``rank``, ``world_size``, ``host``, ``pid``, ``steps`` (done), ``beat_at`` (the writer's clock, s) and
``interval_s`` (between beats), replaced whole at each beat.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

HEARTBEAT_DIR = "heartbeat"  # under <run dir>/logs/, then one folder per run id
MISSED_BEATS = 4  # heartbeats a rank may miss before it counts as silent


def write_quietly(path: Path, text: str) -> None:
    """Replace ``path`` whole (readers never see half a file); no fsync: a heartbeat need not survive a crash."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_heartbeats(folder: Path) -> list[dict[str, Any]]:
    beats = []
    for path in sorted(folder.glob("rank*.json")):
        try:
            beats.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # gone or replaced under us: the next read has it
            continue
    return sorted(beats, key=lambda b: b["rank"])


@dataclasses.dataclass(frozen=True)
class Hang:
    """Who the ranks wait for: ``silent`` ranks, and the words that name them (host, rank, how long)."""

    silent: tuple[int, ...]
    text: str


def diagnose(beats: list[dict[str, Any]]) -> Hang:
    """The silent ranks among ``beats``: those that stopped beating, else those behind in steps, else none.

    Ages are measured against the freshest heartbeat, so only the nodes' clocks matter, not the reader's.
    """
    freshest = max(b["beat_at"] for b in beats)
    world = max(b["world_size"] for b in beats)
    missing = sorted(set(range(world)) - {b["rank"] for b in beats})
    stale = [b for b in beats if freshest - b["beat_at"] > MISSED_BEATS * b["interval_s"]]
    if stale or missing:
        words = [f"rank {b['rank']} on {b['host']} (pid {b['pid']}, no heartbeat for {freshest - b['beat_at']:.0f} s, "
                 f"after {b['steps']} steps: stopped, or its node is gone)" for b in stale]
        words += [f"rank {r} (no heartbeat yet: not training yet, or gone before its first step)" for r in missing]
        return Hang(tuple(sorted([b["rank"] for b in stale] + missing)), "silent: " + "; ".join(words))
    most = max(b["steps"] for b in beats)
    behind = [b for b in beats if b["steps"] < most]
    if behind:
        words = [f"rank {b['rank']} on {b['host']} (pid {b['pid']}) at {b['steps']} steps" for b in behind]
        return Hang(tuple(b["rank"] for b in behind), f"behind: {'; '.join(words)}, the others at {most} (alive: "
                                                       "waiting for its data, or stuck in its own step)")
    return Hang((), f"every rank alive at {most} steps: a collective not every rank entered, or a slow file system")
