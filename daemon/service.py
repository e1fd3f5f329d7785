"""The daemon assembled from its configuration: the one place that knows every component.

`Service` opens the journal, takes the single-instance lock, starts the host and the watcher, runs
the scheduler until asked to stop, then shuts everything down in order within `shutdown_timeout`.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import structlog

from . import __version__
from .api import ApiClient
from .config import Config, ConfigError, Secret, resolve_api_key
from .hosting import HostingAdapter, HostingError, create_adapter
from .journal import Journal, JournalError
from .logging import register_secret
from .outbox import Folders
from .scheduler import Scheduler
from .stages import Context
from .watcher import InboxWatcher

log = structlog.get_logger("daemon.service")

JOURNAL_NAME = "journal.sqlite3"
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


class Service:
    """One running daemon. `start()`, then `run()` (blocks), `stop()` from anywhere."""

    def __init__(self, config: Config, api_key: Secret, *, host: HostingAdapter | None = None) -> None:
        self.config = config
        register_secret(api_key.reveal())
        self.api_key = api_key
        self.host = host or create_adapter(config)
        self.journal: Journal | None = None
        self.scheduler: Scheduler | None = None
        self.watcher: InboxWatcher | None = None
        self._lock_fd: int | None = None
        self._stop_requested_at: float | None = None

    def start(self) -> None:
        config = self.config
        prepare_folders(config)
        self._take_lock()
        try:
            self.journal = Journal(journal_path(config))
        except JournalError as exc:
            raise StartupError(str(exc)) from None
        try:
            self.host.start()
        except HostingError as exc:
            raise StartupError(str(exc)) from None
        folders = Folders(config.folders.outbox, config.folders.archive, config.folders.failed)
        ctx = Context(config=config, journal=self.journal, host=self.host, api=ApiClient(config.api, self.api_key),
                      folders=folders, inbox=config.folders.inbox, staging=config.state_dir / "staging")
        wake = threading.Event()
        self.watcher = InboxWatcher(config.folders.inbox, settle_seconds=config.watch.settle_seconds,
                                    rescan_seconds=config.watch.rescan_seconds, ignore=config.watch.ignore,
                                    mode=config.watch.mode, wake=wake.set)
        self.scheduler = Scheduler(ctx, self.watcher, wake=wake)
        self.scheduler.reload_hook = self.reload_key
        self.watcher.start()
        self.journal.set_meta("pid", str(os.getpid()))
        log.info("daemon.ready", version=__version__, inbox=str(config.folders.inbox),
                 outbox=str(config.folders.outbox), adapter=self.host.name,
                 max_in_flight=config.api.max_in_flight, restore=config.restore.as_request())

    def _take_lock(self) -> None:
        fd = try_instance_lock(self.config.state_dir)
        if fd is None:
            raise StartupError(f"another codeformer-daemon is already running with state_dir {self.config.state_dir}")
        self._lock_fd = fd

    def run(self) -> bool:
        """Run until `stop()`; then shut down. Returns True if every running stage finished in time."""
        assert self.scheduler is not None, "start() first"
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
        """For the SIGHUP handler: only sets a flag (no locks); the loop reloads within half a second."""
        if self.scheduler is not None:
            self.scheduler.request_reload()

    def reload_key(self) -> None:
        """Read the API key again from where it comes from; a broken source keeps the old key."""
        try:
            key = resolve_api_key(self.config)
        except ConfigError as exc:
            log.error("daemon.reload_failed", error=str(exc), detail="still using the key read earlier")
            return
        register_secret(key.reveal())
        changed = key != self.api_key
        self.api_key = key
        self.scheduler.ctx.api.set_key(key)
        log.info("daemon.reloaded", key_source=key.source, key_changed=changed)

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
        log.info("daemon.stopping", shutdown_timeout=self.config.shutdown_timeout)
        budget = max(0.5, self.config.shutdown_timeout - (time.monotonic() - started) - 1.0)
        if self.watcher is not None:
            self.watcher.stop()
        clean = self.scheduler.drain(budget) if self.scheduler else True
        self.host.stop()
        if self.scheduler is not None:
            self.scheduler.ctx.api.close()
        if self.journal is not None:
            self.journal.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("daemon.stopped", clean=clean, took=round(time.monotonic() - started, 3))
        return clean
