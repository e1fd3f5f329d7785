"""Watching the inbox: the watchdog observer, the settle check, and periodic rescans.

A file is taken only once it is complete. Events (inotify's close-after-write where the observer
has it) say *when to look*; the settle check decides: size and mtime unchanged for
`watch.settle_seconds`, and no write left open. Rescans at start-up and every `watch.rescan_seconds`
catch anything an event missed, so a lost event costs a delay, never a file.
"""

from __future__ import annotations

import fnmatch
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import structlog
from watchdog.events import (
    DirCreatedEvent,
    FileAttribEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

log = structlog.get_logger("daemon.watcher")

TEMPORARY_SUFFIXES = (".part", ".tmp", ".crdownload")


def is_ignored(rel_path: str, patterns: Iterable[str] = ()) -> bool:
    """Names a scanner or copier uses while a file is unfinished, hidden files, and user patterns."""
    parts = PurePosixPath(rel_path).parts
    if any(part.startswith(".") for part in parts):
        return True
    name = parts[-1]
    if name.startswith("~") or name.lower().endswith(TEMPORARY_SUFFIXES):
        return True
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel_path, p) for p in patterns)


@dataclass(frozen=True)
class Sighting:
    """A settled file, ready to become a job."""

    rel_path: str
    size: int
    mtime_ns: int
    waited: float


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float
    first_seen: float
    writing: bool = False
    last_event: float = 0.0


class SettleTracker:
    """Decides when a file is complete; pure bookkeeping over an injected clock, no I/O.

    A file is settled when its (size, mtime) has not changed for `settle_seconds` and, where the
    observer reports close-after-write, no write is left open. A write still open after
    `open_write_limit` seconds of silence is assumed lost (a missed close event) and settles normally.
    """

    def __init__(self, settle_seconds: float, open_write_limit: float) -> None:
        self.settle_seconds = settle_seconds
        self.open_write_limit = open_write_limit
        self._files: dict[str, _Candidate] = {}

    def __contains__(self, rel_path: str) -> bool:
        return rel_path in self._files

    def __len__(self) -> int:
        return len(self._files)

    def observe(self, rel_path: str, size: int, mtime_ns: int, now: float) -> None:
        """Record a stat of the file; any change restarts its settle clock."""
        current = self._files.get(rel_path)
        if current is None:
            self._files[rel_path] = _Candidate(size, mtime_ns, now, now)
        elif (current.size, current.mtime_ns) != (size, mtime_ns):
            current.size, current.mtime_ns, current.stable_since = size, mtime_ns, now

    def write_opened(self, rel_path: str, now: float) -> None:
        candidate = self._files.get(rel_path)
        if candidate is not None:
            candidate.writing, candidate.last_event, candidate.stable_since = True, now, now

    def write_closed(self, rel_path: str, now: float) -> None:
        candidate = self._files.get(rel_path)
        if candidate is not None:
            candidate.writing, candidate.last_event = False, now

    def forget(self, rel_path: str) -> None:
        self._files.pop(rel_path, None)

    def paths(self) -> list[str]:
        return list(self._files)

    def _is_settled(self, c: _Candidate, now: float) -> bool:
        if c.writing and now - c.last_event < self.open_write_limit:
            return False
        return now - c.stable_since >= self.settle_seconds

    def settled(self, now: float) -> list[Sighting]:
        """The files that are complete now; the caller `forget`s those it takes."""
        return [Sighting(p, c.size, c.mtime_ns, now - c.first_seen)
                for p, c in self._files.items() if self._is_settled(c, now)]

    def next_deadline(self, now: float) -> float | None:
        """The earliest future time a tracked file could settle, for the caller's sleep.

        Files already settled are left out: they are either handed back on this pass or wait for
        their job to end, and counting them would make the caller spin.
        """
        times = [t for c in self._files.values() if (t := c.stable_since + self.settle_seconds) > now]
        return min(times) if times else None


class _EventHandler(FileSystemEventHandler):
    """Runs on the observer thread: only queues what happened and wakes the main loop."""

    def __init__(self, events: queue.SimpleQueue, wake: Callable[[], None]) -> None:
        self._events = events
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Only IN_MODIFY means bytes are being written (and a close will follow); a created or
        # moved-in file may be complete already, and attribute changes are not writes.
        if isinstance(event, FileModifiedEvent):
            self._events.put(("write", os.fsdecode(event.src_path)))
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


class InboxWatcher:
    """Turns the inbox's events and rescans into settled `Sighting`s for the main loop."""

    def __init__(self, inbox: Path, *, settle_seconds: float, rescan_seconds: float,
                 ignore: Iterable[str] = (), wake: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inbox = Path(inbox)
        self.rescan_seconds = rescan_seconds
        self.ignore = tuple(ignore)
        self._clock = clock
        self._wake = wake
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._tracker = SettleTracker(settle_seconds, open_write_limit=max(60.0, 5 * settle_seconds))
        self._observer: Observer | None = None
        self._next_rescan = 0.0
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start the observer; the first `take_settled` call also rescans what is already there."""
        observer = Observer()
        observer.schedule(_EventHandler(self._events, self._wake), str(self.inbox), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        log.info("watch.started", inbox=str(self.inbox), observer=type(observer).__name__)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    # ------------------------------------------------------------------ the main loop's step

    def take_settled(self, busy_paths: set[str]) -> list[Sighting]:
        """Drain events, rescan when due, stat what changed, and hand back the settled files.

        `busy_paths` are files that already have an unfinished job. They stay tracked but are not
        handed back until their job has ended, so a file changed after it was taken (and left in the
        inbox) comes back as new work.
        """
        now = self._clock()
        touched: set[str] = set()
        with self._lock:
            if now >= self._next_rescan:
                self._next_rescan = now + self.rescan_seconds
                touched.update(self._scan(self.inbox))
            touched.update(self._drain_events(now))
            for rel_path in touched | set(self._tracker.paths()):
                self._stat_into_tracker(rel_path, now)
            ready = [s for s in self._tracker.settled(now) if s.rel_path not in busy_paths]
            for sighting in ready:
                self._tracker.forget(sighting.rel_path)
        return ready

    def next_deadline(self) -> float:
        """When `take_settled` next has something to do, on the watcher's clock."""
        now = self._clock()
        settle = self._tracker.next_deadline(now)
        return min(self._next_rescan, settle) if settle is not None else self._next_rescan

    def request_rescan(self) -> None:
        self._next_rescan = 0.0
        self._wake()

    # ------------------------------------------------------------------ helpers

    def _relative(self, path: str) -> str | None:
        try:
            return Path(path).relative_to(self.inbox).as_posix()
        except ValueError:
            return None

    def _drain_events(self, now: float) -> set[str]:
        touched: set[str] = set()
        while True:
            try:
                kind, path = self._events.get_nowait()
            except queue.Empty:
                return touched
            if kind == "appeared" and os.path.isdir(path) and not os.path.islink(path):
                touched.update(self._scan(Path(path)))
                continue
            rel_path = self._relative(path)
            if rel_path is None or rel_path == "." or is_ignored(rel_path, self.ignore):
                continue
            if kind == "gone":
                self._tracker.forget(rel_path)
                continue
            touched.add(rel_path)
            if kind in ("write", "closed") and rel_path not in self._tracker:
                self._stat_into_tracker(rel_path, now)
            if kind == "write":
                self._tracker.write_opened(rel_path, now)
            elif kind == "closed":
                self._tracker.write_closed(rel_path, now)

    def _scan(self, top: Path) -> set[str]:
        """Every candidate file below `top`; symlinked folders are not followed."""
        found: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                rel_path = self._relative(os.path.join(dirpath, name))
                if rel_path is not None and not is_ignored(rel_path, self.ignore):
                    found.add(rel_path)
        return found

    def _stat_into_tracker(self, rel_path: str, now: float) -> None:
        try:
            st = os.stat(self.inbox / rel_path, follow_symlinks=False)
        except FileNotFoundError:
            self._tracker.forget(rel_path)  # deleted or renamed before it was taken: forget quietly
            return
        except OSError as exc:
            self._warn_once(rel_path, "file.unreadable", error=exc.strerror)
            return
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISLNK(st.st_mode):
                self._warn_once(rel_path, "file.symlink_skipped")
            self._tracker.forget(rel_path)
            return
        self._tracker.observe(rel_path, st.st_size, st.st_mtime_ns, now)

    def _warn_once(self, rel_path: str, event: str, **fields: object) -> None:
        if rel_path not in self._warned:
            self._warned.add(rel_path)
            log.warning(event, rel_path=rel_path, **fields)
