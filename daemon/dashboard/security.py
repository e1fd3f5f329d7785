"""Who may use the dashboard, and proof that an action came from its own pages.

Small parts, each with one job: `Sessions` (login cookies, kept in memory: a restart logs everyone
out, which is the safe way round), `LoginThrottle` (failed logins per client), `csrf_token` /
`csrf_ok` (a form's token is an HMAC of the browser's own CSRF cookie, so a page on another site can
neither read nor forge it), and the checks of a token and of a Host header.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable

SESSION_COOKIE = "cfd_session"
CSRF_COOKIE = "cfd_csrf"
SESSION_SECONDS = 12 * 3600
"""A login lasts a working day; then the token is asked for again."""
MAX_SESSIONS = 1000
"""Sessions kept at most: the oldest go first, so logins cannot fill the memory."""
FAILED_LOGINS_ALLOWED = 5
FAILED_LOGIN_WINDOW = 60.0
"""At most FAILED_LOGINS_ALLOWED wrong tokens per client in this many seconds; then 429 until the
oldest failure leaves the window. A 24-character token is not guessed at five tries a minute."""
MAX_CLIENTS_TRACKED = 10_000


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison, so the time an answer takes says nothing about the token."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class Sessions:
    """Logged-in browsers: random session ids with an expiry, in memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, lifetime: float = SESSION_SECONDS) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._expiry: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def create(self) -> str:
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._expiry[session] = self._clock() + self._lifetime
            while len(self._expiry) > MAX_SESSIONS:
                self._expiry.popitem(last=False)
        return session

    def valid(self, session: str | None) -> bool:
        if not session:
            return False
        with self._lock:
            expiry = self._expiry.get(session)
            if expiry is None:
                return False
            if expiry < self._clock():
                del self._expiry[session]
                return False
            return True

    def end(self, session: str | None) -> None:
        with self._lock:
            self._expiry.pop(session or "", None)


class LoginThrottle:
    """Counts failed logins per client address over a sliding window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, allowed: int = FAILED_LOGINS_ALLOWED,
                 window: float = FAILED_LOGIN_WINDOW) -> None:
        self._clock = clock
        self._allowed = allowed
        self._window = window
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def wait_seconds(self, client: str) -> float:
        """0 if `client` may try now, else how long until it may."""
        with self._lock:
            failures = self._recent(client)
            if len(failures) < self._allowed:
                return 0.0
            return max(0.1, failures[0] + self._window - self._clock())

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client).append(self._clock())
            self._failures.move_to_end(client)
            while len(self._failures) > MAX_CLIENTS_TRACKED:  # a flood of addresses: the stalest go first
                self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    def _recent(self, client: str) -> collections.deque[float]:
        failures = self._failures.setdefault(client, collections.deque())
        cutoff = self._clock() - self._window
        while failures and failures[0] < cutoff:
            failures.popleft()
        return failures


def csrf_token(secret: bytes, cookie: str, session: str | None = None) -> str:
    """The token a form of this browser carries: an HMAC of its CSRF cookie (and, once signed in, its
    session) under the server's secret, so a pair taken from the login page is no use after it."""
    message = f"{cookie}\0{session or ''}".encode("utf-8", "surrogateescape")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def csrf_ok(secret: bytes, cookie: str | None, submitted: str | None, session: str | None = None) -> bool:
    if not cookie or not submitted:
        return False
    return hmac.compare_digest(csrf_token(secret, cookie, session).encode(),
                               submitted.encode("utf-8", "surrogateescape"))


def is_loopback_host(host_header: str | None) -> bool:
    """Whether a Host header names this machine (localhost, 127.0.0.0/8, ::1), with any port.

    Without a token the dashboard answers only such requests: a web page elsewhere whose name
    resolves to 127.0.0.1 (DNS rebinding) sends its own name as the Host, and is refused.
    """
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
