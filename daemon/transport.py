"""How an HTTP call failed, and the transport under every call to the provider.

Whether a failed request may be sent again is decided by where it broke (urllib3's own rule:
connect errors before a byte left, read errors after), and a failure is described without the
parts of a URL that carry secrets (a signed media URL, a polling token). Transport retries are
`urllib3.util.Retry`'s job; submits ride on connections that are never reused.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

EXCERPT = 200


def excerpt(text: str, limit: int = EXCERPT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


NEVER_BUILT = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema)
CONNECT_ERRORS = (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)
"""Refused, DNS and connect timeouts (urllib3's NewConnectionError is a ConnectTimeoutError)."""
OPENING_STEPS = frozenset({"connect", "_new_conn", "create_connection", "_validate_conn", "_prepare_proxy",
                           "do_handshake"})
"""Functions that open a connection (TCP, proxy tunnel, TLS handshake): nothing was sent yet."""
TRANSPORT_MODULES = ("urllib3", "http", "ssl", "socket")


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and everything behind it: causes, contexts, urllib3's `reason`, exceptions passed as args."""
    chain: list[BaseException] = []
    stack: list[Any] = [exc]
    while stack:
        current = stack.pop(0)
        if isinstance(current, BaseException) and all(current is not seen for seen in chain):
            chain.append(current)
            stack.extend(_behind(current))
    return chain


def _behind(exc: BaseException) -> list[BaseException]:
    links = [getattr(exc, "reason", None), exc.__cause__, *getattr(exc, "args", ()), exc.__context__]
    return [e for e in links if isinstance(e, BaseException)]  # ssl.SSLError's `reason` is a str


def _transport_steps(exc: BaseException) -> set[str]:
    """The urllib3/http.client/ssl/socket functions `exc` was raised in or passed through."""
    steps: set[str] = set()
    tb = exc.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] in TRANSPORT_MODULES:
            steps.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return steps


def is_safe_to_resend(exc: BaseException) -> bool:
    """True when a failed request certainly never left: it broke while its connection was opening.

    Decided by where it broke, as the exceptions' tracebacks tell: urllib3 reports a TLS error as
    SSLError, and a reset as ProtocolError, whether the handshake broke (nothing sent) or the answer
    did (the provider may have acted and charged). Otherwise only a connect error (refused, DNS,
    connect timeout: raised only while opening) is safe, by its type; anything else counts as sent.
    """
    if isinstance(exc, NEVER_BUILT):
        return True
    chain = exception_chain(exc)
    steps = set().union(*(_transport_steps(e) for e in chain))
    return bool(steps & OPENING_STEPS) or any(isinstance(e, CONNECT_ERRORS) for e in chain)


def transport_failure(exc: BaseException, url: str) -> str:
    """What broke, for errors and logs: the exception, the host and the first cause.

    Never the URL's path or query: requests puts them in its messages, and a signed media URL
    (or a polling URL with a token) carries its secret there.
    """
    root = _root_cause(exc)
    detail = str(root) if root is exc else f"{type(root).__name__}: {root}"
    return f"{type(exc).__name__} ({_origin(url)}): {excerpt(_without_path(detail.rstrip(': '), url), 160)}"


def _root_cause(exc: BaseException) -> BaseException:
    """The exception at the far end of the first link each time: the OS or TLS error itself."""
    seen = [exc]
    while True:
        behind = [e for e in _behind(exc) if all(e is not s for s in seen)]
        if not behind:
            return exc
        exc = behind[0]
        seen.append(exc)


def _origin(url: str) -> str:
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "?", parts.port
    except ValueError:
        return "?"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


def _without_path(text: str, url: str) -> str:
    parts = urlsplit(url)
    rest = url[len(f"{parts.scheme}://{parts.netloc}"):] if parts.netloc else url
    pieces = {url, requests.utils.requote_uri(url), rest, requests.utils.requote_uri(rest), parts.query,
              parts.path if len(parts.path) > 1 else ""}
    for piece in sorted((p for p in pieces if p), key=len, reverse=True):
        text = text.replace(piece, "(path hidden)")
    return text


class _QueryHidden(logging.Filter):
    """urllib3 logs a retried URL with its query at WARNING, which Python's last-resort handler prints
    to stderr (the journal): a signed media URL's signature, a polling URL's token. Keep the path only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(a.split("?", 1)[0] + "?(query hidden)" if isinstance(a, str) and "?" in a else a
                                for a in record.args)
        return True


for _name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.util.retry"):
    logging.getLogger(_name).addFilter(_QueryHidden())


class FreshConnectionAdapter(HTTPAdapter):
    """Sends every request on a new connection that is never reused.

    `PoolManager.clear()` leaves the request in flight alone but closes its connection when it is
    released, whatever the server's answer said about keep-alive. A submit must never ride on a
    connection the server may already have closed: that fails *after* the request was written,
    which cannot be told apart from a lost answer, and a lost answer is never resent.
    """

    def send(self, request, **kwargs):  # type: ignore[override]
        try:
            return super().send(request, **kwargs)
        finally:
            self.poolmanager.clear()


def transport_retry() -> Retry:
    """Short transport-level retries. POST is left out of read/status retries: resending a submit costs."""
    return Retry(total=4, connect=3, read=1, status=2, other=0, backoff_factor=0.2, backoff_max=2.0,
                 status_forcelist=(502, 503, 504), allowed_methods=frozenset({"GET", "HEAD"}),
                 raise_on_status=False, respect_retry_after_header=False)
