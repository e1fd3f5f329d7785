"""A local stand-in for the hosted CodeFormer gateway, for tests, benchmarks and demos.

It speaks the provider's HTTP contract (submit, poll, media download, webhook) with the same
status codes and error bodies, plus knobs and injected faults to exercise the daemon's error paths.
It does NOT restore faces: the "restored" image is the input made upright (the scan's EXIF
orientation applied, as the provider does), resized by `upscale` (LANCZOS), with the contrast raised
over the central region where a portrait's face usually is, so that it differs visibly from a plain
resize; sent as a bare PNG without metadata, as the provider's OpenCV writes it.
"""

from __future__ import annotations

import argparse
import collections
import enum
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import requests
from PIL import Image, ImageEnhance, ImageOps

from .api import is_http_url
from .config import parse_listen

MODEL_ID = "codeformer-image-restoration"
GENERATE_PATH = f"/{MODEL_ID}/v1/codeformer/generate"
STATUS_PREFIX = "/v2/requests/status/"
MEDIA_PREFIX = "/media/"
MEDIA_NAME = "/output.png"
KEY_HEADER = "Ocp-Apim-Subscription-Key"
FAULT_KINDS = ("submit_500", "submit_timeout", "poll_500", "poll_garbage", "media_500", "media_garbage",
               "outcome_failed", "outcome_error", "outcome_bad_media_url", "outcome_oversized",
               "outcome_tinted", "outcome_blank", "outcome_unchanged")
"""submit_timeout: the job is accepted (and charged) but the answer is held back `hang_seconds`, past
the client's read timeout. *_garbage: a 200 whose body is not what it should be (HTML, not an
image). outcome_bad_media_url: the job completes with a media_url that is not http(s).
outcome_oversized: the result is OVERSIZE_FACTOR times larger on each side than `upscale` asked for.
The next three complete normally (charged) with CodeFormer's known bad results (see render_output):
outcome_tinted: a colour cast over the whole image and a green patch on the face region, so a grey
scan comes back coloured (CodeFormer #32, #121, #238). outcome_blank: all black, the size of a
normal result (#222). outcome_unchanged: a plain resize, as when no face was found."""
OVERSIZE_FACTOR = 4
OUTCOME_FAULTS = {"outcome_blank": "blank", "outcome_tinted": "tinted", "outcome_unchanged": "unchanged"}
"""Fault kind -> the rendering it asks for; one per job, taken in this order."""
OUTCOMES = ("restored", *OUTCOME_FAULTS.values())
FACE_CONTRAST = 1.3
"""The stand-in for restored faces: the central region's contrast raised by this factor."""
TINT_LEVELS = ((0.9, 25), (0.95, 8), (0.8, 0))
"""The colour cast of outcome_tinted: each of R, G, B becomes v * factor + offset (warm, like skin)."""
PATCH_COLOUR, PATCH_OPACITY = (40, 200, 60), 0.4
GARBAGE = b"<html><body><h1>502 Bad Gateway</h1>upstream sent nonsense</body></html>"
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
FETCH_TIMEOUT = 10.0
WEBHOOK_TIMEOUT = 5.0
STOP_JOIN_SECONDS = 1.5


class JobStatus(str, enum.Enum):
    """The provider's job states, spelled as the status endpoint returns them."""

    QUEUED = "QUEUED"
    """Accepted, waiting for a processing slot."""
    PROCESSING = "PROCESSING"
    """Fetching the input and rendering the output."""
    COMPLETED = "COMPLETED"
    """Done; the output is downloadable."""
    FAILED = "FAILED"
    """The input or the model failed; charged."""
    ERROR = "ERROR"
    """System error; refunded."""


TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.PROCESSING}),
    JobStatus.PROCESSING: frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.ERROR}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.ERROR: frozenset(),
}
FINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


@dataclass
class Job:
    """One accepted submit. `server_url` is how the client reached us, for links in the webhook."""

    request_id: str
    image_url: str
    params: dict[str, Any]
    webhook: str | None
    charged: bool
    server_url: str
    submitted_at: float
    updated_at: float
    status: JobStatus = JobStatus.QUEUED
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    fetched_sha256: str | None = None
    fetched_size: int | None = None
    output_path: str | None = None
    polls: int = 0
    bad_media_url: bool = False
    outcome: str = "restored"
    """How the result was rendered: one of OUTCOMES."""


@dataclass
class Reply:
    """An HTTP answer decided by the emulator and sent by the handler: JSON, or a file."""

    code: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    file_path: str | None = None
    raw: bytes | None = None
    """Sent as it is (a malformed answer), instead of `body` as JSON."""


def error_reply(code: int, error: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(code, {"error": error, "message": message}, headers or {})


# ---------------------------------------------------------------- pure decisions


def is_number(value: Any) -> bool:
    """JSON numbers only: Python's bool is an int, but `true` is not a number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_generate_body(body: Any) -> str | None:
    """Why a generate body is invalid (naming the field), or None if it is acceptable."""
    if not isinstance(body, dict):
        return "Request body must be a JSON object"
    if "image" not in body:
        return "Field 'image' is required"
    if not is_http_url(body["image"]):
        return "Field 'image' must be an http or https URL"
    fidelity = body.get("codeformer_fidelity", 0.5)
    if not is_number(fidelity) or not 0 <= fidelity <= 1:
        return "Field 'codeformer_fidelity' must be a number between 0 and 1"
    for name in ("background_enhance", "face_upsample"):
        if not isinstance(body.get(name, True), bool):
            return f"Field '{name}' must be a boolean"
    upscale = body.get("upscale", 2)
    if not is_number(upscale) or not isinstance(upscale, int) or not 1 <= upscale <= 8:
        return "Field 'upscale' must be an integer between 1 and 8"
    if "webhook" in body and not is_http_url(body["webhook"]):
        return "Field 'webhook' must be an http or https URL"
    events = body.get("webhook_events_filter", [])
    if not isinstance(events, list) or any(e not in WEBHOOK_EVENTS for e in events):
        return f"Field 'webhook_events_filter' must be a list of {', '.join(WEBHOOK_EVENTS)}"
    return None


def generate_params(body: dict[str, Any]) -> dict[str, Any]:
    """The validated parameters with defaults filled in, without `image`; unknown keys dropped."""
    defaults = {"codeformer_fidelity": 0.5, "background_enhance": True, "face_upsample": True,
                "upscale": 2}
    params = {name: body.get(name, default) for name, default in defaults.items()}
    params.update({k: body[k] for k in ("webhook", "webhook_events_filter") if k in body})
    return params


def wants_final_webhook(params: dict[str, Any]) -> bool:
    """A filter that leaves out "completed" opts out of the final-state callback."""
    events = params.get("webhook_events_filter")
    return events is None or "completed" in events


def auth_error(key: str | None, api_key: str, revoked: set[str]) -> Reply | None:
    """401 for a missing or unknown key, 403 for a revoked one (the gateway's APIM answers)."""
    if key and key in revoked:
        return error_reply(403, "Forbidden", "The subscription key has been revoked.")
    if key != api_key:
        return Reply(401, {"statusCode": 401,
                           "message": "Access denied due to missing or invalid subscription key."})
    return None


def retry_after_seconds(rate_limit: float | None, last_accept: float | None, now: float) -> int | None:
    """Whole seconds (at least 1) until another submit is allowed, or None if allowed now."""
    if not rate_limit or last_accept is None:
        return None
    remaining = 1.0 / rate_limit - (now - last_accept)
    return max(1, math.ceil(remaining)) if remaining > 0 else None


def iso_timestamp(epoch: float | None) -> str | None:
    """ISO 8601 in UTC with milliseconds and a Z, as the provider's status documents show."""
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def media_url_for(server_url: str, request_id: str) -> str:
    return f"{server_url}{MEDIA_PREFIX}{request_id}{MEDIA_NAME}"


def status_document(job: Job, server_url: str) -> dict[str, Any]:
    """The body of GET /v2/requests/status/<id>, and of the webhook call."""
    output = None
    if job.status is JobStatus.COMPLETED:
        media_url = ("file:///etc/passwd" if job.bad_media_url
                     else media_url_for(server_url, job.request_id))
        output = {"media_url": [media_url], "media_type": "image/png"}
    return {"request_id": job.request_id, "status": job.status.value, "model_id": MODEL_ID,
            "error": job.error, "output": output, "created_at": iso_timestamp(job.submitted_at),
            "updated_at": iso_timestamp(job.updated_at),
            "completed_at": iso_timestamp(job.finished_at)}


SETTING_CHECKS = {
    "latency": lambda v: is_number(v) and v >= 0,
    "max_concurrent": lambda v: is_number(v) and isinstance(v, int) and v >= 0,
    "balance": lambda v: v is None or is_number(v),
    "rate_limit": lambda v: v is None or (is_number(v) and v > 0),
    "model_disabled": lambda v: isinstance(v, bool),
    "revoked_keys": lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v),
    "hang_seconds": lambda v: is_number(v) and v >= 0,
    "fetch_delay": lambda v: is_number(v) and v >= 0,
    "drop_webhooks": lambda v: isinstance(v, bool),
}


def validate_settings(body: Any) -> str | None:
    """Why an admin settings body is unacceptable, or None."""
    if not isinstance(body, dict):
        return "Settings must be a JSON object"
    for name, value in body.items():
        if name not in SETTING_CHECKS or not SETTING_CHECKS[name](value):
            return f"Unknown setting or invalid value: '{name}'"
    return None


def decode_image(data: bytes) -> Image.Image | str:
    """The decoded image, or why Pillow could not read it."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception as exc:  # Pillow raises many types for broken input
        return f"Could not decode image: {exc}"


def render_output(image: Image.Image, upscale: int, outcome: str = "restored") -> bytes:
    """The stand-in for restoration, as the bytes of a bare PNG (no EXIF, ICC, dpi or text).

    The scan is made upright first, as the provider does. "restored": a LANCZOS resize by
    `upscale` with the central region's contrast raised (standing in for restored faces);
    "unchanged": the plain resize; "tinted": restored, then a colour cast and a green patch on the
    face region; "blank": all black. RGB, RGBA and L are kept; 16-bit grey becomes L, transparency
    RGBA, anything else RGB; a tinted result is RGB (RGBA with transparency), a blank one RGB.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {', '.join(OUTCOMES)}")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif image.mode in ("LA", "PA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    size = (image.width * upscale, image.height * upscale)
    if outcome == "blank":
        output = Image.new("RGB", size)
    else:
        output = image.resize(size, Image.LANCZOS)
        if outcome != "unchanged":
            output = with_faces_touched(output)
        if outcome == "tinted":
            output = tinted(output)
    output.info = {}  # the PNG writer would carry the scan's ICC profile and transparency from here
    buffer = io.BytesIO()
    # compress_level 1: a fast encode keeps the emulator's CPU out of the daemon's measurements.
    output.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def central_box(size: tuple[int, int], part: int = 4) -> tuple[int, int, int, int]:
    """The centre of an image, `part` of each side in from every edge: where a portrait's face is."""
    width, height = size
    return width // part, height // part, width - width // part, height - height // part


def with_faces_touched(image: Image.Image) -> Image.Image:
    """The central region's contrast raised: one cheap filter, visible, and it survives a downscale."""
    box = central_box(image.size)
    image.paste(ImageEnhance.Contrast(image.crop(box)).enhance(FACE_CONTRAST), box)
    return image


def tinted(image: Image.Image) -> Image.Image:
    """The model's invented colour: a warm cast over everything and a green patch on the face."""
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    bands = image.convert("RGB").split()
    image = Image.merge("RGB", [band.point(lambda v, f=factor, o=offset: min(255, round(v * f + o)))
                                for band, (factor, offset) in zip(bands, TINT_LEVELS)])
    box = central_box(image.size, part=3)
    patch = image.crop(box)
    image.paste(Image.blend(patch, Image.new("RGB", patch.size, PATCH_COLOUR), PATCH_OPACITY), box)
    if alpha is not None:
        image.putalpha(alpha)
    return image


def fetch_input(url: str) -> bytes | str:
    """The input's bytes, or why the gateway could not fetch them."""
    try:
        response = requests.get(url, timeout=FETCH_TIMEOUT)
    except requests.RequestException as exc:
        return f"Could not fetch image: {type(exc).__name__}"
    if response.status_code != 200:
        return f"Could not fetch image: HTTP {response.status_code}"
    return response.content


# ---------------------------------------------------------------- the emulator


class GatewayEmulator:
    """An in-process gateway. Knobs are plain attributes and may be changed while it runs.

    One lock guards all mutable state. Each PROCESSING job runs on its own thread, started
    when a slot frees up, so nothing polls; a stop interrupts every wait.
    """

    def __init__(self, listen: str = "127.0.0.1:0", *, api_key: str = "emulator-key",
                 latency: float = 0.2, max_concurrent: int = 0, balance: float | None = None,
                 rate_limit: float | None = None) -> None:
        self._host, self._port = parse_listen(listen, "--listen")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self.api_key = api_key
        self.latency = latency
        self._max_concurrent = max_concurrent
        self.balance = balance
        self.rate_limit = rate_limit
        self.model_disabled = False
        self.revoked_keys: set[str] = set()
        self.hang_seconds = 30.0
        """How long an injected submit_timeout holds its answer back."""
        self.fetch_delay = 0.0
        """Seconds a job spends PROCESSING before the gateway fetches its input (a busy provider)."""
        self.drop_webhooks = False
        """Accept webhook URLs but never call them, as a provider that cannot reach the caller."""
        self._jobs: dict[str, Job] = {}
        self._faults = dict.fromkeys(FAULT_KINDS, 0)
        self._counts = dict.fromkeys(("submits_received", "submits_accepted", "polls",
                                      "media_downloads"), 0)
        self._rejected: dict[str, int] = {}
        self._peak_unfinished = 0
        self._last_accept: float | None = None
        self._deliveries = 0
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self._output_dir = ""

    # -- lifecycle

    def start(self) -> GatewayEmulator:
        self._output_dir = tempfile.mkdtemp(prefix="codeformer-emulator-")
        self._server = _Server((self._host, self._port), _Handler)
        self._server.emulator = self  # type: ignore[attr-defined]
        self._port = self._server.server_address[1]
        self._spawn(self._server.serve_forever, 0.05, name="emulator-http")
        return self

    def stop(self) -> None:
        """Stop serving, interrupt in-flight jobs, and remove the rendered outputs."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        shutil.rmtree(self._output_dir, ignore_errors=True)

    def __enter__(self) -> GatewayEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, target: Any, *args: Any, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator has not been started")
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        return f"http://{host}:{self._port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/{MODEL_ID}/v1"

    @property
    def status_url(self) -> str:
        return self.url + STATUS_PREFIX.rstrip("/")

    @property
    def max_concurrent(self) -> int:
        return self._max_concurrent

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        # A raised limit must release queued jobs at once, hence a property.
        with self._lock:
            self._max_concurrent = value
            self._dispatch_locked()

    # -- knobs, faults and observation

    def settings(self) -> dict[str, Any]:
        return {"latency": self.latency, "max_concurrent": self.max_concurrent,
                "balance": self.balance, "rate_limit": self.rate_limit,
                "model_disabled": self.model_disabled, "revoked_keys": sorted(self.revoked_keys),
                "hang_seconds": self.hang_seconds, "fetch_delay": self.fetch_delay,
                "drop_webhooks": self.drop_webhooks}

    def inject(self, kind: str, count: int = 1) -> None:
        """Make the next `count` matching events fail the way `kind` names."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._faults[kind] += count

    def _take_fault_locked(self, kind: str) -> bool:
        if self._faults[kind] > 0:
            self._faults[kind] -= 1
            return True
        return False

    def stats(self) -> dict[str, Any]:
        with self._lock:
            jobs = [{"request_id": j.request_id, "status": j.status.value, "params": dict(j.params),
                     "image_url": j.image_url, "key_ok": True, "fetched_sha256": j.fetched_sha256,
                     "fetched_size": j.fetched_size, "submitted_at": j.submitted_at,
                     "started_at": j.started_at, "finished_at": j.finished_at, "polls": j.polls,
                     "outcome": j.outcome}
                    for j in self._jobs.values()]
            return {**self._counts, "rejected": dict(self._rejected), "balance": self.balance,
                    "faults": dict(self._faults), "jobs": jobs}

    @property
    def peak_unfinished(self) -> int:
        """The most accepted jobs unfinished (queued or processing) at one moment: never more than the
        client kept in flight, so a fleet that overstepped `api.max_in_flight` shows here."""
        with self._lock:
            return self._peak_unfinished

    def submits_by_content(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for digest in (j.fetched_sha256 for j in self._jobs.values() if j.fetched_sha256):
                counts[digest] = counts.get(digest, 0) + 1
        return counts

    def forget(self, request_id: str) -> None:
        """Drop a job as a provider purging old requests does: its status is 404 from now on."""
        with self._changed:
            self._jobs.pop(request_id, None)
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once no job is queued or processing and no webhook call is in flight."""
        with self._changed:
            return self._changed.wait_for(lambda: self._deliveries == 0 and all(
                j.status in FINAL for j in self._jobs.values()), timeout)

    # -- requests, called by _Handler

    def handle_submit(self, key: str | None, raw_body: bytes, webhook_header: str | None,
                      server_url: str) -> Reply:
        with self._lock:
            self._counts["submits_received"] += 1
        reply = self._admit(key, raw_body, webhook_header, server_url)
        if reply.code != 202:
            with self._lock:
                self._rejected[str(reply.code)] = self._rejected.get(str(reply.code), 0) + 1
        return reply

    def _admit(self, key: str | None, raw_body: bytes, webhook_header: str | None,
               server_url: str) -> Reply:
        """The gateway's checks, in its order: key, fault, body, model, rate, balance."""
        denied = auth_error(key, self.api_key, self.revoked_keys)
        if denied:
            return denied
        with self._lock:
            if self._take_fault_locked("submit_500"):
                return error_reply(500, "Internal Server Error", "Injected fault: submit_500")
        body = parse_json(raw_body)
        problem = "Request body is not valid JSON" if body is INVALID else validate_generate_body(body)
        if problem:
            return error_reply(400, "Bad Request", problem)
        if self.model_disabled:
            return error_reply(400, "Model not found", f"Model '{MODEL_ID}' not found or is disabled")
        with self._lock:
            wait = retry_after_seconds(self.rate_limit, self._last_accept, time.monotonic())
            if wait is not None:
                return error_reply(429, "Too Many Requests",
                                   f"Rate limit is exceeded. Try again in {wait} seconds.",
                                   {"Retry-After": str(wait)})
            if self.balance is not None and self.balance < 1:
                return error_reply(402, "Insufficient Balance",
                                   "Your wallet does not have enough balance.")
            job = self._accept_locked(body, webhook_header or body.get("webhook"), server_url)
            hang = self._take_fault_locked("submit_timeout")
        if hang:
            self._stopping.wait(self.hang_seconds)
        return Reply(202, {"request_id": job.request_id, "status": "QUEUED",
                           "polling_url": f"{server_url}{STATUS_PREFIX}{job.request_id}"})

    def _accept_locked(self, body: dict[str, Any], webhook: str | None, server_url: str) -> Job:
        self._last_accept, now = time.monotonic(), time.time()
        charged = self.balance is not None
        if charged:
            self.balance -= 1
        job = Job(f"{MODEL_ID}_{uuid.uuid4()}", body["image"], generate_params(body), webhook,
                  charged, server_url, submitted_at=now, updated_at=now)
        self._jobs[job.request_id] = job
        self._counts["submits_accepted"] += 1
        self._dispatch_locked()
        return job

    def handle_status(self, key: str | None, request_id: str, server_url: str) -> Reply:
        with self._lock:
            self._counts["polls"] += 1
        denied = auth_error(key, self.api_key, self.revoked_keys)
        if denied:
            return denied
        with self._lock:
            job = self._jobs.get(request_id)
            if job is None:
                return error_reply(404, "Not Found", "Request not found")
            job.polls += 1
            if self._take_fault_locked("poll_500"):
                return error_reply(500, "Internal Server Error", "Injected fault: poll_500")
            if self._take_fault_locked("poll_garbage"):
                return Reply(200, raw=GARBAGE)
            return Reply(200, status_document(job, server_url))

    def handle_media(self, request_id: str) -> Reply:
        with self._lock:
            job = self._jobs.get(request_id)
            if job is None or job.output_path is None:
                return error_reply(404, "Not Found", "Media not found")
            if self._take_fault_locked("media_500"):
                return error_reply(500, "Internal Server Error", "Injected fault: media_500")
            self._counts["media_downloads"] += 1
            if self._take_fault_locked("media_garbage"):
                return Reply(200, raw=GARBAGE, headers={"Content-Type": "image/png"})
            return Reply(200, file_path=job.output_path)

    def handle_settings(self, body: Any) -> Reply:
        problem = "Settings are not valid JSON" if body is INVALID else validate_settings(body)
        if problem:
            return error_reply(400, "Bad Request", problem)
        for name, value in body.items():
            setattr(self, name, set(value) if name == "revoked_keys" else value)
        return Reply(200, self.settings())

    def handle_faults(self, body: Any) -> Reply:
        kind = body.get("kind") if isinstance(body, dict) else None
        count = body.get("count", 1) if isinstance(body, dict) else None
        if kind not in FAULT_KINDS or not is_number(count) or not isinstance(count, int) or count < 0:
            return error_reply(400, "Bad Request",
                               f"Expected {{'kind': one of {', '.join(FAULT_KINDS)}, 'count': n >= 0}}")
        self.inject(kind, count)
        return Reply(200, {"kind": kind, "count": count})

    # -- processing

    def _dispatch_locked(self) -> None:
        """Move queued jobs, oldest first, into free processing slots; note the most ever unfinished
        (it is called after each accept, so the same pass over the jobs counts both)."""
        statuses = collections.Counter(j.status for j in self._jobs.values())
        processing = statuses[JobStatus.PROCESSING]
        self._peak_unfinished = max(self._peak_unfinished, processing + statuses[JobStatus.QUEUED])
        if self._stopping.is_set():
            return
        for job in self._jobs.values():
            if self._max_concurrent and processing >= self._max_concurrent:
                break
            if job.status is JobStatus.QUEUED:
                job.status, job.started_at = JobStatus.PROCESSING, time.time()
                job.updated_at = job.started_at
                processing += 1
                self._spawn(self._process, job, self.latency, name=f"emulator-{job.request_id}")

    def _process(self, job: Job, latency: float) -> None:
        """Fetch, decode and render, then wait out the rest of the latency (a stop cuts it short).

        The latency is the whole processing time, rendering included, so a job takes `latency`
        seconds however busy the machine's CPU is (unless rendering alone takes longer).
        """
        finish_at = time.monotonic() + latency
        if self.fetch_delay and self._stopping.wait(self.fetch_delay):
            return None
        fetched = fetch_input(job.image_url)
        if isinstance(fetched, str):
            return self._finish(job, JobStatus.FAILED, fetched)
        with self._lock:
            job.fetched_sha256, job.fetched_size = hashlib.sha256(fetched).hexdigest(), len(fetched)
        image = decode_image(fetched)
        if isinstance(image, str):
            return self._finish(job, JobStatus.FAILED, image)
        path = os.path.join(self._output_dir, f"{job.request_id}.png")
        with self._lock:
            scale = job.params["upscale"] * (OVERSIZE_FACTOR if self._take_fault_locked("outcome_oversized") else 1)
            job.outcome = next((OUTCOME_FAULTS[kind] for kind in OUTCOME_FAULTS
                                if self._take_fault_locked(kind)), "restored")
        try:
            with open(path, "wb") as out:
                out.write(render_output(image, scale, job.outcome))
            rendered = None
        except Exception as exc:
            rendered = f"Rendering failed: {exc}"
        if self._stopping.wait(max(0.0, finish_at - time.monotonic())):
            return None
        with self._lock:
            failed = self._take_fault_locked("outcome_failed")
            errored = not failed and self._take_fault_locked("outcome_error")
        if failed:
            return self._finish(job, JobStatus.FAILED, "Injected failure: face restoration failed")
        if errored:
            return self._finish(job, JobStatus.ERROR, "Injected system error")
        if rendered is not None:
            return self._finish(job, JobStatus.ERROR, rendered)
        with self._lock:
            job.bad_media_url = self._take_fault_locked("outcome_bad_media_url")
        return self._finish(job, JobStatus.COMPLETED, None, path)

    def _finish(self, job: Job, status: JobStatus, error: str | None,
                output_path: str | None = None) -> None:
        """Record the final state (refunding a system error), free the slot, then call the webhook."""
        with self._changed:
            assert status in TRANSITIONS[job.status], f"{job.status} -> {status}"
            job.status, job.error, job.output_path = status, error, output_path
            job.finished_at = job.updated_at = time.time()
            if status is JobStatus.ERROR and job.charged and self.balance is not None:
                self.balance += 1
            hook = job.webhook if job.webhook and wants_final_webhook(job.params) and not self.drop_webhooks else None
            document = status_document(job, job.server_url)
            self._deliveries += hook is not None
            self._dispatch_locked()
            self._changed.notify_all()
        if hook is None:
            return
        try:
            requests.post(hook, json=document, timeout=WEBHOOK_TIMEOUT)
        except requests.RequestException:
            pass  # best effort, like the provider's callbacks
        finally:
            with self._changed:
                self._deliveries -= 1
                self._changed.notify_all()


# ---------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a real gateway takes bursts; the stdlib's 5 would drop connections

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (a read timeout, a killed daemon) is not an emulator error."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

INVALID = object()


def parse_json(raw: bytes) -> Any:
    """The decoded body, or INVALID (a body may legitimately decode to None)."""
    try:
        return json.loads(raw)
    except ValueError:
        return INVALID


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the emulator, which makes every decision."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms stall
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        emulator: GatewayEmulator = self.server.emulator  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        if path.startswith(STATUS_PREFIX):
            reply = emulator.handle_status(self.headers.get(KEY_HEADER), path[len(STATUS_PREFIX):],
                                           self._server_url())
        elif path.startswith(MEDIA_PREFIX) and path.endswith(MEDIA_NAME):
            reply = emulator.handle_media(path[len(MEDIA_PREFIX):-len(MEDIA_NAME)])
        elif path == "/_emulator/stats":
            reply = Reply(200, emulator.stats())
        else:
            reply = error_reply(404, "Not Found", "Resource not found")
        self._send(reply)

    def do_POST(self) -> None:
        emulator: GatewayEmulator = self.server.emulator  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        length = self.headers.get("Content-Length", "0")
        raw = self.rfile.read(int(length)) if length.isdigit() else b""
        if path == GENERATE_PATH:
            reply = emulator.handle_submit(self.headers.get(KEY_HEADER), raw,
                                           self.headers.get("X-Webhook-URL"), self._server_url())
        elif path == "/_emulator/settings":
            reply = emulator.handle_settings(parse_json(raw))
        elif path == "/_emulator/faults":
            reply = emulator.handle_faults(parse_json(raw))
        else:
            reply = error_reply(404, "Not Found", "Resource not found")
        self._send(reply)

    def _server_url(self) -> str:
        # Links use the address the client used, so they work through whatever interface is bound.
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.emulator.url  # type: ignore[attr-defined]

    def _send(self, reply: Reply) -> None:
        if reply.file_path is not None:
            try:
                stream = open(reply.file_path, "rb")
            except OSError:
                return self._send(error_reply(404, "Not Found", "Media not found"))
            with stream:
                self._head(reply.code, "image/png", os.fstat(stream.fileno()).st_size, {})
                shutil.copyfileobj(stream, self.wfile)
            return None
        if reply.raw is not None:
            headers = {"Content-Type": "text/html", **reply.headers}
            self._head(reply.code, headers.pop("Content-Type"), len(reply.raw), headers)
            self.wfile.write(reply.raw)
            return None
        payload = json.dumps(reply.body).encode()
        self._head(reply.code, "application/json", len(payload), reply.headers)
        self.wfile.write(payload)
        return None

    def _head(self, code: int, content_type: str, length: int, headers: dict[str, str]) -> None:
        self.send_response(code)
        for name, value in {"Content-Type": content_type, "Content-Length": str(length),
                            **headers}.items():
            self.send_header(name, value)
        if self.close_connection:  # the client asked for it: say so, as HTTP/1.1 requires
            self.send_header("Connection", "close")
        self.end_headers()


# ---------------------------------------------------------------- command line

CLI_DESCRIPTION = ("Run a local stand-in for the CodeFormer gateway. It does NOT restore faces: "
                   "the output is the input resized by 'upscale' (LANCZOS) with the contrast of its "
                   "centre raised, as PNG.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = parser.description or CLI_DESCRIPTION
    parser.add_argument("--listen", default="127.0.0.1:8787", metavar="HOST:PORT",
                        help="address to serve on (default 127.0.0.1:8787; port 0 picks one)")
    parser.add_argument("--api-key", default="emulator-key",
                        help="subscription key clients must send (default emulator-key)")
    parser.add_argument("--latency", type=float, default=0.2,
                        help="seconds a job spends PROCESSING (default 0.2)")
    parser.add_argument("--max-concurrent", type=int, default=0,
                        help="jobs PROCESSING at once; others wait QUEUED (default 0 = unlimited)")
    parser.add_argument("--balance", type=float, default=None,
                        help="number of submits the wallet pays for (default unlimited)")
    parser.add_argument("--rate-limit", type=float, default=None,
                        help="accepted submits per second before 429 (default off)")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; the handlers only set a flag."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    emulator = GatewayEmulator(args.listen, api_key=args.api_key, latency=args.latency,
                               max_concurrent=args.max_concurrent, balance=args.balance,
                               rate_limit=args.rate_limit)
    try:
        emulator.start()
        print(f"emulator serving (no faces are restored): base_url={emulator.base_url} "
              f"status_url={emulator.status_url} api_key={args.api_key} (the emulator's fake key)",
              flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.emulator", description=CLI_DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
