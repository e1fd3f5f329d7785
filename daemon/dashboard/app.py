"""The dashboard's WSGI application: routes, who may see them, and the actions a person can take.

Reads go through `daemon.reports` on a journal connection of its own (SQLite's WAL lets it read
while the daemon writes); actions go through `daemon.control`, the code the CLI uses, and the
daemon's loop carries them out within a second. Nothing on disk is served but the package's own
static files and the previews in state_dir/thumbnails, found by job id.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import jinja2
import structlog

from .. import control, reports
from ..journal import Journal
from ..previews import KINDS, open_preview
from ..retry import RetryError
from . import pages
from .http import Request, Response, redirect, text
from .security import (CSRF_COOKIE, SESSION_COOKIE, LoginThrottle, Sessions, bearer_token, csrf_ok, csrf_token,
                       is_loopback_host, token_matches)

log = structlog.get_logger("daemon.dashboard")

STATIC_FILES = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
                "favicon.svg": "image/svg+xml"}
PUBLIC_PATHS = frozenset({"/login", "/static/dashboard.css", "/static/favicon.svg"})
"""What a browser without a session may fetch when a token is set: the login page and its style."""

JOB_PATH = re.compile(r"/jobs/([0-9]{1,12})")
ACTION_PATH = re.compile(r"/jobs/([0-9]{1,12})/retry")
PREVIEW_PATH = re.compile(r"/previews/([0-9]{1,12})/(before|after)\.jpg")
FOLDERS_FRESH_FOR = 60.0

Handler = Callable[..., Response]


class DashboardApp:
    """The WSGI callable. `token` None: no login (loopback only, checked by the configuration)."""

    def __init__(self, journal_store, failed_dir: Path, *, token: str | None = None,
                 thumbnails: Path | None = None, metrics: Callable[[], tuple[bytes, str]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.journal = Journal(journal_store)
        self.failed_dir = failed_dir
        self.token = token
        self.thumbnails = thumbnails
        self.metrics = metrics
        self.clock = clock
        self._folder_names: list[str] = []
        self._folders_until = 0.0
        self.sessions = Sessions()
        self.throttle = LoginThrottle()
        self.secret = secrets.token_bytes(32)
        """Keys the CSRF tokens; new at each start, so tokens from before a restart stop working."""
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("daemon.dashboard", "templates"),
            autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        self.templates.filters.update(age=pages.age_text, clock=pages.clock_text)
        self.static = {name: (resources.files("daemon.dashboard").joinpath("static", name).read_bytes(), kind)
                       for name, kind in STATIC_FILES.items()}

    def close(self) -> None:
        self.journal.close()

    # ------------------------------------------------------------------ WSGI

    def __call__(self, environ: dict[str, Any], start_response) -> list[bytes]:
        request = Request(environ)
        try:
            response = self.handle(request)
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the page down
            log.error("dashboard.error", path=request.path, error=f"{type(exc).__name__}: {exc}", exc_info=True)
            response = text(500, "the dashboard could not answer this request; see the daemon's log")
        return response.wsgi(start_response, head=request.method == "HEAD")

    def handle(self, request: Request) -> Response:
        if self.token is None and not is_loopback_host(request.header("Host")):
            return text(403, "this dashboard answers only requests to localhost or 127.0.0.1 (set a token to "
                             "reach it by another name)")
        if request.path == "/login":
            return self._login(request)
        if request.path in PUBLIC_PATHS:
            return self._static(request.path.removeprefix("/static/"))
        refused = self._refusal(request)
        if refused is not None:
            return refused
        if request.path.startswith("/static/"):
            return self._static(request.path.removeprefix("/static/"))
        if request.method == "POST":
            return self._action(request)
        if request.method not in ("GET", "HEAD"):
            return text(405, "only GET and POST")
        return self._page(request)

    # ------------------------------------------------------------------ who is asking

    def _refusal(self, request: Request) -> Response | None:
        """None when the request may go on: no token is set, its session is valid, or it carries the
        token as a Bearer (wrong ones count against the client like wrong logins)."""
        if self.token is None or self._session(request) is not None:
            return None
        given = bearer_token(request.header("Authorization"))
        if given is None:
            if request.method in ("GET", "HEAD") and request.path != "/metrics":
                return redirect("/login")
            return text(401, "sign in first (or send Authorization: Bearer <token>)")
        wait = self.throttle.wait_seconds(request.client)
        if wait:
            return self._too_many(text(429, "too many wrong tokens; try again later"), wait)
        if token_matches(given, self.token):
            return None
        self.throttle.failed(request.client)
        log.warning("dashboard.login_failed", client=request.client, by="bearer")
        return text(401, "that is not the dashboard's token")

    def _session(self, request: Request) -> str | None:
        """This browser's valid session id (token mode only), or None."""
        session = request.cookies.get(SESSION_COOKIE)
        return session if self.token is not None and self.sessions.valid(session) else None

    @staticmethod
    def _too_many(response: Response, wait: float) -> Response:
        response.headers.append(("Retry-After", str(max(1, round(wait)))))
        return response

    def _csrf_cookie(self, request: Request, response: Response) -> str:
        """This browser's CSRF cookie, set now if it has none; forms carry its HMAC."""
        cookie = request.cookies.get(CSRF_COOKIE)
        if not cookie or len(cookie) > 100:
            cookie = secrets.token_urlsafe(24)
            response.set_cookie(CSRF_COOKIE, cookie, secure=request.secure)
        return cookie

    def _csrf_passes(self, request: Request) -> bool:
        return csrf_ok(self.secret, request.cookies.get(CSRF_COOKIE), request.form().get("csrf"),
                       self._session(request))

    def _login(self, request: Request) -> Response:
        if self.token is None:
            return redirect("/")
        if request.method == "GET":
            return self._render(request, "login.html", error=None)
        if request.method != "POST":
            return text(405, "only GET and POST")
        wait = self.throttle.wait_seconds(request.client)
        if wait:
            return self._too_many(self._render(request, "login.html", status=429,
                                               error=f"Too many wrong tokens; try again in {wait:.0f} s."), wait)
        if not self._csrf_passes(request):
            return self._render(request, "login.html", error="The form had expired; please try again.", status=403)
        if not token_matches(request.form().get("token"), self.token):
            self.throttle.failed(request.client)
            log.warning("dashboard.login_failed", client=request.client)
            return self._render(request, "login.html", error="That is not the dashboard's token.", status=401)
        self.throttle.succeeded(request.client)
        log.info("dashboard.login", client=request.client)
        response = redirect("/")
        response.set_cookie(SESSION_COOKIE, self.sessions.create(), secure=request.secure)
        # A fresh CSRF cookie too: whatever pair anyone saw on the login page is no use from now on.
        response.set_cookie(CSRF_COOKIE, secrets.token_urlsafe(24), secure=request.secure)
        return response

    # ------------------------------------------------------------------ pages

    def _page(self, request: Request) -> Response:
        now, path = self.clock(), request.path
        if path in ("/", "/live"):
            overview = pages.overview(self.journal, now)
            shown = {job.id: self._previews_of(job.id) for job in overview["latest"]}
            return self._render(request, "overview.html" if path == "/" else "_live.html", **overview, now=now,
                                previews=shown)
        if path == "/jobs":
            return self._render(request, "jobs.html", **pages.jobs(self.journal, request.query, self._folders(now)),
                                now=now)
        if path == "/failed":
            return self._render(request, "failed.html", **pages.failed(self.journal), now=now,
                                notice=pages.retry_notice(request.query))
        if path == "/metrics" and self.metrics is not None:
            body, kind = self.metrics()
            return Response(200, body, kind)
        match = JOB_PATH.fullmatch(path)
        if match:
            job = self.journal.get(int(match.group(1)))
            if job is None:
                return text(404, "no such job")
            return self._render(request, "job.html", **pages.job(self.journal, job), now=now,
                                previews=self._previews_of(job.id))
        match = PREVIEW_PATH.fullmatch(path)
        if match:
            return self._preview(int(match.group(1)), match.group(2))
        return text(404, "not found")

    def _folders(self, now: float) -> list[str]:
        """The inbox folders that have jobs, for the jobs page's filter: a scan of every job, so read
        at most once a minute."""
        if now >= self._folders_until:
            self._folder_names = reports.folders(self.journal)
            self._folders_until = now + FOLDERS_FRESH_FOR
        return self._folder_names

    def _render(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        response = Response(status)
        cookie = self._csrf_cookie(request, response)
        session = self._session(request)
        context.update(csrf=csrf_token(self.secret, cookie, session), signed_in=session is not None, path=request.path)
        response.body = self.templates.get_template(template).render(**context).encode("utf-8")
        return response

    def _static(self, name: str) -> Response:
        found = self.static.get(name)
        if found is None:
            return text(404, "not found")
        body, kind = found
        return Response(200, body, kind, cache="public, max-age=3600")

    def _previews_of(self, job_id: int) -> dict[str, bool]:
        """Which previews a job has: each looked for as it would be served (regular file, no link)."""
        shown = {}
        for kind in KINDS:
            found = self._open_preview(job_id, kind)
            shown[kind] = found is not None
            if found is not None:
                found.close()
        return shown

    def _open_preview(self, job_id: int, kind: str) -> BinaryIO | None:
        return open_preview(self.thumbnails, job_id, kind) if self.thumbnails is not None else None

    def _preview(self, job_id: int, kind: str) -> Response:
        if self.journal.get(job_id) is None:
            return text(404, "no such preview")
        found = self._open_preview(job_id, kind)
        if found is None:
            return text(404, "no such preview")
        with found:
            body = found.read(8 * 1024 * 1024)
        return Response(200, body, "image/jpeg", cache="private, max-age=300")

    # ------------------------------------------------------------------ actions

    def _action(self, request: Request) -> Response:
        if not self._csrf_passes(request):
            log.warning("dashboard.csrf_refused", path=request.path, client=request.client)
            return text(403, "this action needs the form's token: reload the page and try again")
        path = request.path
        if path == "/pause":
            if control.pause_submits(self.journal):
                log.info("dashboard.paused", client=request.client)
            return redirect("/")
        if path == "/resume":
            if control.resume_submits(self.journal):
                log.info("dashboard.resumed", client=request.client)
            return redirect("/")
        if path == "/failed/retry-safe":
            return self._retry([], everything=True)
        match = ACTION_PATH.fullmatch(path)
        if match:
            job = self.journal.get(int(match.group(1)))
            if job is None or not job.final_path:
                return text(404, "no such failed file")
            return self._retry([job.final_path], everything=False)
        if path == "/logout":
            self.sessions.end(request.cookies.get(SESSION_COOKIE))
            return redirect("/login")
        return text(404, "not found")

    def _retry(self, targets: list[str], everything: bool) -> Response:
        try:
            asked = control.request_retries(self.journal, self.failed_dir, targets, everything)
        except RetryError as exc:
            log.info("dashboard.retry_refused", reason=str(exc))
            return redirect("/failed?refused=1")
        log.info("dashboard.retry", requested=[job.id for job in asked.requested],
                 left_out=[job.id for job in asked.possibly_paid])
        # Counts only: the page words the notice itself, so a link cannot make it say anything else.
        return redirect(f"/failed?retried={len(asked.requested)}&left_out={len(asked.possibly_paid)}")
