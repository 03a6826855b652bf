"""What a download sends to which host: the request, its credentials, and the redirects it follows.

A link's user part becomes a Basic ``Authorization`` header and ``--header`` values are sent with it, to the
link's own host. A redirect to another scheme, host or port gets neither (nor ``Cookie`` or
``Proxy-Authorization``), as curl and requests do; the cookie file's cookies go only to the domains they name
(http.cookiejar's rules). A redirect to anything but http:// or https:// (ftp://, file://) is refused.
"""
from __future__ import annotations

import base64
import http.client
import socket
import threading
import urllib.request
from typing import Any, Iterable
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from pipeline.core.redact import redact_url
from pipeline.prep.archives import PrepError
from pipeline.prep.links import load_cookies

USER_AGENT = "imagenet-hpc-pipeline (python urllib)"
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")  # dropped on a redirect to another origin
DEFAULT_PORTS = {"http": 80, "https": 443}


class RedirectRefused(PrepError):
    """A redirect to a scheme other than http(s); the message shows both links redacted."""


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a link, the default port filled in: what decides where credentials may go."""
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(parts.scheme.lower())


class CredentialRedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, minus the credentials on a change of origin and anything but http(s) targets.
    ``private``: the names of the user's own headers (--header), dropped with the credentials."""

    def __init__(self, private: Iterable[str] = ()):
        self.private = {name.lower() for name in private} | set(CREDENTIAL_HEADERS)

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any) -> Any:
        target = (headers.get("location") or headers.get("uri") or "").strip()
        if target:  # urllib would follow ftp:// and quote the whole link in its refusal of file://
            try:
                scheme = urlsplit(urljoin(req.full_url, target)).scheme.lower()
                origin(urljoin(req.full_url, target))
            except ValueError:
                scheme = "malformed"
            if scheme not in ("http", "https"):
                raise RedirectRefused(f"{redact_url(req.full_url)} redirects (HTTP {code}) to {redact_url(target)} "
                                      f"(scheme {scheme or 'none'}): only http:// and https:// redirects are followed; "
                                      "ask for a direct link")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and origin(newurl) != origin(req.full_url):
            for name in [n for n in new.headers if n.lower() in self.private]:
                del new.headers[name]
        return new


class HeaderDeadline:
    """A connection that is shut when the answer's status line and headers take longer than ``header_deadline_s``
    in all: the socket timeout bounds each read only, so a server trickling its headers one byte at a time would
    hold the download for days (http.client takes 100 header lines of 64 KiB). The download retries it."""

    def __init__(self, *args: Any, header_deadline_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_deadline_s = header_deadline_s

    def getresponse(self) -> http.client.HTTPResponse:
        timer = threading.Timer(self.header_deadline_s, self.give_up)
        timer.start()
        try:
            return super().getresponse()
        finally:
            timer.cancel()

    def give_up(self) -> None:
        if self.sock is not None:
            self.sock.shutdown(socket.SHUT_RDWR)  # the read waiting for the headers ends at once


class DeadlineHTTP(HeaderDeadline, http.client.HTTPConnection):
    pass


class DeadlineHTTPS(HeaderDeadline, http.client.HTTPSConnection):
    pass


class DeadlineHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's http and https handlers with HeaderDeadline connections."""

    def __init__(self, header_deadline_s: float):
        urllib.request.HTTPHandler.__init__(self)
        urllib.request.HTTPSHandler.__init__(self)
        self.header_deadline_s = header_deadline_s

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(DeadlineHTTP, req, header_deadline_s=self.header_deadline_s)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(DeadlineHTTPS, req, context=self._context, header_deadline_s=self.header_deadline_s)


def build_opener(cookie_file: str = "", private: Iterable[str] = (),
                 header_deadline_s: float = 60.0) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies from the environment, redirects that keep credentials on their host) with the
    cookie file's cookies; ``private``: the --header names, sent only to the link's own origin; an answer whose
    headers take longer than ``header_deadline_s`` in all is given up (and retried)."""
    jar = load_cookies(cookie_file)
    handlers = [CredentialRedirectHandler(private), DeadlineHandler(header_deadline_s)]
    return urllib.request.build_opener(*handlers, *([urllib.request.HTTPCookieProcessor(jar)] if jar else []))


def make_request(url: str, headers: dict[str, str], offset: int, end: int | None = None,
                 ranged: bool = False, if_range: str | None = None) -> urllib.request.Request:
    """A GET of ``url`` from byte ``offset`` up to byte ``end`` (excluded; None: the end of the file), a Range request
    unless it is the whole file (or ``ranged``: ``bytes=0-`` too, to learn whether the server takes them), with
    ``If-Range: if_range`` (the first answer's ETag or date: the server then sends the whole file if it changed);
    a user part in the link becomes a Basic Authorization header, as wget and curl do."""
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
        if if_range and (offset or end is not None):
            sent["If-Range"] = if_range
    return urllib.request.Request(url, headers=sent)
