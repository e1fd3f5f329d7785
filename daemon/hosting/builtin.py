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
clients give their slots back quickly; after that, each read or write has the ordinary 30 s.

Webhook tokens are random and independent of the file keys: a webhook URL, which travels in a
request header and may end up in the provider's logs, never tells anyone where the scan is.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import structlog

from ..config import BuiltinHostConfig, parse_listen
from .base import KEY_BYTES, HostingAdapter, HostingError, check_regular_file, key_for_logs, open_regular_file

log = structlog.get_logger("daemon.hosting.builtin")

_KEY_PATH = re.compile(r"^/([A-Za-z0-9_-]{20,}\.[A-Za-z0-9]{1,5})$")
_HOOK_PATH = re.compile(r"^/hook/([A-Za-z0-9_-]{20,})$")
MAX_HOOK_BODY = 64 * 1024
CHUNK = 256 * 1024
MISS_WINDOW = 60.0
"""Seconds over which a client's requests for unknown paths are counted."""
MAX_CONNECTIONS = 64
"""Connections served at once by default: far above what one provider fetches, far below a flood."""
HEADER_TIMEOUT = 10.0
"""Seconds a connection has in all to deliver its request head; a fetcher needs milliseconds."""
IO_TIMEOUT = 30
"""Seconds any one read or write may stall once the request is in (a slow link, a busy provider)."""
CONNECTION_THREAD = "builtin-host-connection"
"""The name of every thread that serves one connection."""
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n")


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


class MissLimiter:
    """Counts each client's requests for unknown paths; past the limit it is refused until the window ends.

    Pure bookkeeping over an injected clock, behind a lock: every connection's thread counts here,
    and a lost update could announce the limit twice or never. The provider never asks for an
    unknown path except just after a job ended, so a real fetcher stays far below any sensible limit.
    """

    def __init__(self, limit: int, window: float = MISS_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._clients: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def refused(self, client: str, now: float) -> bool:
        """True while `client` is over the limit in its current window."""
        with self._lock:
            started, misses = self._clients.get(client, (now, 0))
        return now - started < self.window and misses >= self.limit

    def miss(self, client: str, now: float) -> bool:
        """Record one miss; True exactly when this miss takes the client over the limit (log it once)."""
        with self._lock:
            started, misses = self._clients.get(client, (now, 0))
            if now - started >= self.window:
                started, misses = now, 0
            self._clients[client] = (started, misses + 1)
            if len(self._clients) > 10_000:  # forget finished windows so a scan of many addresses cannot grow this
                self._clients = {c: v for c, v in self._clients.items() if now - v[0] < self.window}
        return misses + 1 == self.limit


class _Server(http.server.ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` of them; the rest are turned away at once."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # the stdlib's 5 drops connections when a provider fetches in bursts

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._turned_away = 0
        self._last_busy_log = -MISS_WINDOW
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        """Runs on the accepting thread, so it never waits: a free slot gets a thread, else a refusal."""
        if not self._slots.acquire(blocking=False):
            self._turn_away(request)
            return
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name=CONNECTION_THREAD, daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (the unit's TasksMax, the machine's limit)
            self._slots.release()
            self._turn_away(request)

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _turn_away(self, request: socket.socket) -> None:
        """A 503 if it fits the socket's buffer right now (never for TLS: that needs a handshake), then close.

        Nothing here may wait: this is the accepting thread. What the client already sent is read
        off first, so the close is a FIN the client can read the 503 before, not a reset.
        """
        with contextlib.suppress(OSError):
            request.setblocking(False)
            if not isinstance(request, ssl.SSLSocket):
                request.send(BUSY)
                request.recv(65536)
        self.shutdown_request(request)
        self._turned_away += 1
        now = time.monotonic()
        if now - self._last_busy_log >= MISS_WINDOW:  # a flood is logged once a minute, not once a connection
            self._last_busy_log = now
            log.warning("hosting.busy", max_connections=self.max_connections, turned_away_total=self._turned_away,
                        detail="no connection slot free (a flood?); further connections are refused until one frees")


class _Server6(_Server):
    address_family = socket.AF_INET6


class _DeadlineReader(io.RawIOBase):
    """A connection's incoming bytes, with one deadline for a whole stretch of reading.

    A socket's own timeout starts again with every byte received, so a client that trickles its
    request a byte at a time would hold its slot for ever; a deadline bounds the request head.
    """

    def __init__(self, connection: socket.socket, deadline: float) -> None:
        super().__init__()
        self.connection = connection
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.connection.settimeout(left)
        return self.connection.recv_into(buffer)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "codeformer-daemon"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms stall
    sys_version = ""
    timeout = IO_TIMEOUT  # once the request is in: a read or write stalled this long ends the connection
    host: "BuiltinHost"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader, replaced by one with a deadline for the request head
        self._reader = _DeadlineReader(self.connection, time.monotonic() + self.host.header_timeout)
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
        self._server: _Server | None = None
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
        server_class = _Server6 if ":" in host else _Server
        handler = type("Handler", (_Handler,), {"host": self})
        try:
            self._server = server_class((host, port), handler, self.max_connections)
        except OSError as exc:
            raise HostingError(f"hosting.builtin.listen: cannot listen on {self.listen}: {exc.strerror}") from None
        if self._tls:
            self._server.socket = self._tls_context().wrap_socket(
                self._server.socket, server_side=True,
                do_handshake_on_connect=False)  # handshakes happen on each request's own thread
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="builtin-host", daemon=True)
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
