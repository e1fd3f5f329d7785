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
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
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
from watchdog.observers.api import BaseObserver, EventEmitter
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


WALK_CPU_SHARE = 0.05
"""The most of one core the polling observer's walks may take (the watcher's rescans and a busy day's
work come on top): on a share of tens of thousands of files one walk costs about a tenth of a second
here, more on a small box, and walking it every second would keep the box busy for nothing."""


def walk_pause(interval: float, walk_cpu: float, share: float = WALK_CPU_SHARE) -> float:
    """Seconds to wait before the next walk: `interval`, or longer when the last walk cost `walk_cpu`
    seconds of CPU, so that walking takes at most `share` of a core."""
    return max(interval, walk_cpu / share - walk_cpu)


Listing = dict[str, bool]
"""path -> is a folder, for everything below the polled folder."""


def list_tree(top: str) -> Listing:
    """Every entry below `top`, by name: one scandir pass, no stat (the entry's type comes with it).

    Names are all the watcher needs from a walk: a new file is looked at (stat-ed) and followed by the
    watcher itself, which looks again when its settle time comes, so a file still being written is
    caught then; a file that already has a job is the journal's. Stat-ing every file of a share of
    tens of thousands on every walk, as watchdog's DirectorySnapshot does, costs ten times more.
    Symbolic links are listed, never followed; hidden folders are not entered (the watcher ignores
    what is in them).
    """
    found: Listing = {}
    folders = [top]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                is_dir = entry.is_dir(follow_symlinks=False)
                found[entry.path] = is_dir
                if is_dir and not entry.name.startswith("."):
                    folders.append(entry.path)
    return found


def listing_changes(before: Listing, after: Listing) -> list[FileSystemEvent]:
    """The events between two listings: what was created and what was deleted."""
    events: list[FileSystemEvent] = [DirCreatedEvent(path) if is_dir else FileCreatedEvent(path)
                                     for path, is_dir in after.items() if path not in before]
    events.extend(DirDeletedEvent(path) if before[path] else FileDeletedEvent(path)
                  for path in before.keys() - after.keys())
    return events


class PacedPollingEmitter(EventEmitter):
    """Polls the folder with `list_tree` (new and deleted names), waiting between walks as long as
    `walk_pause` says.

    The CPU a walk costs is this thread's own (time.thread_time), so a share that is merely slow to
    answer does not stretch the pause; only work this machine does.
    """

    def __init__(self, event_queue, watch, timeout: float = 1.0, event_filter=None) -> None:
        super().__init__(event_queue, watch, timeout=timeout, event_filter=event_filter)
        self._listing: Listing = {}
        self._failing = False
        self.last_walk_cpu = 0.0
        self._paced_at: float | None = None

    def on_thread_start(self) -> None:
        started = time.thread_time()
        self._listing = list_tree(self.watch.path)
        self.last_walk_cpu = time.thread_time() - started

    def queue_events(self, timeout: float) -> None:
        pause = walk_pause(timeout, self.last_walk_cpu)
        if pause > timeout and (self._paced_at is None or abs(pause - self._paced_at) > 0.5 * self._paced_at):
            self._paced_at = pause
            log.info("watch.polling_paced", walk_cpu=round(self.last_walk_cpu, 3), interval=round(pause, 2),
                     detail=f"the inbox is walked every {pause:.1f} s instead of {timeout:g} s so that walking "
                            f"it takes at most {WALK_CPU_SHARE:.0%} of a core")
        if self.stopped_event.wait(pause):
            return
        started = time.thread_time()
        try:
            listing = list_tree(self.watch.path)
        except (FileNotFoundError, NotADirectoryError):
            self.queue_event(DirDeletedEvent(self.watch.path))
            self.stop()
            return
        except OSError as exc:  # EIO, ESTALE, EHOSTDOWN: a share briefly away; keep the last listing
            if not self._failing:
                self._failing = True
                log.warning("watch.polling_failed", inbox=self.watch.path, error=exc.strerror or str(exc),
                            detail="walked again after the next pause; nothing is dropped meanwhile")
            return
        self._failing = False
        for event in listing_changes(self._listing, listing):
            self.queue_event(event)
        self._listing = listing
        self.last_walk_cpu = time.thread_time() - started


class PacedPollingObserver(PollingObserverVFS):
    """A polling observer with `PacedPollingEmitter` (a PollingObserverVFS to whoever asks its kind)."""

    def __init__(self, *, polling_interval: float) -> None:
        BaseObserver.__init__(self, PacedPollingEmitter, timeout=polling_interval)


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
        observer: BaseObserver = PacedPollingObserver(polling_interval=interval)
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
