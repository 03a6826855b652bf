"""The byte ranges of one large download fetched in parallel, and the file that lets them resume.

A file of at least ``--download-range-min-mb`` whose server answers Range requests is split into
``--download-ranges`` equal ranges, each fetched over its own connection straight into its place in ``<name>.part``
(made at full size first). Servers that cap each connection (image-net.org's do) then give several times one
connection's speed, as ``aria2c -x`` does. ``<name>.part.ranges`` records how many bytes of each range are written,
flushed to the file before they are recorded, so a cut connection, a killed job or a requeue continues each range
where it stopped. The MD5 is computed once every range is in.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.records import write_json

log = logging.getLogger(__name__)

RANGES_SUFFIX = ".ranges"  # after the part file's name
SAVE_EVERY = 8 << 20  # bytes written to a range between two records of the ranges file


@dataclass
class ByteRange:
    start: int
    end: int  # excluded
    done: int = 0  # bytes of the range written from its start

    @property
    def complete(self) -> bool:
        return self.done >= self.end - self.start


def split(total: int, count: int) -> list[ByteRange]:
    """``count`` ranges of nearly equal size covering ``total`` bytes (fewer when the file is tiny)."""
    size = -(-total // max(count, 1))
    return [ByteRange(start, min(start + size, total)) for start in range(0, total, size)]


def ranges_path(part_path: Path) -> Path:
    return part_path.with_name(part_path.name + RANGES_SUFFIX)


def load(path: Path, total: int) -> list[ByteRange] | None:
    """The ranges recorded for a file of ``total`` bytes; None when there is no record, or one that does not describe
    such a file (the server's file changed, or the record is damaged): then the file starts again."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        ranges = [ByteRange(int(start), int(end), int(done)) for start, end, done in data["ranges"]]
        recorded_total = int(data["total"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s cannot be read (%s); the file starts again", path, exc)
        return None
    bounds = [r.start for r in ranges] + [ranges[-1].end] if ranges else []
    if recorded_total != total or not ranges or bounds[0] != 0 or bounds[-1] != total or \
            any(a >= b for a, b in zip(bounds, bounds[1:])) or \
            any(not 0 <= r.done <= r.end - r.start for r in ranges):
        log.warning("%s does not describe the %d-byte file on the server (it records %s bytes); the file starts "
                    "again", path, total, data.get("total"))
        return None
    return ranges


class RangesRecord:
    """Writes the ranges file of one download: now, or after SAVE_EVERY more bytes of a range (threads share it)."""

    def __init__(self, path: Path, total: int, ranges: list[ByteRange]):
        self.path, self.total, self.ranges = path, total, ranges
        self.lock = threading.Lock()
        self.saved = [r.done for r in ranges]

    def save(self) -> None:
        with self.lock:
            self.saved = [r.done for r in self.ranges]
            write_json(self.path, {"total": self.total, "ranges": [[r.start, r.end, r.done] for r in self.ranges]})

    def written(self, index: int, done: int) -> None:
        """Range ``index`` has ``done`` bytes flushed to the part file; recorded now and then."""
        self.ranges[index].done = done
        if done - self.saved[index] >= SAVE_EVERY:
            self.save()
