"""Download links: the file each one names, what may be shown of it, and the request it makes.

A user's personal links carry a token: in the query (``?token=...``), in the user part
(``https://user:pass@host/...``) or as a path segment (image-net.org's links once had one), so a link is
only ever shown as ``scheme://host/.../name`` with ``?...`` for a query: logs, errors, reports and saved configs
never hold one in full. Request headers (``Authorization: ...``) are shown by name only.
"""
from __future__ import annotations

import base64
import http.cookiejar
import re
import urllib.request
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from pipeline.core.config import ConfigError
from pipeline.prep.archives import PORTABLE_NAME

USER_AGENT = "imagenet-hpc-pipeline (python urllib)"
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)


def redact_url(url: str) -> str:
    """``url`` as it may be logged: scheme, host and file name; user part, middle path and query hidden."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable link>"
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
            text = Path(url_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"url file {url_file} (--url-file) does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read url file {url_file} (--url-file) as UTF-8 text: {exc}") from None
        links += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return links


def check_links(links: Sequence[str]) -> list[str]:
    """The file names of ``links``; a link that is not http(s), has no host or file name, or repeats a file
    name is a ConfigError."""
    names: dict[str, str] = {}
    for url in links:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"link {redact_url(url)} is not an http:// or https:// link with a host")
        name = link_name(url)
        if name in names:
            raise ConfigError(f"two links download to {name}: {names[name]} and {redact_url(url)}; keep one")
        names[name] = redact_url(url)
    return list(names)


def parse_headers(headers: Sequence[str]) -> dict[str, str]:
    """``Name: value`` strings as a dict; a malformed one is a ConfigError that does not show its value."""
    parsed = {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not HEADER_NAME.fullmatch(name.strip()):
            raise ConfigError(f"--header {redact_header(header)!r}: expected 'Name: value', e.g. "
                              "'Authorization: Bearer TOKEN'")
        parsed[name.strip()] = value.strip()
    return parsed


def load_cookies(cookie_file: str) -> http.cookiejar.CookieJar | None:
    """A browser's cookies.txt export (Netscape format), or None without one."""
    if not cookie_file:
        return None
    jar = http.cookiejar.MozillaCookieJar(cookie_file)
    try:
        jar.load(ignore_discard=True, ignore_expires=True)
    except (OSError, http.cookiejar.LoadError) as exc:
        raise ConfigError(f"cannot read cookie file {cookie_file} (--cookie-file) as a Netscape cookies.txt: "
                          f"{exc}") from None
    for cookie in jar:
        if cookie.expires == 0:  # browsers export session cookies with expiry 0; urllib would take them as expired
            cookie.expires, cookie.discard = None, True
    return jar


def build_opener(cookie_file: str = "") -> urllib.request.OpenerDirector:
    """urllib's opener (proxies from the environment, redirects) with the cookie file's cookies."""
    jar = load_cookies(cookie_file)
    return urllib.request.build_opener(*([urllib.request.HTTPCookieProcessor(jar)] if jar is not None else []))


def make_request(url: str, headers: dict[str, str], offset: int, end: int | None = None,
                 ranged: bool = False) -> urllib.request.Request:
    """A GET of ``url`` from byte ``offset`` up to byte ``end`` (excluded; None: the end of the file), a Range request
    unless it is the whole file (or ``ranged``: ``bytes=0-`` too, to learn whether the server takes them); a user
    part in the link becomes a Basic Authorization header, as wget and curl do."""
    parts = urlsplit(url)
    sent = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if parts.username is not None:
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        sent["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
        netloc = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=netloc))
    sent.update(headers)
    if offset or end is not None or ranged:
        sent["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
    return urllib.request.Request(url, headers=sent)
