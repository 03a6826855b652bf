"""What the server first said about a file, kept beside its part file so that a resume continues the same version.

``<name>.part.validators`` holds the first answer's ``ETag``, ``Last-Modified`` and total size, written before the
first byte of the part file. A resume asks with ``If-Range`` (the ETag when it is strong, else the date), so a
server whose file changed answers with the whole new file (200) and the download starts again from byte 0 instead
of splicing two versions; an answer whose ETag or total differs from the record (a server that ignores If-Range)
does the same.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.records import write_json

log = logging.getLogger(__name__)

SUFFIX = ".validators"  # after the part file's name


@dataclass
class Validators:
    etag: str | None
    last_modified: str | None
    total: int | None  # bytes of the whole file; None when the server did not say

    @classmethod
    def of(cls, headers: Any, total: int | None) -> "Validators":
        return cls(headers.get("ETag"), headers.get("Last-Modified"), total)

    def if_range(self) -> str | None:
        """The If-Range value: a strong ETag, else the date (RFC 9110 forbids weak ETags there); None: neither."""
        return self.etag if self.etag and not self.etag.startswith("W/") else self.last_modified

    def differs(self, headers: Any, total: int | None) -> str | None:
        """How an answer shows another version of the file than the first answer did; None when it does not."""
        etag, modified = headers.get("ETag"), headers.get("Last-Modified")
        if self.etag and etag and etag != self.etag:
            return "its ETag changed"
        if self.last_modified and modified and modified != self.last_modified:
            return "its Last-Modified date changed"
        if self.total is not None and total is not None and total != self.total:
            return f"its size changed from {self.total:,} to {total:,} bytes"
        return None


def path_for(part_path: Path) -> Path:
    return part_path.with_name(part_path.name + SUFFIX)


def save(part_path: Path, validators: Validators) -> None:
    write_json(path_for(part_path), asdict(validators))


def load(part_path: Path) -> Validators | None:
    """The record of a part file; None when there is none (a part left by an older version: resumed unchecked) or
    it cannot be read (with a warning)."""
    path = path_for(part_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return Validators(data.get("etag"), data.get("last_modified"), data.get("total"))
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s cannot be read (%s); %s is resumed without checking that the file is unchanged", path,
                    type(exc).__name__, part_path.name)
        return None
