"""The daemon assembled from its configuration: the one place that knows every component.

`Service` opens the journal, takes the single-instance lock, starts the host and the watcher, runs
the scheduler until asked to stop, then shuts everything down in order within `shutdown_timeout`.
It also decides what a reload (SIGHUP) may change while running, and tells systemd how it is doing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from . import __version__, memory
from .api import ApiClient
from .config import (Config, ConfigError, LoggingConfig, Secret, load_config, resolve_api_key, resolve_c2pa_key,
                     resolve_dashboard_token)
from .hosting import HostingAdapter, HostingError, create_adapter
from .journal import MOVED_TO_META, Journal, JournalError
from .storage import JOURNAL_NAME, open_store
from .logging import register_secret
from .metrics import Metrics
from .notify import Notifier, Watchdog
from .outbox import Folders
from .scheduler import LOOP_ERROR_PAUSE, MAX_SLEEP, Scheduler
from .stages import Context
from .watcher import InboxWatcher

if TYPE_CHECKING:
    from .dashboard.server import DashboardServer

log = structlog.get_logger("daemon.service")

LOCK_NAME = "daemon.lock"


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to fix."""


def journal_path(config: Config) -> Path:
    return config.state_dir / JOURNAL_NAME


def prepare_folders(config: Config) -> None:
    """Create the folders the daemon writes to and prove it may write there; StartupError says which not."""
    try:
        for folder in (config.state_dir, config.folders.outbox, config.folders.archive, config.folders.failed):
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise StartupError(f"{folder} is not writable by this user")
    except OSError as exc:
        raise StartupError(f"cannot create {exc.filename}: {exc.strerror}") from None


def try_instance_lock(state_dir: Path) -> int | None:
    """Take the one-daemon-per-state_dir lock: its file descriptor, or None if a daemon holds it.

    Two daemons on one state_dir would submit the same files twice. The lock is released when
    the descriptor is closed (or the process dies, even by SIGKILL).
    """
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def signing_key(config: Config) -> Path | None:
    """The key that signs outputs with content credentials, once the certificate is known to be usable.

    A certificate C2PA would refuse (self-signed above all) stops the start with the reason, rather
    than failing every delivery; None when output.c2pa is not configured.
    """
    key = resolve_c2pa_key(config)
    if key is None:
        return None
    from .output.credentials import certificate_problem  # the [c2pa] extra, checked by the configuration

    problem = certificate_problem(config.output.c2pa.certificate, key)
    if problem is not None:
        raise StartupError(f"output.c2pa.certificate: {problem}")
    return key


def reloaded_config(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration a reload puts in force, and the changed keys it leaves for a restart.

    What is read afresh for each new job or check applies at once: `restore`, `output` and `profiles`
    (for files taken from now on; a job keeps the parameters and output settings recorded when it was
    taken), output signing (for results delivered from now on; a new key is checked first),
    `preflight`, `logging`, `budget` (its limits
    at the next submit), `shutdown_timeout`, and `api.api_key_file` (the key). The rest is wired into
    parts that are running (folders and state_dir, the watcher, the host and its listening socket, the
    dashboard and its listener, the HTTP client's timeouts, the scheduler's slots and poll clock): it
    keeps its old value until a restart, as does `state` (the journal's database).
    """
    applied = dataclasses.replace(new, folders=old.folders, state_dir=old.state_dir, state=old.state, hosting=old.hosting,
                                  watch=old.watch, dashboard=old.dashboard,
                                  api=dataclasses.replace(old.api, api_key_file=new.api.api_key_file))
    return applied, list(config_changes(applied, new))


def config_changes(old: Config, new: Config) -> dict[str, list[Any]]:
    """Dotted keys whose value differs, with [old, new] (the configuration holds no secrets)."""
    before, after = _flatten(dataclasses.asdict(old)), _flatten(dataclasses.asdict(new))
    return {key: [before.get(key), after.get(key)] for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)}


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value) if isinstance(value, Path) else value
    return flat


def loop_stale_after(ping_interval: float) -> float:
    """How long ago the scheduler's last pass may be for the watchdog still to ping.

    A healthy loop passes at least every MAX_SLEEP, and every LOOP_ERROR_PAUSE + MAX_SLEEP while
    its passes fail; one more MAX_SLEEP allows for a slow pass. With a longer ping interval the
    rule is "it passed since about the previous ping", so a slow moment never costs a ping.
    """
    return max(ping_interval, LOOP_ERROR_PAUSE + 2 * MAX_SLEEP)


class Service:
    """One running daemon. `start()`, then `run()` (blocks), `stop()` from anywhere."""

    def __init__(self, config: Config, api_key: Secret, *, host: HostingAdapter | None = None,
                 config_path: str | Path | None = None,
                 configure_logging: Callable[[LoggingConfig], None] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.config_path = Path(config_path).resolve() if config_path is not None else None
        """The file a reload reads again; None: a reload re-reads only the key."""
        self.configure_logging = configure_logging
        """Applies a changed `logging` section on reload (the CLI owns the logging set-up)."""
        self.notifier = notifier or Notifier()
        self._watchdog: Watchdog | None = None
        register_secret(api_key.reveal())
        self.api_key = api_key
        self.host = host or create_adapter(config)
        self.journal: Journal | None = None
        self.metrics: Metrics | None = None
        """What /metrics serves (the dashboard's); built with the journal it reads at each scrape."""
        self.scheduler: Scheduler | None = None
        self.watcher: InboxWatcher | None = None
        self.dashboard: DashboardServer | None = None
        self._lock_fd: int | None = None
        self._stop_requested_at: float | None = None

    def start(self) -> None:
        config = self.config
        try:
            c2pa_key = signing_key(config)
            dashboard_token = resolve_dashboard_token(config)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        if dashboard_token is not None:
            register_secret(dashboard_token.reveal())
        prepare_folders(config)
        memory.configure(config.preflight.max_decode_mb)
        self._take_lock()
        try:
            self.journal = Journal(open_store(config))
            moved_to = self.journal.get_meta(MOVED_TO_META) if not self.journal.store.shared else None
            if moved_to:
                raise StartupError(f"the journal in {config.state_dir} was copied to the PostgreSQL journal at "
                                   f"{moved_to} by migrate-state; set state.backend: postgresql (starting on the "
                                   "old one would send its waiting files a second time)")
            self.journal.join(config.state.node_name, config.state.postgresql.lease_seconds)
        except (JournalError, ConfigError) as exc:
            raise StartupError(str(exc)) from None
        try:
            self.host.start()
        except HostingError as exc:
            raise StartupError(str(exc)) from None
        folders = Folders(config.folders.outbox, config.folders.archive, config.folders.failed)
        ctx = Context(config=config, journal=self.journal, host=self.host, api=ApiClient(config.api, self.api_key),
                      folders=folders, inbox=config.folders.inbox, staging=config.state_dir / "staging",
                      c2pa_key=c2pa_key, metrics=Metrics(self.journal))
        self.metrics = ctx.metrics
        wake = threading.Event()
        self.watcher = InboxWatcher(config.folders.inbox, settle_seconds=config.watch.settle_seconds,
                                    rescan_seconds=config.watch.rescan_seconds, ignore=config.watch.ignore,
                                    mode=config.watch.mode, wake=wake.set)
        self.scheduler = Scheduler(ctx, self.watcher, wake=wake)
        self.scheduler.reload_hook = self.reload
        if self.notifier.enabled:
            self.scheduler.status_hook = self.notifier.status
        self.watcher.start()
        self.journal.set_meta("pid", str(os.getpid()))
        self.dashboard = self._start_dashboard(dashboard_token)
        log.info("daemon.ready", version=__version__, inbox=str(config.folders.inbox),
                 outbox=str(config.folders.outbox), adapter=self.host.name, journal=str(self.journal.store),
                 max_in_flight=config.api.max_in_flight, restore=config.restore.as_request())

    def _start_dashboard(self, token: Secret | None) -> DashboardServer | None:
        """The dashboard, if configured. A port it cannot have is logged, not fatal: restoring goes on."""
        from .dashboard.server import start_dashboard

        try:
            return start_dashboard(self.config, open_store(self.config), token.reveal() if token else None,
                                   metrics=self.metrics.render if self.metrics is not None else None)
        except OSError as exc:
            log.error("dashboard.unavailable", listen=self.config.dashboard.listen,
                      error=exc.strerror or str(exc),
                      fix="free that port or set dashboard.listen to another one (null turns the dashboard off), "
                          "then restart; restoring goes on meanwhile")
            return None

    def _take_lock(self) -> None:
        fd = try_instance_lock(self.config.state_dir)
        if fd is None:
            raise StartupError(f"another codeformer-daemon is already running with state_dir {self.config.state_dir}")
        self._lock_fd = fd

    def run(self) -> bool:
        """Run until `stop()`; then shut down. Returns True if every running stage finished in time."""
        assert self.scheduler is not None, "start() first"
        # READY=1 here, not at the end of start(): the CLI installs its signal handlers in between,
        # and the reload (SIGHUP) systemd may send once it hears READY=1 must find them.
        self.notifier.ready()
        self._start_watchdog()
        try:
            self.scheduler.run()
        finally:
            clean = self._shutdown()
        return clean

    def request_stop(self) -> None:
        """For signal handlers: only set flags (no locks, no logging); `run()` returns within a pass."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        if self.scheduler is not None:
            self.scheduler.request_stop()

    def request_reload(self) -> None:
        """For the SIGHUP handler: only sets a flag (no locks); the signal wakes the loop, which reloads at once."""
        if self.scheduler is not None:
            self.scheduler.request_reload()

    def reload(self) -> None:
        """SIGHUP, run on the loop's thread: read the configuration file and the key again.

        All or nothing: a file or key that does not validate changes nothing (`daemon.reload_failed`).
        Jobs already taken keep their restore parameters; see `reloaded_config` for what applies.
        """
        self.notifier.reloading()
        try:
            self._reload()
        finally:
            self.notifier.ready()  # also after a refused reload: the daemon runs on, as it was

    def _reload(self) -> None:
        try:
            fresh = load_config(self.config_path) if self.config_path is not None else self.config
            key = resolve_api_key(fresh)
            c2pa_key = signing_key(fresh)
        except (ConfigError, StartupError) as exc:
            log.error("daemon.reload_failed", reason=str(exc),
                      detail="nothing changed: still running on the configuration and key read earlier")
            return
        register_secret(key.reveal())
        applied, needs_restart = reloaded_config(self.config, fresh)
        changed = config_changes(self.config, applied)
        logging_changed = applied.logging != self.config.logging
        key_changed = key != self.api_key
        self.config = applied
        self.scheduler.ctx.config = applied  # stages and the scheduler read it afresh for each job
        memory.configure(applied.preflight.max_decode_mb)
        self.scheduler.ctx.c2pa_key = c2pa_key
        self.api_key = key
        self.scheduler.ctx.api.set_key(key)
        if logging_changed and self.configure_logging is not None:
            self.configure_logging(applied.logging)
        if needs_restart:
            log.warning("daemon.restart_needed", keys=needs_restart,
                        detail="changed in the file, but these keep their old values until the daemon "
                               "restarts (systemctl restart codeformer-daemon)")
        log.info("daemon.reloaded", changed=changed, key_source=key.source, key_changed=key_changed)

    def _start_watchdog(self) -> None:
        """Ping systemd's watchdog from a thread of its own while the scheduler's loop keeps passing."""
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        scheduler, stale_after = self.scheduler, loop_stale_after(interval)
        self._watchdog = Watchdog(self.notifier, interval,
                                  alive=lambda: scheduler.is_alive(stale_after))
        self._watchdog.start()

    def stop(self) -> None:
        """Stop taking new files, let in-flight calls finish, and return from `run()`."""
        self.request_stop()
        if self.scheduler is not None:
            self.scheduler.stop()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested_at is not None

    def _shutdown(self) -> bool:
        started = self._stop_requested_at or time.monotonic()
        if self._watchdog is not None:  # the loop has ended; the stop has its own timeout (TimeoutStopSec)
            self._watchdog.stop()
        self.notifier.stopping()
        log.info("daemon.stopping", shutdown_timeout=self.config.shutdown_timeout)
        budget = max(0.5, self.config.shutdown_timeout - (time.monotonic() - started) - 1.0)
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.watcher is not None:
            self.watcher.stop()
        clean = self.scheduler.drain(budget) if self.scheduler else True
        self.host.stop()
        if self.scheduler is not None:
            self.scheduler.ctx.api.close()
        if self.journal is not None:
            if self.journal.store.shared:  # what is left is the others' to take over now, not after the lease
                with contextlib.suppress(JournalError):
                    self.journal.leave()
            self.journal.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("daemon.stopped", clean=clean, took=round(time.monotonic() - started, 3))
        self.notifier.close()
        return clean
