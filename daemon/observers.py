"""watchdog observers: which kind watches the inbox, starting one, and telling whether it still runs.

inotify ('events') reports a file the moment it is written and closed, but only for changes made
through this machine's kernel; polling walks the inbox every interval and sees every change, also
those another computer makes on a share. Either way the watcher's rescans back them up.
What inotify cannot report, a write opened before the watch began, `open_for_writing` asks the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import signal
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from .mounts import needs_polling

log = structlog.get_logger("daemon.observers")

WATCH_MODES = ("auto", "events", "polling")

START_FAILURE_FIXES = {
    errno.ENOSPC: "raise fs.inotify.max_user_watches (sysctl); until then the inbox is polled",
    errno.EMFILE: "raise fs.inotify.max_user_instances (sysctl) or the open-files limit",
}
"""What to tell the operator when an observer cannot start with this errno."""


def choose_observer(mode: str, fstype: str | None) -> str:
    """'events' (inotify) or 'polling', for `watch.mode` and the type of the inbox's file system.

    `auto` polls where other machines change files without an inotify event (shares, FUSE); an
    unknown type gets events, and the periodic rescan covers whatever they miss.
    """
    if mode not in WATCH_MODES:
        raise ValueError(f"unknown watch mode {mode!r}, allowed: {', '.join(WATCH_MODES)}")
    if mode != "auto":
        return mode
    return "polling" if fstype is not None and needs_polling(fstype) else "events"


def polling_interval(settle_seconds: float) -> float:
    """Seconds between the polling observer's walks of the inbox: half the settle time, 0.25 to 1 s.

    A new file is then noticed well within one settle period, and a share is walked at most about
    four times a second even with a tiny settle time (once a second with the default 2 s).
    """
    return min(1.0, max(0.25, settle_seconds / 2))


HANDLED_EVENTS = [FileModifiedEvent, FileCreatedEvent, FileAttribEvent, FileClosedEvent, FileMovedEvent,
                  DirMovedEvent, DirCreatedEvent, FileDeletedEvent]
"""What `QueueingHandler` acts on, and all the observer is asked for: inotify then leaves opens and
read-only closes out, so reading an inbox file (the daemon's own rescans and preflight, a backup or
an indexer on a NAS) no longer wakes the observer's threads for events that would be dropped."""


class QueueingHandler(FileSystemEventHandler):
    """Runs on the observer thread: only queues what happened and wakes the main loop."""

    def __init__(self, events: queue.SimpleQueue, wake: Callable[[], None], *, reports_close: bool) -> None:
        self._events = events
        self._wake = wake
        self._reports_close = reports_close

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Only IN_MODIFY means bytes are being written (and a close will follow); a created or
        # moved-in file may be complete already, and attribute changes are not writes. A polling
        # observer never reports a close, so its "modified" is only a change to look at. IN_OPEN
        # and IN_CLOSE_NOWRITE are left out: an open does not say whether it is for writing, and
        # readers (the daemon's own `open_for_writing` among them) open files too.
        if isinstance(event, FileModifiedEvent) and self._reports_close:
            self._events.put(("write", os.fsdecode(event.src_path)))
        elif isinstance(event, FileModifiedEvent):
            self._events.put(("appeared", os.fsdecode(event.src_path)))
        elif isinstance(event, (FileCreatedEvent, FileAttribEvent)):
            self._events.put(("appeared", os.fsdecode(event.src_path)))
        elif isinstance(event, FileClosedEvent):
            self._events.put(("closed", os.fsdecode(event.src_path)))
        elif isinstance(event, (FileMovedEvent, DirMovedEvent)):
            self._events.put(("gone", os.fsdecode(event.src_path)))
            self._events.put(("appeared", os.fsdecode(event.dest_path)))
        elif isinstance(event, DirCreatedEvent):
            self._events.put(("appeared", os.fsdecode(event.src_path)))
        elif isinstance(event, FileDeletedEvent):
            self._events.put(("gone", os.fsdecode(event.src_path)))
        else:
            return
        self._wake()


def open_for_writing(path: Path) -> bool | None:
    """Whether any process has `path` open for writing now, or None when the kernel will not say.

    inotify reports writes, not opens made before the watch began: a scanner that opened the file
    before the daemon started and pauses between chunks looks finished. A read lease can only be
    taken while no one has the file open for writing (EAGAIN), so taking one and giving it back at
    once answers that. It needs the file's owner or CAP_LEASE (else EACCES) and a file system that
    keeps leases (else EINVAL): None then. Only asked on local file systems (a share's "open" is
    another machine's secret, and CIFS answers EAGAIN for any file without an oplock).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # unreadable (or gone): waiting would not help, preflight explains it in failed/
    try:
        # A writer opening the file in the instant the lease is held breaks it with a signal, SIGIO by
        # default, which would end the process: ask for one that is ignored unless handled.
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None
    else:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def start_observer(kind: str, inbox: Path, handler: FileSystemEventHandler, interval: float) -> BaseObserver:
    """A running watchdog observer of `kind` ('events' or 'polling') on the inbox, recursively.

    Raises OSError when it cannot start (for inotify: the watch or instance limit, ENOSPC/EMFILE);
    whatever it had started is stopped again. The polling observer stats with `lstat`, so a
    symlinked folder in the inbox is not walked (a link to / would be walked every second).
    """
    if kind == "polling":
        observer: BaseObserver = PollingObserverVFS(os.lstat, os.scandir, polling_interval=interval)
    else:
        observer = Observer()
    try:
        observer.schedule(handler, str(inbox), recursive=True, event_filter=HANDLED_EVENTS)
        observer.start()
    except BaseException:
        with contextlib.suppress(Exception):
            observer.stop()
        raise
    return observer


def dead_thread(observer: BaseObserver) -> str | None:
    """Which of the observer's threads has stopped ('observer', 'emitter', 'inotify reader'), or None."""
    if not observer.is_alive():
        return "observer"
    emitters = list(observer.emitters)
    if not emitters or not all(emitter.is_alive() for emitter in emitters):
        return "emitter"
    reader = getattr(observer, "_inotify_fd", None)  # watchdog's inotify reading thread (not public API)
    if reader is not None and not reader.is_alive():
        return "inotify reader"
    return None


def stop_quietly(observer: BaseObserver) -> None:
    """Stop and join an observer that may be broken already; its failure must not stop its replacement."""
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except Exception as exc:  # noqa: BLE001
        log.debug("watch.observer_stop_failed", error=f"{type(exc).__name__}: {exc}")
