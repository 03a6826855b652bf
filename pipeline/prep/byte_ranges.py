"""The byte ranges of one large download fetched in parallel, and the file that lets them resume.

A file of at least ``--download-range-min-mb`` whose server answers Range requests is split into
``--download-ranges`` equal ranges, each fetched over its own connection straight into its place in ``<name>.part``
(made at full size first). Servers that cap each connection (image-net.org's do) then give several times one
connection's speed, as ``aria2c -x`` does. ``<name>.part.ranges`` records how many bytes of each range are written,
synced to disk before they are recorded, so a cut connection, a killed job or a requeue continues each range where
it stopped; it is written before the part file is made and removed after the file is renamed, so a part file without
it is always one stream's prefix. The MD5 is computed once every range is in.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.records import write_json

log = logging.getLogger(__name__)

RANGES_SUFFIX = ".ranges"  # after the part file's name
SAVE_EVERY = 64 << 20  # bytes written to a range between two records of the ranges file (each syncs the part)


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


def load(path: Path, part_path: Path) -> list[ByteRange] | None:
    """The ranges the record at ``path`` holds for the part file; None (with a warning saying why) when it cannot
    be trusted: unreadable, ranges that do not tile the file, a part file of another size or none. The file then
    starts again."""
    try:
        data = json.loads(path.read_text())
        total = int(data["total"])
        ranges = [ByteRange(int(start), int(end), int(done)) for start, end, done in data["ranges"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s cannot be read (%s); the file starts again", path, exc)
        return None
    size = part_path.stat().st_size if part_path.is_file() else None
    tiled = bool(ranges) and ranges[0].start == 0 and ranges[-1].end == total and all(
        a.end == b.start for a, b in zip(ranges, ranges[1:])) and all(
        r.start < r.end and 0 <= r.done <= r.end - r.start for r in ranges)
    if not tiled or size != total:
        log.warning("%s does not describe %s (%s bytes there, the record says %d in %d ranges); the file starts "
                    "again", path, part_path.name, size, total, len(ranges))
        return None
    return ranges


class RangesRecord:
    """Writes the ranges file of one download: now, or after SAVE_EVERY more bytes of a range (threads share it).
    The part file is synced first, so the bytes a record counts are on disk, not only in the page cache."""

    def __init__(self, path: Path, part_path: Path, total: int, ranges: list[ByteRange]):
        self.path, self.part_path, self.total, self.ranges = path, part_path, total, ranges
        self.lock = threading.Lock()
        self.saved = [r.done for r in ranges]

    def save(self) -> None:
        with self.lock:
            done = [r.done for r in self.ranges]  # each counts bytes its thread flushed before counting them
            if self.part_path.exists():
                fd = os.open(self.part_path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            write_json(self.path, {"total": self.total, "ranges": [[r.start, r.end, d] for r, d in
                                                                   zip(self.ranges, done)]})
            self.saved = done

    def written(self, index: int, done: int) -> None:
        """Range ``index`` has ``done`` bytes flushed to the part file; recorded now and then."""
        self.ranges[index].done = done
        if done - self.saved[index] >= SAVE_EVERY:
            self.save()
