"""Download process entry: ``python -m jobs.download --archive-dir A --url URL [--url URL ...] [--url-file F]``.

Runs the download stage in this process (what ``launch.py --stage download`` runs inside its job): every link
into the archive dir, resumed from its ``.part`` file and checked against the official MD5s. An expired link
(401, 403, 404), a full disk or a damaged file is printed as one ``error:`` line and exits with status 2.
"""
from __future__ import annotations

import sys
from typing import Sequence

from jobs.common import run_stage

def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(argv, "download", "Download the official archives from your links, resumable, MD5-checked.")


if __name__ == "__main__":
    sys.exit(main())
