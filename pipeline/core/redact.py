"""What may be shown of a download link or a request header: a user's personal links carry a token, in the query
(``?token=...``), in the user part (``https://user:pass@host/...``) or as a path segment (image-net.org's links once
had one), so a link is only ever shown as ``scheme://host/.../name`` with ``?...`` for a query; a header
(``Authorization: ...``) by its name only. Logs, errors, reports and saved configs (pipeline.core.config) use these.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit


def redact_url(url: str) -> str:
    """``url`` as it may be logged: scheme, host and file name; user part, middle path and query hidden."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed host or port: only the scheme and the file name are shown
        scheme, _, rest = url.partition("://")
        name = rest.split("?", 1)[0].split("#", 1)[0].rsplit("/", 1)[-1] if "/" in rest else ""
        return f"{scheme if scheme.isalpha() else '?'}://<malformed host>/.../{name}"
    segments = parts.path.split("/")
    middle = "/.../" if len([s for s in segments[:-1] if s]) else "/"
    return f"{parts.scheme}://{host}{port}{middle}{segments[-1]}{'?...' if parts.query else ''}"


def redact_header(header: str) -> str:
    name, sep, _ = header.partition(":")
    return f"{name.strip()}: ..." if sep else "<header without a colon>"


def redacted_download(table: dict[str, Any]) -> dict[str, Any]:
    """The [download] table of a config with its links and header values redacted, for writing to disk."""
    return {**table, "url": [redact_url(u) for u in table.get("url", [])],
            "header": [redact_header(h) for h in table.get("header", [])]}
