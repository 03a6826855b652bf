"""The download stage against a hostile or careless server and careless input: credentials stay with their host, no
link's token reaches a message, one downloader per archive dir, no file spliced from two versions, one-line errors."""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error

import pytest

from download_helpers import ArchiveServer
from train_helpers import REPO_ROOT
from pipeline.core.config import ConfigError
from pipeline.core.errors import UserError
from pipeline.prep.archives import OFFICIAL_MD5, TEST_TAR, VAL_TAR
from pipeline.prep.download import LOCK_FILE, PART_SUFFIX, REPORT_FILE, DownloadError, describe, download
from pipeline.prep.links import check_links, load_cookies, parse_headers, read_links

SECRET = "SECRET-TOKEN-42"
NAME = "data.bin"


def payload(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


@pytest.fixture
def site(tmp_path):
    """A folder served as the site: ``data.bin`` (40,000 bytes)."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / NAME).write_bytes(payload(40_000, 1))
    return folder


def get(server, out, name=NAME, **kwargs):
    kwargs.setdefault("backoff_s", 0.05)
    kwargs.setdefault("expected_md5", None)
    return download([server.url(name)], out, **kwargs)


# 1. Credentials follow redirects only on their own origin; only http(s) redirects are followed.

@pytest.mark.parametrize("elsewhere", ["127.0.0.2", "another port"])
def test_credentials_are_not_sent_to_another_host_or_port_after_a_redirect(site, tmp_path, elsewhere):
    """The user part, --header values (a Cookie header too) stay with the link's origin; the cookie file's cookies
    follow the cookie rules (their domain, any port), as in a browser."""
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tsession\tjar-cookie\n")
    host = "127.0.0.2" if elsewhere == "127.0.0.2" else "127.0.0.1"
    with ArchiveServer(site) as first, ArchiveServer(site, host=host) as second:
        first.redirect[NAME] = (302, second.url(NAME))
        download([first.url(NAME, userinfo=f"me:{SECRET}")], tmp_path / "out", expected_md5=None, cookie_file=str(
            cookies), headers=[f"X-Api-Key: {SECRET}", f"Cookie: extra={SECRET}"])
    sent = first.requests[0]["headers"]
    assert sent["X-Api-Key"] == SECRET and "Authorization" in sent and SECRET in sent["Cookie"]
    assert len(second.requests) == 1 and SECRET not in json.dumps(second.requests[0]["headers"])
    assert "Authorization" not in second.requests[0]["headers"] and "X-Api-Key" not in second.requests[0]["headers"]
    assert second.requests[0]["headers"].get("Cookie") == (None if host == "127.0.0.2" else "session=jar-cookie")
    assert (tmp_path / "out" / NAME).read_bytes() == (site / NAME).read_bytes()


def test_credentials_are_kept_on_a_redirect_within_the_same_host(site, tmp_path):
    with ArchiveServer(site) as server:
        server.redirect["old.bin"] = (301, server.url(NAME, folder="moved"))
        download([server.url("old.bin")], tmp_path / "out", expected_md5=None, headers=[f"X-Api-Key: {SECRET}"])
    assert [r["headers"].get("X-Api-Key") for r in server.requests] == [SECRET, SECRET]
    assert (tmp_path / "out" / "old.bin").read_bytes() == (site / NAME).read_bytes()


@pytest.mark.parametrize("target, shown", [(f"ftp://127.0.0.1/data.bin?token={SECRET}", "ftp://127.0.0.1/data.bin?..."),
                                           (f"file:///etc/passwd?token={SECRET}", "file:///.../passwd?...")])
def test_a_redirect_to_another_scheme_is_refused_in_one_line_without_its_query(site, tmp_path, target, shown):
    with ArchiveServer(site) as server, pytest.raises(UserError) as refused:
        server.redirect[NAME] = (302, target)
        get(server, tmp_path / "out", retries=0)
    message = str(refused.value)
    assert "only http:// and https:// redirects are followed" in message
    assert f"redirects (HTTP 302) to {shown}" in message
    assert SECRET not in message and "\n" not in message and len(server.requests) == 1


# 2. A link http.client would refuse is refused up front, shown redacted; no library message quotes a link.

@pytest.mark.parametrize("link, why", [
    (f"http://127.0.0.1/a/{NAME}?token={SECRET} x", "holds a space"),
    (f"http://127.0.0.1/{SECRET}\x7f/{NAME}", "holds a control character"),
    (f"http://127.0.0.1/é/{NAME}?token={SECRET}", "holds a non-ASCII character"),
    (f"http://[::1/{SECRET}/{NAME}?token={SECRET}", "has a malformed host or port"),
    (f"http://127.0.0.1:99999/{NAME}?token={SECRET}", "has a malformed host or port"),
    (f"http://{SECRET}@127.0.0.1:port/{NAME}", "has a malformed host or port"),
])
def test_links_http_client_would_refuse_are_refused_up_front_and_redacted(tmp_path, link, why):
    with pytest.raises(ConfigError) as refused:
        download([link], tmp_path / "out", expected_md5=None)
    assert why in str(refused.value) and SECRET not in str(refused.value) and NAME in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_network_errors_are_described_without_the_library_message():
    leaky = [http.client.InvalidURL(f"URL can't contain control characters. 'http://h/x?token={SECRET} '"),
             urllib.error.URLError(f"unknown url type: http://h/x?token={SECRET}"),
             http.client.BadStatusLine(f"HTTP/1.1 {SECRET}"), ValueError(f"http://h/?t={SECRET}")]
    assert all(SECRET not in describe(exc) for exc in leaky)
    assert describe(ConnectionResetError(104, "Connection reset by peer")) == \
        "ConnectionResetError: Connection reset by peer"


# 3. A malformed cookies.txt line is named by its number, never shown.

@pytest.mark.parametrize("line", [f".example.org\tTRUE\t/\tFALSE\t0\tsession{SECRET}",  # 6 fields
                                  f".example.org\tTRUE\t/\tFALSE\t0\tsession\t{SECRET}\u20ac"])  # not in a header
def test_a_malformed_cookie_line_is_named_by_number_without_its_value(tmp_path, line):
    cookies = tmp_path / "cookies.txt"
    cookies.write_text(f"# Netscape HTTP Cookie File\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_cookies(str(cookies))
    assert "line 3 is not a Netscape cookies.txt line" in str(refused.value) and SECRET not in str(refused.value)


# 5. One downloader per archive dir.

def test_a_second_download_into_the_same_archive_dir_is_refused_naming_the_holder(site, tmp_path):
    out = tmp_path / "out"
    with ArchiveServer(site, rate_bps=40_000) as server:  # about 1 s for the file
        first = subprocess.Popen([sys.executable, "-c", "import sys; from pipeline.prep.download import download; "
                                  "download([sys.argv[1]], sys.argv[2], expected_md5=None)", server.url(NAME), str(out)],
                                 cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
        deadline = time.monotonic() + 30
        while not ((out / LOCK_FILE).is_file() and (out / LOCK_FILE).read_text()) and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(DownloadError) as refused:
            get(server, out)
        refused_after_s = time.monotonic() - started
        assert first.wait(timeout=60) == 0
    assert f"archive dir {out} is in use by a download on host {socket.gethostname()}, pid {first.pid}, started" \
        in str(refused.value)
    assert refused_after_s < 0.5 and len(server.requests) == 1
    assert (out / NAME).read_bytes() == (site / NAME).read_bytes()
    assert download([server.url(NAME)], out, expected_md5=None)["files"][NAME]["fetched_in_this_run"] is False


# 6. A file that changes on the server is not spliced; links whose files would collide are refused.

def test_a_file_changed_on_the_server_between_two_runs_starts_again(site, tmp_path, caplog):
    """The first run is cut and gives up; the file changes; the resume asks If-Range and gets the new version whole."""
    out = tmp_path / "out"
    with ArchiveServer(site) as server:
        server.cut_at[NAME] = 15_000
        with pytest.raises(DownloadError, match="gave up after 0 retries"):
            get(server, out, retries=0)
        old_etag = json.loads((out / (NAME + PART_SUFFIX + ".validators")).read_text())["etag"]
        assert old_etag and (out / (NAME + PART_SUFFIX)).stat().st_size == 15_000
        (site / NAME).write_bytes(new := payload(40_000, 2))  # the same size, other bytes
        get(server, out)
    assert server.requests[1]["range"] == "bytes=15000-" and server.requests[1]["headers"]["If-Range"] == old_etag
    assert server.requests[1]["status"] == 200 and "the file changed on the server" in caplog.text
    assert (out / NAME).read_bytes() == new and sorted(p.name for p in out.iterdir()) == [LOCK_FILE, NAME,
                                                                                       REPORT_FILE]


@pytest.mark.parametrize("server_kind, new_size, why", [
    ({"validators": False}, 50_000, "its size changed from 40,000 to 50,000 bytes"),  # no ETag: the total tells
    ({"if_range": False}, 40_000, "its ETag changed"),  # If-Range ignored: the answer's ETag tells
])
def test_a_file_changed_during_a_download_is_restarted_not_spliced(site, tmp_path, caplog, server_kind, new_size,
                                                                   why):
    new = payload(new_size, 3)
    with ArchiveServer(site, **server_kind) as server:
        server.cut_at[NAME] = 15_000
        server.replace_after_cut[NAME] = new
        report = get(server, tmp_path / "out")
    assert [r["status"] for r in server.requests] == [200, 206, 200]  # cut, the changed answer, the file again
    assert f"the file changed on the server ({why}); restarting it from byte 0" in caplog.text
    assert (tmp_path / "out" / NAME).read_bytes() == new and report["files"][NAME]["restarts"] == 1


def test_byte_ranges_of_a_file_changed_during_the_download_start_again_in_one_stream(site, tmp_path, caplog):
    new = payload(40_000, 4)
    with ArchiveServer(site) as server:
        server.cut_range_at[NAME] = 25_000  # inside the third of 4 ranges
        server.replace_after_cut[NAME] = new
        get(server, tmp_path / "out", ranges=4, range_min_bytes=1024)
    refused = [r for r in server.requests if r["headers"].get("If-Range") and r["range"] != "bytes=0-"]
    # a range asked after the change gets the whole new file instead (the other ranges run in parallel threads, so
    # one asked before the change may reach the server's log after it)
    assert any(r["status"] == 200 for r in refused)
    assert "the file starts again in one stream" in caplog.text and (tmp_path / "out" / NAME).read_bytes() == new


@pytest.mark.parametrize("names, message", [
    (["foo.tar", "foo.tar.part"], "collide: foo.tar is written to foo.tar.part"),
    (["foo.tar.part.ranges", "foo.tar"], "collide"), (["download_report.json"], "keeps in the archive dir for itself")])
def test_links_whose_files_would_overwrite_each_other_are_refused(names, message):
    with pytest.raises(ConfigError, match=message):
        check_links([f"https://host/{SECRET}/{name}" for name in names])


def test_the_test_archive_is_said_to_be_unchecked(site, tmp_path, caplog):
    (site / TEST_TAR).write_bytes(payload(3000, 5))
    with ArchiveServer(site) as server:
        report = get(server, tmp_path / "out", name=TEST_TAR, expected_md5=OFFICIAL_MD5)
    assert f"{TEST_TAR}: no MD5 of it is published with the other archives; it is downloaded unchecked" in caplog.text
    assert report["files"][TEST_TAR]["checksum"] == "unchecked"


# 10. One line instead of a traceback; a web page named as such; a trickle times out.

@pytest.mark.parametrize("header", [f"X-Key: {SECRET}é", f"X-Key: {SECRET}\r\nX-Evil: 1", f"X-Key: {SECRET}\x00"])
def test_a_header_value_http_cannot_carry_is_refused_without_its_value(header):
    with pytest.raises(ConfigError, match="non-ASCII or control character") as refused:
        parse_headers([header])
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize("blocked", [NAME, NAME + PART_SUFFIX])
def test_a_folder_where_the_file_or_its_part_goes_is_one_line(site, tmp_path, blocked):
    (tmp_path / "out" / blocked).mkdir(parents=True)
    with ArchiveServer(site) as server, pytest.raises(DownloadError, match=f"{blocked} is a folder .* move it out"):
        get(server, tmp_path / "out")


@pytest.mark.parametrize("report", ['{"version": 1}', '{"files": []}', '{"files": {"a": 1}}'])
def test_a_report_without_its_files_table_is_one_line(site, tmp_path, report):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / REPORT_FILE).write_text(report)
    with ArchiveServer(site) as server, pytest.raises(DownloadError, match="has no 'files' table"):
        get(server, tmp_path / "out")


def test_a_links_file_starting_with_a_bom_is_read(tmp_path):
    (tmp_path / "links.txt").write_bytes("\ufeffhttps://host/a.tar\n# c\nhttps://host/b.tar\n".encode())
    links = read_links([], str(tmp_path / "links.txt"))
    assert links == ["https://host/a.tar", "https://host/b.tar"] and check_links(links) == ["a.tar", "b.tar"]


@pytest.mark.parametrize("content_type, body", [("text/html; charset=utf-8", b"\x00" * 500),
                                                ("application/octet-stream", b"\n <!DOCTYPE html><html>Login</html>"),
                                                ("application/x-tar", b"<HTML><body>expired</body></HTML>")])
def test_a_web_page_instead_of_the_archive_is_named_as_such(served_page, tmp_path, content_type, body):
    with served_page(body, content_type) as server, pytest.raises(DownloadError) as refused:
        get(server, tmp_path / "out", name=VAL_TAR, expected_md5=OFFICIAL_MD5)
    message = str(refused.value)
    assert "the server sent a web page (likely an expired or login link)" in message and "checksum" not in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_FILE]


@pytest.fixture
def served_page(tmp_path):
    def serve(body, content_type):
        (tmp_path / "page").mkdir()
        (tmp_path / "page" / VAL_TAR).write_bytes(body)
        server = ArchiveServer(tmp_path / "page")
        server.content_type[VAL_TAR] = content_type
        return server
    return serve


def test_a_server_trickling_bytes_times_out(site, tmp_path):
    started = time.monotonic()
    with ArchiveServer(site, rate_bps=10) as server, pytest.raises(DownloadError) as slow:  # 1 byte each 0.1 s
        get(server, tmp_path / "out", retries=1, timeout_s=5, min_speed_bps=100, speed_time_s=0.3)
    assert "gave up after 1 retries: slower than 100 bytes/s for 0.3 s" in str(slow.value)
    assert time.monotonic() - started < 3 and len(server.requests) == 2


class TricklingHeaders:
    """A loopback server that sends its status line and headers one byte every 0.1 s, for ever (within the test)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.requests = 0
        self.stop = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.requests += 1
            threading.Thread(target=self.trickle, args=(conn,), daemon=True).start()

    def trickle(self, conn):
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 10_000:
                if self.stop.wait(0.1):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def url(self, name):
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/{name}"


def test_a_server_trickling_its_headers_times_out(tmp_path):
    """The socket timeout bounds each read, and each byte resets it: the headers as a whole have a deadline."""
    server = TricklingHeaders()
    started = time.monotonic()
    try:
        with pytest.raises(DownloadError, match="gave up after 1 retries"):
            download([server.url(NAME)], tmp_path / "out", expected_md5=None, retries=1, backoff_s=0.05,
                     timeout_s=0.5, speed_time_s=1.0)
    finally:
        server.stop.set()
    assert time.monotonic() - started < 10 and server.requests == 2


# 12. A file whose MD5 was not checked is never called verified.

def test_a_checksum_skipped_file_is_never_called_verified(site, tmp_path, caplog):
    caplog.set_level(logging.INFO, "pipeline.prep.download")
    with ArchiveServer(site) as server:
        get(server, tmp_path / "out")
        report = get(server, tmp_path / "out")  # expected_md5=None: --skip-checksum
    assert "verified" not in caplog.text and "(its MD5 unchecked); skipping it" in caplog.text
    assert report["files"][NAME]["checksum"] == "skipped" and "verified" not in json.dumps(report)


def test_a_report_or_lock_path_that_is_a_folder_is_one_line_before_any_request(site, tmp_path):
    for name in (REPORT_FILE, LOCK_FILE):
        out = tmp_path / name.strip(".")
        (out / name).mkdir(parents=True)
        with ArchiveServer(site) as server, pytest.raises(DownloadError, match=f"{out / name}.*move"):
            get(server, out)
        assert server.requests == [] and not (out / NAME).exists()


def test_the_low_speed_limit_comes_from_the_config(site, tmp_path):
    from pipeline.core.config import Config
    from pipeline.prep.download import fetch

    cfg = Config()
    with ArchiveServer(site, rate_bps=10) as server:  # 1 byte each 0.1 s
        cfg.download.url, cfg.prep.archive_dir, cfg.prep.skip_checksum = [server.url(NAME)], str(tmp_path), True
        cfg.download.download_retries, cfg.download.download_min_speed_bps = 0, 100
        cfg.download.download_speed_time_s = 1
        with pytest.raises(DownloadError, match="slower than 100 bytes/s for 1 s"):
            fetch(cfg)
