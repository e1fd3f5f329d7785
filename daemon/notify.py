"""sd_notify spoken directly: tell systemd the daemon is ready, reloading, stopping, busy with what, and alive.

The protocol (sd_notify(3)) is one datagram per message on the unix socket named by $NOTIFY_SOCKET
(a path, or an abstract name written with a leading "@"), holding newline-separated KEY=VALUE
lines. Without $NOTIFY_SOCKET (not under systemd, or not Type=notify) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("daemon.notify")

SEND_TIMEOUT = 1.0
"""Seconds a send may wait for room in the socket's queue: a full queue must not stall the loop."""


def socket_address(value: str | None) -> str | bytes | None:
    """The address to send to for a $NOTIFY_SOCKET value; None when there is nothing to talk to.

    "@name" is an abstract socket (a leading NUL byte on the wire); other kinds systemd may set
    (vsock:, for virtual machines) are not spoken here, and are treated as absent.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when no watchdog is asked
    of this process: unset, unparseable, or meant for another process ($WATCHDOG_PID)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 2_000_000


class Notifier:
    """Sends sd_notify messages; thread-safe, never raises, and a no-op outside systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.address = socket_address(environ.get("NOTIFY_SOCKET"))
        self.watchdog_interval = watchdog_interval(environ, os.getpid()) if self.address else None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._last_status: str | None = None
        self._failed_once = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one message of KEY=VALUE lines; False if there is no socket or the send failed."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode("utf-8", errors="replace")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._socket.settimeout(SEND_TIMEOUT)
                self._socket.sendto(message, self.address)
                return True
            except OSError as exc:
                if not self._failed_once:  # one warning, not one per watchdog ping
                    self._failed_once = True
                    log.warning("notify.failed", error=f"{type(exc).__name__}: {exc}",
                                detail="systemd may not see this daemon's readiness or watchdog pings")
                return False

    def ready(self) -> bool:
        return self.send("READY=1")

    def reloading(self) -> bool:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp systemd >= 253 wants for Type=notify-reload."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping: letting the calls in flight finish")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """STATUS=<text> for `systemctl status`; sent only when the text changed."""
        text = " ".join(text.split())  # one line
        if text == self._last_status:
            return False
        self._last_status = text
        return self.send(f"STATUS={text}")

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


class Watchdog:
    """Pings WATCHDOG=1 every `interval` seconds, but only while `alive()` says the loop is turning.

    It runs on a thread of its own, so a loop stuck in a step cannot ping for itself: the pings
    stop, and systemd restarts the daemon once WatchdogSec passes without one.
    """

    def __init__(self, notifier: Notifier, interval: float, alive: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.interval = interval
        self.alive = alive
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.interval + 1.0)

    def _run(self) -> None:
        while True:
            if self.alive():
                self.notifier.watchdog()
            if self._stop.wait(self.interval):
                return
