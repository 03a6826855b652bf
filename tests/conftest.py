"""Shared by every test folder: the helper modules beside this file (``from launch_helpers import ...``) import
from tests in subfolders too (tests/launcher/, tests/jobs/), which pytest puts on sys.path by their own folder."""
from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
