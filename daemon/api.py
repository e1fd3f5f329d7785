"""The provider client: requests, and what each answer means.

What to do with an HTTP answer is decided by pure functions (`decide_submit`, `decide_poll`, and
`is_safe_to_resend` in daemon.transport) that are tested with tables of cases; `ApiClient` only
sends requests and hands the answers to them. Transport retries are `urllib3.util.Retry`'s job:
connect errors (the request never left) are retried for every method, read errors and 5xx only for
GET. A submit that may have reached the provider is never resent blindly: it costs money.
"""

from __future__ import annotations

import email.utils
import enum
import json
import time
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from .config import ApiConfig, Secret
from .transport import FreshConnectionAdapter, excerpt, is_safe_to_resend, transport_failure, transport_retry

KEY_HEADER = "Ocp-Apim-Subscription-Key"
FINAL_REMOTE_STATES = ("COMPLETED", "FAILED", "ERROR")
WAITING_REMOTE_STATES = ("QUEUED", "PROCESSING")
DOWNLOAD_CHUNK = 256 * 1024


class SubmitVerdict(str, enum.Enum):
    ACCEPTED = "accepted"
    """The provider took the job: poll it."""
    RETRY = "retry"
    """Not taken this time (429, 500, 503, a connection that never opened): try again after a delay."""
    NO_BALANCE = "no_balance"
    """402: the wallet is empty; every submit would fail the same way."""
    AUTH = "auth"
    """401/403: the key is wrong or revoked; every submit would fail the same way."""
    REJECTED = "rejected"
    """400 and other 4xx: this request is wrong; resending it cannot help."""
    AMBIGUOUS = "ambiguous"
    """The request may have reached the provider but its answer was lost, or a gateway gave up on it
    (502/504): never resend blindly."""


class PollVerdict(str, enum.Enum):
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    ERROR = "error"
    RETRY = "retry"
    """The answer was unusable this time (5xx, 429, malformed, unknown id): poll again later."""
    AUTH = "auth"


@dataclass(frozen=True)
class SubmitAnswer:
    verdict: SubmitVerdict
    http_status: int | None = None
    request_id: str | None = None
    polling_url: str | None = None
    retry_after: float | None = None
    message: str = ""


@dataclass(frozen=True)
class PollAnswer:
    verdict: PollVerdict
    http_status: int | None = None
    remote_status: str | None = None
    media_url: str | None = None
    message: str = ""
    retry_after: float | None = None
    provider_seconds: float | None = None
    """completed_at - created_at as the provider reports it: its own processing time."""


class DownloadError(Exception):
    """The result could not be fetched; `retryable` says whether trying again may help."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


# --------------------------------------------------------------------------- pure decisions


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def _json(body: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, TypeError):
        return None


PUBLISHED_URL = "(the published URL)"


def error_message(body: str, hide: str | None = None) -> str:
    """The provider's own words from an error body ('error: message'), else a short excerpt.

    `hide` (the image URL that was sent: a presigned URL is a secret) is replaced wherever the
    provider quotes it, after JSON decoding and before the excerpt could cut it in half.
    """
    data = _json(body)
    if isinstance(data, dict):
        parts = [str(data[k]) for k in ("error", "message") if isinstance(data.get(k), (str, int)) and data.get(k)]
        if parts:
            return excerpt(_hidden(": ".join(parts), hide))
    return excerpt(provider_text(body, hide)) if body else "(empty body)"


def provider_text(body: str, hide: str | None) -> str:
    """A body to quote in an error, with `hide` masked in the decoded JSON strings.

    Masking the raw text misses a URL the provider JSON-escaped (`\\/`, `\\u0026`); decoding first
    finds it wherever it sits. A body that is not JSON is masked in the spellings it may use.
    """
    data = _json(body) if hide else None
    if isinstance(data, (dict, list)):
        return json.dumps(_masked(data, hide), ensure_ascii=False)
    return _hidden(body, hide)


def _masked(value: Any, secret: str | None) -> Any:
    if isinstance(value, str):
        return _hidden(value, secret)
    if isinstance(value, dict):
        return {_hidden(str(k), secret): _masked(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, secret) for v in value]
    return value


def _hidden(text: str, secret: str | None) -> str:
    """`text` with `secret` replaced, as written or escaped the way JSON or HTML writers escape URLs."""
    if not secret:
        return text
    slashed = secret.replace("/", "\\/")
    spellings = {secret, slashed, secret.replace("&", "\\u0026"), slashed.replace("&", "\\u0026"),
                 secret.replace("&", "&amp;"), json.dumps(secret)[1:-1]}
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, PUBLISHED_URL)
    return text


def is_http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


GATEWAY_GAVE_UP = {
    502: "the gateway got no usable answer from the provider, which may still have taken the job",
    504: "the gateway gave up waiting for the provider, which may still run the job",
}
"""Answers from the API gateway in front of the provider: the submit may have gone through behind it."""


def decide_submit(status: int, body: str, headers: dict[str, str], now: float,
                  image_url: str | None = None) -> SubmitAnswer:
    """What a generate answer means for the job."""
    if 200 <= status < 300:
        data = _json(body)
        request_id = data.get("request_id") if isinstance(data, dict) else None
        if not isinstance(request_id, str) or not request_id.strip():
            return SubmitAnswer(SubmitVerdict.AMBIGUOUS, status,
                                message=f"accepted (HTTP {status}) but no request_id in: "
                                        f"{excerpt(provider_text(body, image_url))}")
        polling_url = data.get("polling_url")
        return SubmitAnswer(SubmitVerdict.ACCEPTED, status, request_id=request_id,
                            polling_url=polling_url if is_http_url(polling_url) else None)
    said = error_message(body, hide=image_url)
    message = f"HTTP {status}: {said}"
    if status in GATEWAY_GAVE_UP:  # worded for the stage's "may have reached the provider (...)"
        return SubmitAnswer(SubmitVerdict.AMBIGUOUS, status,
                            message=f"HTTP {status}: {GATEWAY_GAVE_UP[status]}; it said: {said}")
    retry_after = parse_retry_after(headers.get("Retry-After"), now)
    if status == 402:
        return SubmitAnswer(SubmitVerdict.NO_BALANCE, status, message=message, retry_after=retry_after)
    if status in (401, 403):
        return SubmitAnswer(SubmitVerdict.AUTH, status, message=message)
    if status in (408, 429) or status >= 500:
        return SubmitAnswer(SubmitVerdict.RETRY, status, message=message, retry_after=retry_after)
    return SubmitAnswer(SubmitVerdict.REJECTED, status, message=message)


def _iso_seconds(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        from datetime import datetime

        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def decide_poll(status: int, body: str, headers: dict[str, str], now: float) -> PollAnswer:
    """What a status answer means for the job."""
    retry_after = parse_retry_after(headers.get("Retry-After"), now)
    if status in (401, 403):
        return PollAnswer(PollVerdict.AUTH, status, message=f"HTTP {status}: {error_message(body)}")
    if status != 200:
        return PollAnswer(PollVerdict.RETRY, status, message=f"HTTP {status}: {error_message(body)}",
                          retry_after=retry_after)
    data = _json(body)
    remote = data.get("status") if isinstance(data, dict) else None
    if remote in WAITING_REMOTE_STATES:
        return PollAnswer(PollVerdict.WAITING, status, remote_status=remote)
    if remote == "COMPLETED":
        output = data.get("output")
        urls = output.get("media_url") if isinstance(output, dict) else None
        media_url = urls[0] if isinstance(urls, list) and urls else None
        if not isinstance(media_url, str) or not media_url.strip():
            return PollAnswer(PollVerdict.RETRY, status, remote_status=remote,
                              message=f"COMPLETED without a media_url: {excerpt(body)}")
        # A media_url that is not http(s) is kept: the download refuses it with a clear reason,
        # instead of polling a finished job again until api.job_timeout.
        created, completed = _iso_seconds(data.get("created_at")), _iso_seconds(data.get("completed_at"))
        took = completed - created if created is not None and completed is not None else None
        return PollAnswer(PollVerdict.COMPLETED, status, remote_status=remote, media_url=media_url,
                          provider_seconds=took)
    if remote in ("FAILED", "ERROR"):
        error = data.get("error")
        text = excerpt(str(error)) if error else "(the provider gave no error text)"
        verdict = PollVerdict.FAILED if remote == "FAILED" else PollVerdict.ERROR
        return PollAnswer(verdict, status, remote_status=remote, message=text)
    return PollAnswer(PollVerdict.RETRY, status, message=f"unexpected status document: {excerpt(body)}")


def same_origin(url: str, other: str) -> bool:
    a, b = urlsplit(url), urlsplit(other)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def choose_polling_url(polling_url: str | None, request_id: str, config: ApiConfig) -> str:
    """The provider's polling_url if it points at the provider itself, else status_url/request_id.

    The key travels with every poll, so a polling_url on any other origin is not trusted with it.
    """
    if polling_url and (same_origin(polling_url, config.status_url) or same_origin(polling_url, config.base_url)):
        return polling_url
    return f"{config.status_url.rstrip('/')}/{request_id}"


# --------------------------------------------------------------------------- the client


class ApiClient:
    """One requests.Session for every call; the key is sent to the provider's API only, never to media URLs."""

    def __init__(self, config: ApiConfig, api_key: Secret, session: requests.Session | None = None,
                 clock=time.time) -> None:
        self.config = config
        self._key = api_key
        self._clock = clock
        self.session = session or requests.Session()
        adapter = HTTPAdapter(max_retries=transport_retry(), pool_maxsize=32)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # Submits get an adapter of their own (the longest mounted prefix wins) whose connections
        # are never reused: not one a poll left behind, nor one an earlier submit used.
        self.session.mount(self.generate_url, FreshConnectionAdapter(max_retries=transport_retry()))
        self.timeout = (config.connect_timeout, config.read_timeout)

    def set_key(self, api_key: Secret) -> None:
        self._key = api_key

    @property
    def key_source(self) -> str:
        """Where the key in use came from (never the key itself), for errors that say what to fix."""
        return self._key.source

    def _api_headers(self) -> dict[str, str]:
        return {KEY_HEADER: self._key.reveal(), "Cache-Control": "no-cache"}

    @property
    def generate_url(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/codeformer/generate"

    def submit(self, image_url: str, params: dict[str, Any], webhook_url: str | None = None) -> SubmitAnswer:
        """POST one job. Never raises for network trouble: it is folded into the answer."""
        body = dict(params, image=image_url)
        headers = dict(self._api_headers(), Connection="close")  # tell the server, too
        if webhook_url:
            headers["X-Webhook-URL"] = webhook_url
        try:
            # Never follow a redirect: requests would carry the key header to wherever it points.
            response = self.session.post(self.generate_url, json=body, headers=headers, timeout=self.timeout,
                                         allow_redirects=False)
        except requests.RequestException as exc:
            reason = transport_failure(exc, self.generate_url)
            if is_safe_to_resend(exc):
                return SubmitAnswer(SubmitVerdict.RETRY, message=f"not sent: {reason}")
            return SubmitAnswer(SubmitVerdict.AMBIGUOUS, message=f"sent, answer lost: {reason}")
        # The provider may quote the image URL in an error, and a presigned URL is a secret.
        return decide_submit(response.status_code, response.text, dict(response.headers), self._clock(),
                             image_url=image_url)

    def poll(self, polling_url: str) -> PollAnswer:
        try:
            response = self.session.get(polling_url, headers=self._api_headers(), timeout=self.timeout,
                                        allow_redirects=False)
        except requests.RequestException as exc:  # a polling URL may carry a token in its query
            return PollAnswer(PollVerdict.RETRY, message=transport_failure(exc, polling_url))
        return decide_poll(response.status_code, response.text, dict(response.headers), self._clock())

    def probe_key(self) -> tuple[int | None, str]:
        """Ask for the status of an id that cannot exist: 404 means the key was accepted.

        Costs nothing. Returns the HTTP status (None if no answer came) and a short error text.
        """
        try:
            response = self.session.get(f"{self.config.status_url.rstrip('/')}/codeformer-daemon-key-check",
                                        headers=self._api_headers(), timeout=self.timeout, allow_redirects=False)
        except requests.RequestException as exc:
            return None, f"{type(exc).__name__}: {excerpt(str(exc), 160)}"
        return response.status_code, error_message(response.text)

    def download(self, media_url: str, dest: BinaryIO, max_bytes: int) -> int:
        """Stream the result into `dest`; returns the byte count. No key is sent: it is a CDN URL."""
        if not is_http_url(media_url):
            scheme = urlsplit(media_url).scheme or "none"
            raise DownloadError(f"refusing to follow a non-http(s) media URL (scheme: {excerpt(scheme, 20)})",
                                retryable=False)
        try:
            with self.session.get(media_url, stream=True, timeout=self.timeout) as response:
                if response.status_code != 200:
                    raise DownloadError(f"HTTP {response.status_code} fetching the result",
                                        retryable=response.status_code >= 500 or response.status_code in (404, 408, 429))
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    raise DownloadError(f"the result is {int(length)} bytes, over api.max_download_mb", retryable=False)
                total = 0
                for chunk in response.iter_content(DOWNLOAD_CHUNK):
                    total += len(chunk)
                    if total > max_bytes:
                        raise DownloadError("the result is over api.max_download_mb", retryable=False)
                    dest.write(chunk)
                return total
        except requests.RequestException as exc:  # a signed media URL: its query is a secret
            raise DownloadError(f"fetching the result failed: {transport_failure(exc, media_url)}") from None

    def close(self) -> None:
        self.session.close()
