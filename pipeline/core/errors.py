"""The one base class of bad input, so entry points need no list of what to show without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Input that cannot be used: the message says what is wrong and what to do. Entry points (launch.py, the
    jobs) print it as one line and exit with status 2, as argparse does for a bad flag; --debug adds the
    traceback. Every other exception is a bug and keeps its traceback."""
