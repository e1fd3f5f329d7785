"""The little of HTTP the dashboard needs on top of WSGI: a parsed request and a response.

Kept small on purpose (the dashboard has a dozen routes): query and form parsing from the
standard library, cookies from `http.cookies`, and every response carrying the same security
headers.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

MAX_FORM_BYTES = 16 * 1024
"""A dashboard form holds a token and a few ids: anything larger is refused unread."""

SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                                "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
]

REASONS = {200: "OK", 303: "See Other", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 413: "Content Too Large",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


class Request:
    """One WSGI request: method, path, query, cookies, headers, and the form of a POST (read once)."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET").upper()
        raw_path = environ.get("PATH_INFO", "/") or "/"
        # PEP 3333 hands the path over as latin-1 decoded bytes; names in it are UTF-8.
        self.path = raw_path.encode("latin-1", "replace").decode("utf-8", "replace")
        self.query = {k: v[0] for k, v in urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).items()}
        self.cookies = parse_cookies(environ.get("HTTP_COOKIE", ""))
        self.client = environ.get("REMOTE_ADDR", "") or "unknown"
        self.secure = environ.get("wsgi.url_scheme") == "https"
        self._form: dict[str, str] | None = None

    def header(self, name: str) -> str | None:
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"))

    def form(self) -> dict[str, str]:
        """The url-encoded body of a POST; an empty form if it is missing, too large or of another type."""
        if self._form is None:
            self._form = {}
            try:
                length = int(self.environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            kind = (self.environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
            if 0 < length <= MAX_FORM_BYTES and kind == "application/x-www-form-urlencoded":
                body = self.environ["wsgi.input"].read(length).decode("utf-8", "replace")
                self._form = {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}
        return self._form


def parse_cookies(header: str) -> dict[str, str]:
    """Name-value pairs of a Cookie header, leniently: browsers share cookies across every port of
    localhost, and `http.cookies` gives up on a whole header for one value it dislikes (another app's
    JSON, a space), which would sign the person out. The first of a repeated name wins."""
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    cache: str = "no-store"

    def set_cookie(self, name: str, value: str, *, secure: bool, max_age: int | None = None) -> None:
        parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if secure:
            parts.append("Secure")
        self.headers.append(("Set-Cookie", "; ".join(parts)))

    def wsgi(self, start_response, *, head: bool = False) -> list[bytes]:
        """Start the answer; a HEAD gets the headers of a GET and no body (the server does not strip it)."""
        headers = [("Content-Type", self.content_type), ("Content-Length", str(len(self.body))),
                   ("Cache-Control", self.cache), *SECURITY_HEADERS, *self.headers]
        start_response(f"{self.status} {REASONS.get(self.status, 'Unknown')}", headers)
        return [] if head else [self.body]


def redirect(location: str) -> Response:
    """A 303 to a path of this dashboard (never a URL given by the request: no open redirect)."""
    if not location.startswith("/") or location.startswith("//"):
        location = "/"
    return Response(303, b"", "text/plain; charset=utf-8", [("Location", location)])


def text(status: int, message: str) -> Response:
    return Response(status, message.encode("utf-8"), "text/plain; charset=utf-8")
