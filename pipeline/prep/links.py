"""Download links: the file each one names, the links, headers and cookies a download may use.

A link is only ever shown redacted (pipeline.core.redact): logs, errors, reports and saved configs never hold one
in full. A link http.client would refuse (a space, a control or non-ASCII character, a malformed host) is refused here first: http.client's own error
quotes the whole link.
"""
from __future__ import annotations

import http.cookiejar
import re
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlsplit

from pipeline.core.config import ConfigError
from pipeline.core.redact import redact_header, redact_url
from pipeline.prep.archives import PORTABLE_NAME

HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")  # printable ASCII and tabs: http.client sends nothing else as is
NOT_IN_URL = re.compile(r"[^\x21-\x7e]")  # a space, a control or a non-ASCII character: http.client refuses them
PART_SUFFIX = ".part"  # an unfinished file is <name>.part; its records are <name>.part.<what>
REPORT_FILE = "download_report.json"  # with LOCK_FILE, what the download stage keeps in the archive dir for itself
LOCK_FILE = ".download.lock"


def link_name(url: str) -> str:
    """The file a link downloads to: its last path segment, which must be a plain portable file name."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not PORTABLE_NAME.fullmatch(name):
        raise ConfigError(f"link {redact_url(url)} does not end with a plain file name (letters, digits, '.', '_', "
                          "'-'), such as .../ILSVRC2012_img_val.tar; the file is saved under that name")
    return name


def read_links(urls: Sequence[str], url_file: str = "") -> list[str]:
    """The --url links, then those of --url-file (one per line; blank lines and # comments skipped)."""
    links = list(urls)
    if url_file:
        try:
            text = Path(url_file).read_text(encoding="utf-8-sig")  # Windows editors start the file with a BOM
        except FileNotFoundError:
            raise ConfigError(f"url file {url_file} (--url-file) does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read url file {url_file} (--url-file) as UTF-8 text: {exc}") from None
        links += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return links


def check_url(url: str) -> None:
    """A ConfigError, showing the link redacted, for what http.client would refuse or misread: a space, a control or
    non-ASCII character, a malformed host or port (``http://[::1/x``), a host IDNA cannot encode."""
    bad = NOT_IN_URL.search(url)
    if bad:
        char = bad.group()
        what = "a space" if char == " " else "a control character" if char < " " or char == "\x7f" else \
            "a non-ASCII character"
        raise ConfigError(f"link {redact_url(url)} holds {what} (character {bad.start() + 1} of the link); "
                          "percent-encode it (a space is %20; a non-ASCII host goes in its xn-- form) as the "
                          "browser's copy of the link does")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"link {redact_url(url)} has a malformed host or port (a port is a number in 1..65535; an "
                          "IPv6 address goes in brackets: http://[::1]:8080/...)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"link {redact_url(url)} is not an http:// or https:// link with a host")


def check_links(links: Sequence[str]) -> list[str]:
    """The file names of ``links``; a link http.client would refuse (check_url), that has no file name, repeats a
    file name, or would write over another's part file or the stage's own files is a ConfigError."""
    names: dict[str, str] = {}
    for url in links:
        check_url(url)
        name = link_name(url)
        if name in names:
            raise ConfigError(f"two links download to {name}: {names[name]} and {redact_url(url)}; keep one")
        if name in (REPORT_FILE, LOCK_FILE):
            raise ConfigError(f"link {redact_url(url)} would download to {name}, which the download stage keeps in "
                              "the archive dir for itself; rename the file on the server or drop the link")
        names[name] = redact_url(url)
    for name in names:
        clash = next((other for other in names if other.startswith(name + PART_SUFFIX)), None)
        if clash:
            raise ConfigError(f"links {names[name]} and {names[clash]} collide: {name} is written to "
                              f"{name}{PART_SUFFIX} until it is complete; download them into separate archive dirs")
    return list(names)


def parse_headers(headers: Sequence[str]) -> dict[str, str]:
    """``Name: value`` strings as a dict; a malformed one is a ConfigError that does not show its value."""
    parsed = {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not HEADER_NAME.fullmatch(name.strip()):
            raise ConfigError(f"--header {redact_header(header)!r}: expected 'Name: value', e.g. "
                              "'Authorization: Bearer TOKEN'")
        if not HEADER_VALUE.fullmatch(value):
            raise ConfigError(f"--header {redact_header(header)!r}: its value holds a non-ASCII or control character, "
                              "which HTTP headers cannot carry as they are; copy the value again (it is not shown)")
        parsed[name.strip()] = value.strip()
    return parsed


def load_cookies(cookie_file: str) -> http.cookiejar.CookieJar | None:
    """A browser's cookies.txt export (Netscape format), or None without one. A malformed line is named by its
    number, never shown: it may hold a session cookie."""
    if not cookie_file:
        return None
    jar = http.cookiejar.MozillaCookieJar(cookie_file)
    try:
        check_cookie_lines(Path(cookie_file).read_text(encoding="utf-8", errors="replace"), cookie_file)
        jar.load(ignore_discard=True, ignore_expires=True)
    except (OSError, http.cookiejar.LoadError) as exc:  # LoadError quotes the line: not shown
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "its first line must be '# Netscape " \
            "HTTP Cookie File'"
        raise ConfigError(f"cannot read cookie file {cookie_file} (--cookie-file) as a Netscape cookies.txt: "
                          f"{why}") from None
    for cookie in jar:
        if cookie.expires == 0:  # browsers export session cookies with expiry 0; urllib would take them as expired
            cookie.expires, cookie.discard = None, True
    return jar


def check_cookie_lines(text: str, cookie_file: str) -> None:
    """Each cookie line as http.cookiejar reads it: 7 tab-separated fields, the domain flag TRUE exactly when the
    domain starts with a dot, the expiry a number or empty, printable ASCII only (a Cookie header carries nothing
    else); a ConfigError names the first bad line by number."""
    for number, line in enumerate(text.splitlines(), 1):
        line = line.removeprefix("#HttpOnly_")
        if not line.strip() or line.lstrip().startswith(("#", "$")):
            continue
        fields = line.split("\t")
        if len(fields) != 7 or (fields[1] == "TRUE") != fields[0].startswith(".") or \
                not (fields[4].isdigit() or fields[4] == "") or not HEADER_VALUE.fullmatch(line):
            raise ConfigError(f"cookie file {cookie_file} (--cookie-file) line {number} is not a Netscape cookies.txt "
                              "line (7 tab-separated fields: domain, TRUE if it starts with a dot, path, secure, "
                              "expiry, name, value, in printable ASCII; the line is not shown); export the cookies "
                              "again")
