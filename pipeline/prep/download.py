"""The download stage: the official archives from the user's links into the archive dir, resumable, MD5-checked.

Door: ``fetch(cfg)``, run by ``python launch.py --stage download --archive-dir A --url URL ...`` (through
submitit) or ``python -m jobs.download --archive-dir A --url-file links.txt``. Each file is written to
``<name>.part`` and continued with an HTTP Range request after any interruption (a dropped connection, a killed
job, a Slurm requeue); its MD5 is computed from the bytes as they arrive (a part already on disk is hashed once
when resumed; a file in byte ranges once they are all in), and only a file whose MD5 is the expected one is
renamed to ``<name>``. Several files download at once (``--download-workers`` threads), and a large one in
parallel byte ranges (pipeline/prep/byte_ranges.py). A resume asks for the version the first answer described
(If-Range, pipeline/prep/validators.py): a file changed on the server starts again rather than being spliced.
``download_report.json`` in the archive dir records each file (links redacted, see pipeline.core.redact); a file it
lists with the same size and mtime is not fetched again. One downloader at a time holds the archive dir
(pipeline/core/dir_lock.py); what is sent to which host is pipeline/prep/http.py's.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import http.client
import logging
import os
import shutil
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.core.atomic import fsync_dir
from pipeline.core.config import Config
from pipeline.core.dir_lock import locked
from pipeline.core.logs import Progress, human_bytes
from pipeline.core.redact import redact_url
from pipeline.core.records import read_json, write_json
from pipeline.prep import byte_ranges, validators
from pipeline.prep.archives import OFFICIAL_MD5, TEST_TAR, PrepError
from pipeline.prep.http import build_opener, make_request
from pipeline.prep.links import LOCK_FILE, PART_SUFFIX, REPORT_FILE, check_links, parse_headers, read_links
from pipeline.prep.validators import Validators

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # the most bytes per read from the connection, per write to the part file and per MD5 update
OFFICIAL_NAMES = {*OFFICIAL_MD5, TEST_TAR}  # the test archive's MD5 is not published with the others
MAX_BACKOFF_S = 60.0
FATAL_STATUS = {401: "the link needs a login: pass --header or --cookie-file with your credentials",
                403: "the server refuses it: an expired or someone else's link? get a fresh one from your account",
                404: "the server has no such file: check the link",
                410: "the file is gone from the server: get a fresh link"}
RETRY_STATUS = {408, 429}  # and every 5xx
NETWORK_ERRORS = (OSError, http.client.HTTPException)  # timeouts, resets, refused connections, cut bodies
MIN_SPEED_BPS = 1024  # a connection slower than this (bytes/s, averaged over SPEED_TIME_S) is dropped and retried,
SPEED_TIME_S = 60.0   # as curl's --speed-limit 1024 --speed-time 60: a server trickling bytes never times out
WEB_PAGE = ("the server sent a web page (likely an expired or login link) instead of the file; get a fresh link, or "
            "pass --header / --cookie-file with your login, and run the download again")


class DownloadError(PrepError):
    """A file that cannot be downloaded; the message names it and says what to do."""


class _Retry(Exception):
    """A failure worth another try: a timeout, a reset, a cut connection, a 5xx. ``stalled``: the connection was
    too slow, so the bytes it got do not count as progress that starts the retry count again."""

    def __init__(self, message: str, stalled: bool = False):
        super().__init__(message)
        self.stalled = stalled


class _UseRanges(Exception):
    """The server takes Range requests for a large file: fetch it in parallel byte ranges."""

    def __init__(self, total: int):
        super().__init__(total)
        self.total = total


class _RangesUnusable(Exception):
    """The server no longer answers a file's byte ranges as asked (a 200, another size): one stream instead."""


class _Stopped(Exception):
    """Another file failed for good: this one stops too, keeping its part file."""


@dataclass
class Part:
    """One file on its way: ``<name>.part`` holds ``offset`` bytes, ``md5`` has seen exactly those. Or one byte
    range of it (``end`` set): bytes ``start`` to ``offset`` of the range are in their place in the part file,
    ``written`` is told after each chunk is flushed, and the MD5 waits for the whole file (prep/byte_ranges.py)."""
    name: str
    url: str
    path: Path
    offset: int = 0
    total: int | None = None
    md5: Any = field(default_factory=hashlib.md5)
    stats: dict[str, Any] = field(default_factory=lambda: {"retries": 0, "restarts": 0})
    progress: Progress | None = None
    start: int = 0
    end: int | None = None  # excluded; None: to the end of the file
    written: Callable[[int], None] | None = None  # told the bytes of the range now in the file
    stop: threading.Event | None = None  # a range's: set when another range of the file failed
    one_stream: bool = False  # never split (its byte ranges were dropped)
    version: Validators | None = None  # what the first answer said of the file: its ETag, date, size (If-Range)

    def restart(self) -> None:
        self.offset, self.md5, self.version = self.start, hashlib.md5(), None
        self.stats["restarts"] += 1
        self.end_progress()

    def end_progress(self, done: bool = False) -> None:
        if self.progress is not None and self.end is None:  # a range's progress is the whole file's, closed there
            if done:
                self.progress.close()
            elif self.progress.bar is not None:
                self.progress.bar.close()
        self.progress = None


def fetch(cfg: Config) -> dict[str, Any]:
    """The stage's door: download cfg.download's links into cfg.prep.archive_dir."""
    dl = cfg.download
    return download(read_links(dl.url, dl.url_file), cfg.prep.archive_dir,
                    expected_md5=None if cfg.prep.skip_checksum else OFFICIAL_MD5, headers=dl.header,
                    cookie_file=dl.cookie_file, workers=dl.download_workers, retries=dl.download_retries,
                    timeout_s=dl.download_timeout_s, ranges=dl.download_ranges,
                    range_min_bytes=dl.download_range_min_mb << 20, min_speed_bps=dl.download_min_speed_bps,
                    speed_time_s=dl.download_speed_time_s)


def download(links: Sequence[str], archive_dir: str | Path, *, expected_md5: Mapping[str, str] | None = OFFICIAL_MD5,
             headers: Sequence[str] = (), cookie_file: str = "", workers: int = 4, retries: int = 10,
             timeout_s: float = 60.0, backoff_s: float = 2.0, progress_every_s: float = 30.0, ranges: int = 1,
             range_min_bytes: int = 256 << 20, min_speed_bps: int = MIN_SPEED_BPS,
             speed_time_s: float = SPEED_TIME_S) -> dict[str, Any]:
    """Fetch every link into ``archive_dir``; ``expected_md5`` maps file names to MD5s (None checks none, as
    --skip-checksum; tests pass their own archives' table); a file of at least ``range_min_bytes`` comes in
    ``ranges`` parallel byte ranges where the server allows; a connection under ``min_speed_bps`` for
    ``speed_time_s`` is retried (0: never). Returns the report written to REPORT_FILE."""
    return Downloader(Path(archive_dir), expected_md5=expected_md5, headers=parse_headers(headers),
                      cookie_file=cookie_file, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s,
                      progress_every_s=progress_every_s, ranges=ranges, range_min_bytes=range_min_bytes,
                      min_speed_bps=min_speed_bps, speed_time_s=speed_time_s).run(links, workers)


class Downloader:
    """Shared by the download threads: the opener, the report, the disk-space bookkeeping, the stop flag."""

    def __init__(self, archive_dir: Path, *, expected_md5: Mapping[str, str] | None, headers: dict[str, str],
                 cookie_file: str, retries: int, timeout_s: float, backoff_s: float, progress_every_s: float,
                 ranges: int = 1, range_min_bytes: int = 256 << 20, min_speed_bps: int = MIN_SPEED_BPS,
                 speed_time_s: float = SPEED_TIME_S):
        self.archive_dir, self.expected, self.headers = archive_dir, expected_md5, headers
        self.ranges, self.range_min_bytes = ranges, range_min_bytes
        self.min_speed_bps, self.speed_time_s = min_speed_bps, speed_time_s
        self.opener = build_opener(cookie_file, private=headers, header_deadline_s=max(timeout_s, speed_time_s))
        self.retries, self.timeout_s, self.backoff_s, self.every_s = retries, timeout_s, backoff_s, progress_every_s
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.active: dict[str, Part] = {}
        self.report: dict[str, Any] = {}

    def run(self, links: Sequence[str], workers: int) -> dict[str, Any]:
        names = check_links(links)
        self.archive_dir.mkdir(parents=True, exist_ok=True)
        with locked(self.archive_dir, "a download", label="archive dir", lock_file=LOCK_FILE, error=DownloadError,
                    hint="wait for it to end (a job: squeue), or download into another --archive-dir"):
            return self.run_locked(links, names, workers)

    def run_locked(self, links: Sequence[str], names: Sequence[str], workers: int) -> dict[str, Any]:
        if (self.archive_dir / REPORT_FILE).exists() and not (self.archive_dir / REPORT_FILE).is_file():
            raise DownloadError(f"{self.archive_dir / REPORT_FILE} is not a file; the download stage keeps its report "
                                "there: move it away")
        self.report = read_report(self.archive_dir / REPORT_FILE)
        start = time.monotonic()
        log.info("downloading %d file(s) into %s, %d at a time: %s", len(links), self.archive_dir,
                 min(workers, len(links)), ", ".join(map(redact_url, links)))
        self.run_all(self.fetch_one, list(zip(links, names)), workers)
        files = self.report["files"]
        fetched = sum(files[n]["bytes"] for n in names if files[n]["fetched_in_this_run"])
        seconds = time.monotonic() - start
        log.info("download done in %.1f s: %s fetched (%.1f MB/s), %d file(s) already there; report %s", seconds,
                 human_bytes(fetched), fetched / 1e6 / max(seconds, 1e-9),
                 sum(not files[n]["fetched_in_this_run"] for n in names), self.archive_dir / REPORT_FILE)
        return self.report

    def run_all(self, fn: Callable[..., None], calls: Sequence[tuple[Any, ...]], threads: int | None = None,
                stop: threading.Event | None = None) -> None:
        """``fn(*args)`` for each of ``calls`` in threads (one each unless ``threads``); the first failure (or Ctrl-C,
        a requeue) sets ``stop`` (the downloader's own by default), and every file keeps what it has written."""
        with concurrent.futures.ThreadPoolExecutor(max(1, min(threads or len(calls), len(calls))), "download") as pool:
            futures = [pool.submit(fn, *args) for args in calls]
            try:
                concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            finally:
                if not all(f.done() and f.exception() is None for f in futures):
                    (stop or self.stop).set()
        raised = [f.exception() for f in futures if f.exception() is not None]
        errors = [exc for exc in raised if not isinstance(exc, _Stopped)]
        if errors or raised:
            raise (errors or raised)[0]

    def expected_md5(self, name: str) -> str | None:
        if name == TEST_TAR and name not in (self.expected or {}):
            log.warning("%s: no MD5 of it is published with the other archives; it is downloaded unchecked", name)
        elif name not in OFFICIAL_NAMES and name not in (self.expected or {}):
            log.warning("%s is not an official archive name (%s): it is downloaded under its own name, its MD5 "
                        "unchecked", name, ", ".join(sorted(OFFICIAL_NAMES)))
        return None if self.expected is None else self.expected.get(name)

    def fetch_one(self, url: str, name: str) -> None:
        expected = self.expected_md5(name)
        final = self.archive_dir / name
        part = Part(name, url, self.archive_dir / (name + PART_SUFFIX))
        record_path = byte_ranges.ranges_path(part.path)
        for path in (final, part.path, record_path, validators.path_for(part.path)):
            if path.exists() and not path.is_file():
                raise DownloadError(f"{path} is a folder (or another non-file) where the download keeps {name}; move "
                                    "it out of the archive dir and run the download again")
        if final.exists():
            return self.record(name, url, self.check_present(final, expected), fetched=False)
        start = time.monotonic()
        ranges = byte_ranges.load(record_path, part.path) if record_path.exists() else None
        if record_path.exists() and ranges is None:  # load said why
            discard(part.path)
        if ranges is None and part.path.exists():  # one stream's part: a prefix of the file
            log.info("%s: resuming after the %s already in %s", name, human_bytes(part.path.stat().st_size),
                     part.path.name)
            part.offset = hash_into(part.md5, part.path)
        if part.path.exists():
            part.version = validators.load(part.path)
        part.stats["resumed_from"] = part.offset
        with self.lock:
            self.active[name] = part
        try:
            self.fetch_part(part, ranges)
        finally:
            part.end_progress()
            with self.lock:
                self.active.pop(name)
        if is_web_page(part.path, name):
            discard(part.path)
            raise DownloadError(f"{name} from {redact_url(url)}: {WEB_PAGE}")
        digest = part.md5.hexdigest()
        if expected is not None and digest != expected:
            discard(part.path)
            raise DownloadError(f"checksum mismatch for {name} from {redact_url(url)}: MD5 {digest}, expected "
                                f"{expected}; the damaged {part.path.name} was removed and nothing is kept under "
                                f"{name}. Run the download again (a fresh link if it happens twice), or pass "
                                "--skip-checksum for a mirror or subset you trust")
        os.replace(part.path, final)
        fsync_dir(self.archive_dir)
        record_path.unlink(missing_ok=True)  # after the rename: a part file is never without its ranges' record
        validators.path_for(part.path).unlink(missing_ok=True)
        seconds = time.monotonic() - start
        fetched = part.offset - part.stats["resumed_from"]
        self.record(name, url, {"md5": digest, "expected_md5": expected, **part.stats, "seconds": round(seconds, 3),
                                "mb_per_s": round(fetched / 1e6 / max(seconds, 1e-9), 1)}, fetched=True)

    def fetch_part(self, part: Part, ranges: list[byte_ranges.ByteRange] | None) -> None:
        """The file into its part file: in one stream, or in byte ranges (those recorded, or new ones when the server
        takes Range requests for a large file); ranges the server stops honouring fall back to one stream."""
        while True:
            try:
                if ranges is None:
                    self.transfer_with_retries(part)
                else:
                    self.fetch_ranges(part, ranges)
                return
            except _UseRanges as large:
                ranges = byte_ranges.split(large.total, self.ranges)
            except _RangesUnusable as exc:
                log.warning("%s: %s; the file starts again in one stream (--download-ranges 1 does so from the "
                            "start)", part.name, exc)
                discard(part.path)
                part.offset, part.md5, part.one_stream, part.version, ranges = 0, hashlib.md5(), True, None, None

    def fetch_ranges(self, part: Part, ranges: list[byte_ranges.ByteRange]) -> None:
        """Every missing byte range into its place in the part file, in parallel, then the MD5 of the whole."""
        total = ranges[-1].end
        done = sum(r.done for r in ranges)
        part.total, part.offset, part.stats["resumed_from"] = total, done, done
        self.check_space(part)
        record = byte_ranges.RangesRecord(byte_ranges.ranges_path(part.path), part.path, total, ranges)
        if not part.path.exists():  # the records first: a part file never exists without them
            if part.version is not None:
                validators.save(part.path, part.version)
            record.save()
            with open(part.path, "wb") as fh:
                fh.truncate(total)
        log.info("%s: %s in %d byte ranges in parallel%s", part.name, human_bytes(total), len(ranges),
                 f", resuming after {human_bytes(done)}" if done else "")
        progress = Progress(part.name, total - done, unit="B", logger=log, every_s=self.every_s)
        file_stop = threading.Event()  # one range failing stops the others of this file
        pieces = [Part(part.name, part.url, part.path, offset=r.start + r.done, total=total, stats=part.stats,
                       progress=progress, start=r.start, end=r.end, written=functools.partial(record.written, i),
                       stop=file_stop, version=part.version) for i, r in enumerate(ranges) if not r.complete]
        try:
            self.run_all(self.transfer_with_retries, [(piece,) for piece in pieces], stop=file_stop)
        finally:
            record.save()
            progress.close()
        part.offset = hash_into(part.md5, part.path)

    def transfer_with_retries(self, part: Part) -> None:
        tries = 0
        while True:
            before = part.offset
            try:
                if self.transfer(part):
                    part.end_progress(done=True)
                    return
            except _Retry as exc:
                tries = 1 if part.offset > before and not exc.stalled else tries + 1  # progress: counted anew
                if tries > self.retries:
                    where = (f"from byte {part.offset:,}" if part.end is None else "where each byte range stopped; a "
                             "server that refuses several connections needs --download-ranges 1")
                    raise DownloadError(f"{part.name}: gave up after {self.retries} retries: {exc} "
                                        f"({redact_url(part.url)}); run the download again, it resumes "
                                        f"{where}") from None
                with self.lock:  # a file's ranges share its stats
                    part.stats["retries"] += 1
                delay = min(self.backoff_s * 2 ** (tries - 1), MAX_BACKOFF_S)
                log.warning("%s: %s; retry %d of %d in %.1f s, from byte %d", part.name, exc, tries, self.retries,
                            delay, part.offset)
                if self.wait_stopped(part, delay):
                    raise _Stopped() from None

    def stopped(self, part: Part) -> bool:
        return self.stop.is_set() or (part.stop is not None and part.stop.is_set())

    def wait_stopped(self, part: Part, delay: float) -> bool:
        """Sleep ``delay`` seconds unless stopped first (True)."""
        deadline = time.monotonic() + delay
        while not self.stopped(part):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.stop.wait(min(left, 0.2))
        return True

    def transfer(self, part: Part) -> bool:
        """One request, streamed into the part file; True once the file is complete. A fresh file's first request
        asks for ``bytes=0-`` when ranges may be used: a large file answered with 206 raises _UseRanges. A resume
        asks for the first answer's version (If-Range); an answer with another one restarts the file."""
        may_split = self.ranges > 1 and part.end is None and part.offset == 0 and not part.one_stream
        if_range = part.version.if_range() if part.version is not None else None
        try:
            response = self.opener.open(make_request(part.url, self.headers, part.offset, part.end,
                                                     ranged=may_split, if_range=if_range), timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            return self.http_error(part, exc.code, exc.reason, exc.headers)
        except (http.client.InvalidURL, UnicodeError):  # their messages quote the link or the header
            raise DownloadError(f"{part.name}: the request for {redact_url(part.url)} (or a link it redirects to) "
                                "cannot be sent: a character HTTP cannot carry (a space, a control or non-ASCII "
                                "character) in the link or in a header, a cookie among them; check them") from None
        except NETWORK_ERRORS as exc:
            raise _Retry(describe(exc)) from None
        with response:
            first, total = content_range(response.headers)
            if response.headers.get_content_type() == "text/html" and not part.name.endswith((".html", ".htm")):
                raise DownloadError(f"{part.name} from {redact_url(part.url)}: {WEB_PAGE}")
            if may_split and response.status == 206 and first == 0 and (total or 0) >= self.range_min_bytes:
                part.version = Validators.of(response.headers, total)
                raise _UseRanges(total or 0)
            changed = part.version.differs(response.headers, total) if part.version and response.status == 206 \
                else None
            if part.end is not None and (response.status != 206 or first != part.offset or total != part.total):
                what = "the whole file" if response.status != 206 else f"byte {first} on of a {total}-byte file"
                raise _RangesUnusable(f"the server answered a request for bytes {part.offset}-{part.end - 1} of "
                                      f"{part.total} with {what} (HTTP {response.status})")
            if part.end is not None and changed:
                raise _RangesUnusable(f"the file changed on the server ({changed})")
            if changed or (response.status == 206 and first != part.offset):
                log.warning("%s: %s; restarting it from byte 0", part.name, f"the file changed on the server "
                            f"({changed})" if changed else f"the server answered from byte {first} instead of "
                            f"{part.offset}")
                part.restart()
                raise _Retry("restarting the file")
            if response.status != 206:
                if part.offset:
                    log.warning("%s: the server answered the resume from byte %d with the whole file (HTTP %d): %s; "
                                "restarting it from byte 0, the %s already fetched are fetched again", part.name,
                                part.offset, response.status, "the file changed on the server (If-Range), or the "
                                "server ignores Range requests" if if_range else "the server ignores Range requests",
                                human_bytes(part.offset))
                    part.restart()
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            part.total = total
            if part.end is None:  # a range's space was checked for the whole file
                self.check_space(part)
                if part.version is None:  # the first answer: its version is the one a resume asks for
                    part.version = Validators.of(response.headers, total)
                    validators.save(part.path, part.version)
            self.stream(part, response)
        last = part.total if part.end is None else part.end
        if last is not None and part.offset < last:
            raise _Retry(f"connection closed at byte {part.offset:,} of {last:,}")
        return True

    def http_error(self, part: Part, status: int, reason: str, headers: Any) -> bool:
        if status == 416 and part.end is not None:
            raise _RangesUnusable(f"the server has no bytes {part.offset}-{part.end - 1} (HTTP 416): the file changed")
        if status == 416 and part.offset == 0 and content_range(headers)[1] == 0:  # bytes=0- of an empty file
            part.path.write_bytes(b"")
            part.total = 0
            return True
        if status == 416 and part.offset:  # nothing after our offset: complete, unless the file shrank
            total = content_range(headers)[1]
            if total == part.offset:
                part.total = total
                return True
            log.warning("%s: the part file (%d bytes) is longer than the file on the server (%s); restarting it",
                        part.name, part.offset, total)
            part.restart()
            raise _Retry("restart from byte 0")
        if status in FATAL_STATUS:
            raise DownloadError(f"{part.name}: HTTP {status} {reason} from {redact_url(part.url)}: "
                                f"{FATAL_STATUS[status]}")
        if status >= 500 or status in RETRY_STATUS:
            raise _Retry(f"HTTP {status} {reason}")
        raise DownloadError(f"{part.name}: HTTP {status} {reason} from {redact_url(part.url)}; check the link")

    def stream(self, part: Part, response: http.client.HTTPResponse) -> None:
        if part.progress is None:
            remaining = None if part.total is None else part.total - part.offset
            part.progress = Progress(part.name, remaining, unit="B", logger=log, every_s=self.every_s)
        try:
            with open(part.path, "r+b" if part.offset or part.end is not None else "wb") as fh:
                fh.seek(part.offset)
                if part.end is None:
                    fh.truncate()
                window_start, window_bytes = time.monotonic(), 0  # the low-speed limit's (curl's --speed-time)
                while part.end is None or part.offset < part.end:
                    if self.stopped(part):
                        raise _Stopped()
                    try:  # read1: what one read of the socket gives, so a trickle is seen between its bytes
                        chunk = response.read1(CHUNK if part.end is None else min(CHUNK, part.end - part.offset))
                    except NETWORK_ERRORS as exc:
                        raise _Retry(describe(exc)) from None
                    if not chunk:
                        return
                    window_bytes += len(chunk)
                    if time.monotonic() - window_start >= self.speed_time_s > 0:
                        if window_bytes < self.min_speed_bps * (time.monotonic() - window_start):
                            raise _Retry(f"slower than {self.min_speed_bps:,} bytes/s for {self.speed_time_s:g} s",
                                         stalled=True)
                        window_start, window_bytes = time.monotonic(), 0
                    fh.write(chunk)
                    part.offset += len(chunk)
                    part.progress.update(len(chunk))
                    if part.written is None:
                        part.md5.update(chunk)
                    else:
                        fh.flush()
                        part.written(part.offset - part.start)
        except OSError as exc:  # the disk, not the network: a retry would not help
            raise DownloadError(f"cannot write {part.path}: {exc.strerror or exc}; free some space or pass "
                                "another --archive-dir (the download resumes from what was written)") from None

    def check_space(self, part: Part) -> None:
        """The bytes still to come, of this file and of those under way, must fit the archive dir's free space."""
        if part.total is None:
            return
        with self.lock:
            others = sum(p.total - p.offset for p in self.active.values() if p is not part and p.total)
            free = shutil.disk_usage(self.archive_dir).free
            need = part.total - part.offset
            if need + others > free:
                raise DownloadError(f"{part.name} needs {human_bytes(need)} more (and the other downloads under way "
                                    f"{human_bytes(others)}), but {self.archive_dir} has {human_bytes(free)} free; "
                                    "free some space or pass another --archive-dir")

    def check_present(self, final: Path, expected: str | None) -> dict[str, Any]:
        """A file already under its final name: recorded by an earlier run (same size and mtime), or hashed now."""
        previous = self.report["files"].get(final.name)
        stat = final.stat()
        if previous and (previous.get("bytes"), previous.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns) and \
                expected in (None, previous.get("md5")) and "md5" in previous:
            log.info("%s is already downloaded%s; skipping it", final.name,
                     " and verified" if expected else " (its MD5 unchecked)")
            return {**previous, "expected_md5": expected}
        md5 = hashlib.md5()
        hash_into(md5, final)
        digest = md5.hexdigest()
        if expected is not None and digest != expected:
            raise DownloadError(f"{final} is already there but its MD5 {digest} is not the expected {expected}: "
                                f"rename it to {final.name}{PART_SUFFIX} to continue it (an interrupted download), "
                                "or delete it, and run the download again; --skip-checksum keeps it as it is")
        log.info("%s was already there; its MD5 %s", final.name, "matches" if expected else "is recorded, unchecked")
        return {"md5": digest, "expected_md5": expected}

    def record(self, name: str, url: str, entry: dict[str, Any], *, fetched: bool) -> None:
        stat = (self.archive_dir / name).stat()
        checksum = "ok" if entry["expected_md5"] else "skipped" if self.expected is None else "unchecked"
        with self.lock:
            self.report["files"][name] = {**entry, "link": redact_url(url), "bytes": stat.st_size,
                                          "mtime_ns": stat.st_mtime_ns, "checksum": checksum,
                                          "fetched_in_this_run": fetched}
            write_json(self.archive_dir / REPORT_FILE, self.report)


def discard(part_path: Path) -> None:
    """A part file and its records (byte ranges, validators), when they are there."""
    part_path.unlink(missing_ok=True)
    byte_ranges.ranges_path(part_path).unlink(missing_ok=True)
    validators.path_for(part_path).unlink(missing_ok=True)


def read_report(path: Path) -> dict[str, Any]:
    """The report of earlier runs (an empty one without); one that lacks its ``files`` table is a DownloadError."""
    report = read_json(path, DownloadError, "remove it (the download writes it anew)") or {"files": {}}
    files = report.get("files")
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        raise DownloadError(f"{path} has no 'files' table of one object per file, as the download writes it; remove "
                            "it (the download writes it anew, hashing the files already there)")
    return report


def is_web_page(path: Path, name: str) -> bool:
    """Whether a file not named .html starts as an HTML page does (what a login or expired-link page sends)."""
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html")) and not name.endswith((".html", ".htm"))


def hash_into(md5: Any, path: Path) -> int:
    """Feed a file on disk to ``md5`` (a part left by an earlier run, or a file already there); its size."""
    size = path.stat().st_size
    with open(path, "rb") as fh, Progress(f"{path.name} (hashing)", size, unit="B", logger=log,
                                          enabled=size > 1 << 30) as progress:
        while chunk := fh.read(CHUNK):
            md5.update(chunk)
            progress.update(len(chunk))
    return size


def content_range(headers: Any) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``Content-Range: bytes 100-199/200`` (or ``bytes */200``); None if absent."""
    value = (headers.get("Content-Range") or "") if headers is not None else ""
    unit, _, spec = value.partition(" ")
    span, _, total = spec.partition("/")
    first = span.partition("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def describe(exc: BaseException) -> str:
    """A network error in a few words: its type and the system's reason, never the library's message (urllib's and
    http.client's may quote the link, token and all)."""
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed after {len(exc.partial):,} more bytes"
    reason = getattr(exc, "strerror", None)
    return f"{type(exc).__name__}: {reason}" if isinstance(reason, str) and reason else type(exc).__name__
