"""Serving the dashboard: waitress on a thread of its own, started and stopped with the daemon.

waitress is a production WSGI server in pure Python: request parsing, keep-alive, limits on
headers and bodies, and a small worker pool, with nothing to compile for a Raspberry Pi.
"""

from __future__ import annotations

import threading
from pathlib import Path

import structlog

from ..config import parse_listen
from .app import DashboardApp

log = structlog.get_logger("daemon.dashboard")

WORKER_THREADS = 4
"""Requests served at once: a page and its previews, a person or two and a Prometheus looking."""
LOOP_TIMEOUT_SECONDS = 30
"""waitress's own loop wakes this often while idle, to close connections idle for CHANNEL_TIMEOUT: a
station's dashboard is mostly not looked at, and a stop pulls the loop's trigger rather than wait."""
CHANNEL_TIMEOUT = 60


class DashboardServer:
    """The dashboard's listener. `start()` binds (raising OSError if it cannot), `stop()` closes."""

    def __init__(self, app: DashboardApp, listen: str) -> None:
        self.app = app
        self.host, self.port = parse_listen(listen, "dashboard.listen")
        if self.host.lower() == "localhost":  # one address: waitress would serve ::1 and 127.0.0.1 as two servers
            self.host = "127.0.0.1"
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        import waitress.server

        self._server = waitress.server.create_server(
            self.app, host=self.host, port=self.port, threads=WORKER_THREADS, ident="codeformer-daemon",
            asyncore_loop_timeout=LOOP_TIMEOUT_SECONDS, connection_limit=32, channel_timeout=CHANNEL_TIMEOUT,
            max_request_body_size=64 * 1024, expose_tracebacks=False, clear_untrusted_proxy_headers=True)
        self.port = self._server.effective_port
        self._thread = threading.Thread(target=self._server.run, name="dashboard", daemon=True)
        self._thread.start()
        log.info("dashboard.started", url=self.url, login=self.app.token is not None)

    def stop(self, timeout: float = 5.0) -> None:
        server = self._server
        if server is None:
            return
        self._server = None

        def close_everything() -> None:  # on waitress's own thread, between its steps
            for channel in list(server._map.values()):  # open keep-alive connections keep its loop going
                if channel is not server and channel is not server.trigger:
                    channel.close()
            server.close()

        try:
            if self._thread is not None and self._thread.is_alive():
                server.trigger.pull_trigger(close_everything)
                self._thread.join(timeout)
            else:
                close_everything()
            server.task_dispatcher.shutdown(timeout=timeout)
        finally:
            self.app.close()


def start_dashboard(config, journal_store, token: str | None, metrics=None) -> DashboardServer | None:
    """The dashboard as configured, started; None when `dashboard.listen` is null."""
    dashboard = config.dashboard
    if dashboard.listen is None:
        return None
    thumbnails = config.state_dir / "thumbnails" if dashboard.thumbnails else None
    app = DashboardApp(journal_store, config.folders.failed, token=token, thumbnails=thumbnails, metrics=metrics)
    server = DashboardServer(app, dashboard.listen)
    try:
        server.start()
    except BaseException:
        app.close()
        raise
    return server
