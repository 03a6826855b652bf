"""A real HTTP server on 127.0.0.1 for the download tests: files of a folder, with Range support that can be
turned off, and the failures a real download meets (a cut connection, 503s, a refusal) made on demand."""
from __future__ import annotations

import hashlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


class ArchiveServer:
    """Serves ``root``; every request is recorded in ``requests`` (name, query, Range header, all headers, status,
    body bytes sent). ``cut_at[name] = n``: the next answer for ``name`` that holds byte ``n`` of the file closes
    the connection once byte ``n`` is sent; ``cut_range_at[name] = n``: the same, for the next answer to a bounded
    range (``bytes=a-b``). ``status[name]``: answer that status instead. ``fail_first[name] = k``: the next k
    answers are 503. ``announce[name]``: the Content-Length sent, whatever the file holds. ``rate_bps``: each
    connection sends at most that many bytes a second, as servers that cap each connection do.
    ``bounded_ranges=False``: ``bytes=a-b`` requests are answered with the whole file (200).
    Each answer carries an ``ETag`` (of the file's bytes) and ``Last-Modified`` unless ``validators=False``, and
    ``If-Range`` is honoured (another version: the whole file, 200) unless ``if_range=False``.
    ``replace_after_cut[name] = data``: once an answer for ``name`` is cut, the file holds ``data`` (it changed on
    the server). ``content_type[name]``: the Content-Type sent. ``redirect[name] = (status, location)``: answer
    with that redirect. ``host``: the loopback address to bind (127.0.0.2 is another host)."""

    def __init__(self, root: Path, *, ranges: bool = True, rate_bps: float | None = None, bounded_ranges: bool = True,
                 validators: bool = True, if_range: bool = True, host: str = "127.0.0.1"):
        self.root, self.ranges, self.rate_bps, self.bounded_ranges = Path(root), ranges, rate_bps, bounded_ranges
        self.validators, self.if_range = validators, if_range
        self.replace_after_cut: dict[str, bytes] = {}
        self.content_type: dict[str, str] = {}
        self.redirect: dict[str, tuple[int, str]] = {}
        self.cut_at: dict[str, int] = {}
        self.cut_range_at: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.fail_first: dict[str, int] = {}
        self.announce: dict[str, int] = {}
        self.requests: list[dict[str, Any]] = []
        self.httpd = ThreadingHTTPServer((host, 0), _Handler)
        self.httpd.archive_server = self  # type: ignore[attr-defined]
        self.httpd.handle_error = lambda request, address: None  # a client that hung up: not the test's output
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str, *, query: str = "", userinfo: str = "", folder: str = "files") -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{userinfo + '@' if userinfo else ''}{host}:{port}/{folder}/{name}{'?' + query if query else ''}"

    def sent(self, name: str) -> int:
        """Body bytes of ``name`` sent in all answers."""
        return sum(r["sent"] for r in self.requests if r["name"] == name)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "ArchiveServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        server: ArchiveServer = self.server.archive_server  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        name = unquote(parts.path.rsplit("/", 1)[-1])
        record = {"name": name, "query": parts.query, "range": self.headers.get("Range"),
                  "headers": dict(self.headers), "status": 200, "sent": 0}
        server.requests.append(record)
        path = server.root / name
        if name in server.redirect:
            record["status"], location = server.redirect[name]
            self.send_response(record["status"])
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if name in server.status or not path.is_file() or server.fail_first.get(name, 0) > 0:
            if server.fail_first.get(name, 0) > 0:
                server.fail_first[name] -= 1
            record["status"] = server.status.get(name, 503 if path.is_file() else 404)
            self.send_error(record["status"])
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        etag = f'"{hashlib.md5(data).hexdigest()[:16]}"'
        modified = self.date_time_string(int(path.stat().st_mtime))
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", record["range"] or "")
        if server.if_range and self.headers.get("If-Range") not in (None, etag, modified):
            wanted = None  # another version than the client's: the whole file
        if wanted and server.ranges and (server.bounded_ranges or not wanted.group(2)):
            start = int(wanted.group(1))
            end = min(int(wanted.group(2)) + 1, len(data)) if wanted.group(2) else len(data)
            if start >= len(data):
                record["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            record["status"] = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(server.announce.get(name, end - start)))
        self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
        self.send_header("Content-Type", server.content_type.get(name, "application/x-tar"))
        if server.validators:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
        self.end_headers()
        cut = server.cut_at.pop(name) if start < server.cut_at.get(name, end) < end else end
        if wanted and wanted.group(2) and start < server.cut_range_at.get(name, end) < end:
            cut = server.cut_range_at.pop(name)
        if cut < end and name in server.replace_after_cut:
            path.write_bytes(server.replace_after_cut.pop(name))  # read above: this answer still sends the old one
        body = data[start:min(cut, end)]
        step = max(1, len(body) if server.rate_bps is None else int(server.rate_bps / 20))
        for offset in range(0, len(body), step):
            self.wfile.write(body[offset:offset + step])
            record["sent"] += len(body[offset:offset + step])
            if server.rate_bps is not None:
                time.sleep(step / server.rate_bps)
        self.close_connection = True


def main() -> None:
    """``python -m tests.download_helpers ROOT [BYTES_PER_S]``: serve ROOT (benchmarks use it from another process),
    each connection capped at BYTES_PER_S when given; print the base URL, serve until killed."""
    import sys

    server = ArchiveServer(Path(sys.argv[1]), rate_bps=float(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(server.url("").rsplit("/", 2)[0], flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
