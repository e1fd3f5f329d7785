"""What keeps the built-in host standing when it is exposed to the internet.

A flood must not starve the daemon: at most `max_connections` connections are served at once, each
on its own thread; one more is turned away on the accepting thread (a 503, or for TLS just a close)
without a thread of its own. A connection has a deadline for its whole request head, however slowly
it trickles, so idle or dribbling clients give their slots back quickly. A client that keeps asking
for unknown paths (someone guessing) is counted, and refused for a while.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import selectors
import socket
import ssl
import threading
import time

import structlog

log = structlog.get_logger("daemon.hosting.builtin")

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


class CappedServer(http.server.ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` of them; the rest are turned away at once.

    The accepting thread sleeps until a connection or a stop arrives: an idle host never wakes.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # the stdlib's 5 drops connections when a provider fetches in bursts

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._turned_away = 0
        self._last_busy_log = -MISS_WINDOW
        self._stop_requested = False
        self._stopped = threading.Event()
        # Made before the socket is bound: a bind that fails calls server_close() from the stdlib's
        # constructor, which closes these too.
        self._wake_reader, self._wake_writer = socket.socketpair()  # shutdown() writes a byte to wake the loop
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        super().__init__(address, handler)

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Serve until `shutdown()`, asleep in between: only a connection or the stop itself wakes the loop.

        The stdlib's loop looks for a stop request every `poll_interval` (at 0.2 s, five wake-ups a
        second all day on an idle station); here `shutdown()` wakes it through a socket pair, so a stop
        is as prompt as before. `poll_interval` is accepted for the stdlib's signature and ignored.
        """
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_reader, selectors.EVENT_READ)
                while not self._stop_requested:
                    ready = selector.select()
                    if self._stop_requested:
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            self._stop_requested = False
            with contextlib.suppress(OSError):  # the wake byte, so a later serve_forever does not spin
                while self._wake_reader.recv(64):
                    pass
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait until it has returned; called from another thread, as the stdlib's."""
        self._stop_requested = True
        with contextlib.suppress(OSError):  # a byte already waiting wakes the loop just as well
            self._wake_writer.send(b"\0")
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

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


class CappedServer6(CappedServer):
    address_family = socket.AF_INET6


class DeadlineReader(io.RawIOBase):
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
