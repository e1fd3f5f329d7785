"""The built-in host: a small HTTP server that serves each published file at an unguessable path.

Only files registered by `publish` are reachable, only until `unpublish`; there is no listing and no
path is ever mapped onto the file system. Files are streamed in chunks, never read whole, and opened
without following links: a published path swapped for a symbolic link is not served.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import structlog

from ..config import parse_listen
from .base import HostingAdapter, HostingError, key_for_logs

log = structlog.get_logger("daemon.hosting.builtin")

_KEY_PATH = re.compile(r"^/([A-Za-z0-9_-]{20,}\.[A-Za-z0-9]{1,5})$")
_HOOK_PATH = re.compile(r"^/hook/([A-Za-z0-9_-]{20,})$")
MAX_HOOK_BODY = 64 * 1024
CHUNK = 256 * 1024


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # the stdlib's 5 drops connections when a provider fetches in bursts


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "codeformer-daemon"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms stall
    sys_version = ""
    host: "BuiltinHost"

    def do_GET(self) -> None:
        self._serve(with_body=True)

    def do_HEAD(self) -> None:
        self._serve(with_body=False)

    def do_POST(self) -> None:
        """The provider's completion webhook: only known tokens, body read and ignored."""
        match = _HOOK_PATH.match(self.path)
        on_call = self.host._callbacks.get(match.group(1)) if match else None
        length = self.headers.get("Content-Length", "0")
        if on_call is None or not length.isdigit() or int(length) > MAX_HOOK_BODY:
            self._not_found()
            return
        self.rfile.read(int(length))
        on_call()  # only queues a poll: cheap, and done before the provider hears back
        self.send_response(204)
        self.end_headers()

    def _serve(self, with_body: bool) -> None:
        match = _KEY_PATH.match(self.path)
        entry = self.host._lookup(match.group(1)) if match else None
        if entry is None:
            self._not_found()
            return
        path, content_type = entry
        f = _open_regular_file(path)
        if f is None:
            self._not_found()
            return
        with f:
            size = f.seek(0, 2)
            f.seek(0)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if with_body:
                try:
                    shutil.copyfileobj(f, self.wfile, CHUNK)
                except (BrokenPipeError, ConnectionResetError):
                    return
        log.debug("hosting.served", key=key_for_logs(match.group(1)), bytes=size if with_body else 0)

    def _not_found(self) -> None:
        body = b"not found\n"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silenced: the default writes the request path, which is the capability, to stderr."""


def _open_regular_file(path: Path) -> BinaryIO | None:
    """The published file itself, or None if it is gone or is now a link, folder or device."""
    try:
        # O_NONBLOCK: a FIFO swapped in cannot hang the server; it changes nothing for regular files.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


class BuiltinHost(HostingAdapter):
    """Serves published files from memory-held registrations; nothing survives a restart by design."""

    name = "builtin"

    def __init__(self, listen: str, public_url: str | None = None) -> None:
        self.listen = listen
        self._public_url = public_url.rstrip("/") if public_url else None
        self._files: dict[str, tuple[Path, str]] = {}
        self._callbacks: dict[str, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def public_url(self) -> str:
        if self._public_url:
            return self._public_url
        if self._server is None:
            raise HostingError("the built-in host is not started")
        host, port = self._server.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def start(self) -> None:
        if self._server is not None:
            return
        host, port = parse_listen(self.listen)
        server_class = _Server6 if ":" in host else _Server
        handler = type("Handler", (_Handler,), {"host": self})
        try:
            self._server = server_class((host, port), handler)
        except OSError as exc:
            raise HostingError(f"hosting.builtin.listen: cannot listen on {self.listen}: {exc.strerror}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="builtin-host", daemon=True)
        self._thread.start()
        log.info("hosting.started", adapter=self.name, listen=self.listen, public_url=self.public_url)

    def publish(self, key: str, path: Path, content_type: str) -> str:
        if Path(path).is_symlink() or not Path(path).is_file():
            raise HostingError(f"cannot publish {path}: not a regular file (links are never published)")
        with self._lock:
            self._files[key] = (Path(path), content_type)
        return f"{self.public_url}/{key}"

    def unpublish(self, key: str) -> None:
        with self._lock:
            self._files.pop(key, None)

    def sweep(self, keep: set[str]) -> int:
        with self._lock:
            orphans = [k for k in self._files if k not in keep]
            for key in orphans:
                del self._files[key]
        return len(orphans)

    def open_callback(self, token: str, on_call: Callable[[], None]) -> str | None:
        self._callbacks[token] = on_call
        return f"{self.public_url}/hook/{token}"

    def close_callback(self, token: str) -> None:
        self._callbacks.pop(token, None)

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
