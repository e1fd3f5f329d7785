"""The built-in host: a small HTTP server that serves each published file at an unguessable path.

Only files registered by `publish` are reachable, only until `unpublish`; there is no listing and no
path is ever mapped onto the file system. Files are streamed in chunks, never read whole, and opened
without following links: a published path swapped for a symbolic link is not served.

Hardened for a station that exposes it directly: optional TLS, only GET and HEAD for files (POST
only for webhook tokens), single byte ranges (a fetcher may resume), and a client that keeps asking
for unknown paths (someone guessing) gets 429 for unknown paths for a while, logged once; published
files and open webhook tokens are still served to every client.

A flood must not starve the daemon: at most `max_connections` connections are served at once, each
on its own thread; one more is turned away on the accepting thread (a 503, or for TLS just a close)
without a thread of its own. A connection has `header_timeout` seconds in all to deliver its request
head (TLS handshake, request line, headers), however slowly it trickles, so idle or dribbling
clients give their slots back quickly; after that, each read or write has the ordinary 30 s. Those
guards live in daemon.hosting.limits.

Webhook tokens are random and independent of the file keys: a webhook URL, which travels in a
request header and may end up in the provider's logs, never tells anyone where the scan is.
"""

from __future__ import annotations

import http.server
import io
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import structlog

from ..config import BuiltinHostConfig, parse_listen
from .base import KEY_BYTES, HostingAdapter, HostingError, check_regular_file, key_for_logs, open_regular_file
from .limits import (HEADER_TIMEOUT, IO_TIMEOUT, MAX_CONNECTIONS, MISS_WINDOW, CappedServer, CappedServer6,
                     DeadlineReader, MissLimiter)

log = structlog.get_logger("daemon.hosting.builtin")

_KEY_PATH = re.compile(r"^/([A-Za-z0-9_-]{20,}\.[A-Za-z0-9]{1,5})$")
_HOOK_PATH = re.compile(r"^/hook/([A-Za-z0-9_-]{20,})$")
MAX_HOOK_BODY = 64 * 1024
CHUNK = 256 * 1024


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The inclusive byte range one `Range` header asks for, 'unsatisfiable', or None for the whole file.

    Only a single `bytes=` range is honoured (`a-b`, `a-`, `-n`); anything else (several ranges,
    other units, nonsense) is ignored and the whole file is served, as RFC 9110 allows.
    """
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last n bytes
        length = int(last)
        if length == 0:
            return "unsatisfiable"
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None  # an invalid range is ignored, not refused
    if start >= size:
        return "unsatisfiable"
    return start, end


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "codeformer-daemon"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms stall
    sys_version = ""
    timeout = IO_TIMEOUT  # once the request is in: a read or write stalled this long ends the connection
    host: "BuiltinHost"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader, replaced by one with a deadline for the request head
        self._reader = DeadlineReader(self.connection, time.monotonic() + self.host.header_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def parse_request(self) -> bool:
        """The stdlib's parsing (it reads the headers, still under the head's deadline); then the
        ordinary timeout for whatever follows (a webhook's body, the answer)."""
        parsed = super().parse_request()
        self._reader.deadline = time.monotonic() + self.timeout
        self.connection.settimeout(self.timeout)
        return parsed

    def do_GET(self) -> None:
        self._serve(with_body=True)

    def do_HEAD(self) -> None:
        self._serve(with_body=False)

    def _method_not_allowed(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_PROPFIND = do_MKCOL = do_TRACE = _method_not_allowed

    def do_POST(self) -> None:
        """The provider's completion webhook: only known tokens, body read and ignored."""
        match = _HOOK_PATH.match(self.path)
        on_call = self.host._callback(match.group(1)) if match else None
        length = self.headers.get("Content-Length", "0")
        if on_call is None or not length.isdigit() or int(length) > MAX_HOOK_BODY:
            self._unknown()
            return
        self.rfile.read(int(length))
        on_call()  # only queues a poll: cheap, and done before the provider hears back
        self.send_response(204)
        self.end_headers()

    def _serve(self, with_body: bool) -> None:
        match = _KEY_PATH.match(self.path)
        entry = self.host._lookup(match.group(1)) if match else None
        if entry is None:
            self._unknown()
            return
        path, content_type = entry
        f = open_regular_file(path)
        if f is None:
            self._not_found()
            return
        with f:
            size = f.seek(0, 2)
            wanted = parse_range(self.headers.get("Range"), size)
            if wanted == "unsatisfiable":
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = wanted if wanted is not None else (0, size - 1)
            length = max(0, end - start + 1)
            self.send_response(200 if wanted is None else 206)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(length))
            if wanted is not None:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if with_body:
                f.seek(start)
                try:
                    _copy_exactly(f, self.wfile, length)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
                    return
        log.debug("hosting.served", key=key_for_logs(match.group(1)), bytes=length if with_body else 0)

    def _unknown(self) -> None:
        """Not a published key or open token: 404, or 429 for a client over its limit of misses.

        Known keys and tokens are always answered, whoever asks: behind a reverse proxy every
        client (the provider too) shares one address, and guessers must not lock the provider out.
        """
        if self.host._limiter.refused(self.client_address[0], time.monotonic()):
            self._refuse()
        else:
            self._not_found()

    def _refuse(self) -> None:
        self.send_response(429)
        self.send_header("Retry-After", str(int(MISS_WINDOW)))
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _not_found(self) -> None:
        client = self.client_address[0]
        if self.host._limiter.miss(client, time.monotonic()):
            log.warning("hosting.rate_limited", client=client, misses=self.host._limiter.limit,
                        window_seconds=int(MISS_WINDOW),
                        detail="many requests for unknown paths (someone guessing?); refused until the window ends")
        body = b"not found\n"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silenced: the default writes the request path, which is the capability, to stderr."""


def _copy_exactly(source: BinaryIO, target: BinaryIO, length: int) -> None:
    while length > 0:
        chunk = source.read(min(CHUNK, length))
        if not chunk:
            return  # the file shrank under us: the client sees a short body and retries
        target.write(chunk)
        length -= len(chunk)


class BuiltinHost(HostingAdapter):
    """Serves published files from memory-held registrations; nothing survives a restart by design."""

    name = "builtin"
    serves_across_restarts = False

    def __init__(self, listen: str, public_url: str | None = None, *, tls_cert: Path | None = None,
                 tls_key: Path | None = None, max_misses_per_minute: int = 30,
                 max_connections: int = MAX_CONNECTIONS, header_timeout: float = HEADER_TIMEOUT) -> None:
        self.listen = listen
        self._public_url = public_url.rstrip("/") if public_url else None
        self._tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self._limiter = MissLimiter(max_misses_per_minute)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._files: dict[str, tuple[Path, str]] = {}
        self._hook_tokens: dict[str, str] = {}  # file key -> its webhook token
        self._callbacks: dict[str, Callable[[], None]] = {}  # webhook token -> what a call does
        self._lock = threading.Lock()
        self._server: CappedServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: BuiltinHostConfig) -> "BuiltinHost":
        return cls(config.listen, config.public_url, tls_cert=config.tls_cert, tls_key=config.tls_key,
                   max_misses_per_minute=config.max_misses_per_minute, max_connections=config.max_connections)

    @property
    def public_url(self) -> str:
        if self._public_url:
            return self._public_url
        if self._server is None:
            raise HostingError("the built-in host is not started")
        host, port = self._server.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self._tls else 'http'}://{host}:{port}"

    def start(self) -> None:
        if self._server is not None:
            return
        host, port = parse_listen(self.listen)
        server_class = CappedServer6 if ":" in host else CappedServer
        handler = type("Handler", (_Handler,), {"host": self})
        try:
            self._server = server_class((host, port), handler, self.max_connections)
        except OSError as exc:
            raise HostingError(f"hosting.builtin.listen: cannot listen on {self.listen}: {exc.strerror}") from None
        if self._tls:
            self._server.socket = self._tls_context().wrap_socket(
                self._server.socket, server_side=True,
                do_handshake_on_connect=False)  # handshakes happen on each request's own thread
        self._thread = threading.Thread(target=self._server.serve_forever, name="builtin-host", daemon=True)
        self._thread.start()
        log.info("hosting.started", adapter=self.name, listen=self.listen, public_url=self.public_url)

    def _tls_context(self) -> ssl.SSLContext:
        cert, key = self._tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            self._server.server_close()
            self._server = None
            raise HostingError(f"hosting.builtin.tls_cert: cannot load {cert} with its key {key}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        return context

    def publish(self, key: str, path: Path, content_type: str) -> str:
        check_regular_file(path)
        with self._lock:
            self._files[key] = (Path(path), content_type)
        return f"{self.public_url}/{key}"

    def unpublish(self, key: str) -> None:
        """Also closes the key's webhook: once its file is gone the job is over, and so is its use."""
        with self._lock:
            self._files.pop(key, None)
            self._forget_callback(key)

    def sweep(self, keep: set[str]) -> int:
        with self._lock:
            orphans = [k for k in self._files if k not in keep]
            for key in orphans:
                del self._files[key]
            for key in [k for k in self._hook_tokens if k not in keep]:
                self._forget_callback(key)
        return len(orphans)

    def open_callback(self, key: str, on_call: Callable[[], None]) -> str | None:
        """A webhook at a token of its own, drawn afresh for each key: nothing in it leads to the file."""
        base = self.public_url
        with self._lock:
            token = self._hook_tokens.setdefault(key, secrets.token_urlsafe(KEY_BYTES))
            self._callbacks[token] = on_call
        return f"{base}/hook/{token}"

    def close_callback(self, key: str) -> None:
        with self._lock:
            self._forget_callback(key)

    def _forget_callback(self, key: str) -> None:
        """Drop `key`'s webhook token and what it called; the caller holds the lock."""
        token = self._hook_tokens.pop(key, None)
        if token is not None:
            self._callbacks.pop(token, None)

    def _callback(self, token: str) -> Callable[[], None] | None:
        with self._lock:
            return self._callbacks.get(token)

    def published_count(self) -> int:
        with self._lock:
            return len(self._files)

    def _lookup(self, key: str) -> tuple[Path, str] | None:
        with self._lock:
            return self._files.get(key)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
