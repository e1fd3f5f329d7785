"""Watching the inbox: the watchdog observer, the settle check, and periodic rescans.

A file is taken only once it is complete. Events (inotify's close-after-write where the observer
has it) say *when to look*; the settle check decides: size and mtime unchanged for
`watch.settle_seconds`, and no write left open. Rescans at start-up and every `watch.rescan_seconds`
catch anything an event missed, so a lost event costs a delay, never a file. A file a scan finds
may have been opened for writing before the watch began, which no event shows: the kernel is asked,
and where it will not say, the first scan of a new watch holds recently written files as still open.

The watcher also keeps itself watching (`check_health`): inotify on local disks and polling on
network and FUSE file systems (`watch.mode`), polling when inotify cannot start or its threads die,
and a pause (nothing taken, nothing dropped) while the inbox itself is gone.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import structlog
from watchdog.observers.api import BaseObserver

from .config import FOLDER_SETTINGS_FILE
from .mounts import Mount, mount_gone, mount_of, needs_polling, read_mountinfo
from .observers import (START_FAILURE_FIXES, QueueingHandler, choose_observer, dead_thread, open_for_writing,
                        polling_interval, start_observer, stop_quietly)
from .settle import SettleTracker, Sighting

log = structlog.get_logger("daemon.watcher")

TEMPORARY_SUFFIXES = (".part", ".tmp", ".crdownload")

HEALTH_CHECK_SECONDS = 2.0
"""How often `check_health` really looks (a stat and a few thread flags); calls in between return at once.
The main loop wakes for it, so it is also the idle daemon's pulse: every two seconds, not more."""

HELD_BACK_RETRY_SECONDS = 2.0
"""How often files handed back to `hold_back` are offered again (no stat: a change shows as an event)."""

ActiveJobs = Callable[[Collection[str]], "dict[str, tuple[int, int]]"]
"""Asks the journal which of these paths have an unfinished job: rel_path -> (size, mtime_ns) the
job was taken with. Paths without one are left out. An index lookup per path, never a full read."""


LOOKUP_CHUNK = 500
"""Paths asked about in one journal lookup."""

LOOKS_PER_PASS = 1000
"""Files found new by a scan that are looked at (a stat, the kernel asked about writes) per pass: a
backlog of thousands present at start is taken in steps, and the first ones go out meanwhile."""


def no_jobs(paths: Collection[str]) -> dict[str, tuple[int, int]]:
    return {}


def _lookup(active_jobs: ActiveJobs, paths: list[str]) -> dict[str, tuple[int, int]]:
    """`active_jobs` over `paths`, LOOKUP_CHUNK at a time; nothing asked for no paths."""
    found: dict[str, tuple[int, int]] = {}
    for start in range(0, len(paths), LOOKUP_CHUNK):
        found.update(active_jobs(paths[start:start + LOOKUP_CHUNK]))
    return found


def is_ignored(rel_path: str, patterns: Iterable[str] = ()) -> bool:
    """Names a scanner or copier uses while a file is unfinished, hidden files, folder settings files
    (codeformer.yaml: read for the files beside it, never taken), and user patterns."""
    parts = rel_path.split("/")  # a relative POSIX path, as the watcher makes them (no "." or "" parts)
    if any(part.startswith(".") for part in parts):
        return True
    name = parts[-1]
    if name == FOLDER_SETTINGS_FILE or name.startswith("~") or name.lower().endswith(TEMPORARY_SUFFIXES):
        return True
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel_path, p) for p in patterns)


def probe_inbox(inbox: Path) -> tuple[tuple[int, int] | None, str | None]:
    """The inbox folder's identity (device, inode), or why it cannot be watched now.

    One stat and one access check: cheap enough to run every two seconds.
    """
    try:
        st = os.stat(inbox)
    except OSError as exc:
        return None, f"{inbox}: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return None, f"{inbox} is not a folder"
    if not os.access(inbox, os.R_OK | os.X_OK):
        return None, f"{inbox} is not readable by this user"
    return (st.st_dev, st.st_ino), None


class InboxWatcher:
    """Turns the inbox's events and rescans into settled `Sighting`s for the main loop.

    It never goes blind: `check_health` (run by the main loop on every pass) replaces a dead or
    unstartable inotify observer with a polling one, and pauses while the inbox folder is gone.
    """

    def __init__(self, inbox: Path, *, settle_seconds: float, rescan_seconds: float,
                 ignore: Iterable[str] = (), mode: str = "auto", wake: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 mountinfo: Callable[[], str] = read_mountinfo) -> None:
        choose_observer(mode, None)  # refuse an unknown mode now, not at the first start
        self.inbox = Path(inbox)
        self.mode = mode
        self.rescan_seconds = rescan_seconds
        self.ignore = tuple(ignore)
        self._clock = clock
        self._wake = wake
        self._mountinfo = mountinfo
        self._polling_interval = polling_interval(settle_seconds)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._tracker = SettleTracker(settle_seconds, open_write_limit=max(60.0, 5 * settle_seconds))
        self._observer: BaseObserver | None = None
        self._observer_kind: str | None = None
        self._events_failed = False
        """inotify could not start or died: poll until the inbox is connected afresh."""
        self._new_watch = False
        """inotify has just started: its first full scan may find writes opened before it."""
        self._last_start_error: str | None = None
        self._identity: tuple[int, int] | None = None
        """(device, inode) of the folder being watched: another one at the same path is noticed."""
        self._mount: Mount | None = None
        self._fstype: str | None = None
        self._unavailable_reason: str | None = None
        self._next_health_check = 0.0
        self._next_rescan = 0.0
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._held: dict[str, Sighting] = {}
        """Files that changed while their job was unfinished: offered again once it has ended."""
        self._to_look: dict[str, bool] = {}
        """Files a scan found new, waiting for their first look (path -> found by a new watch's first scan)."""
        self._held_back: dict[str, Sighting] = {}
        """Settled files the caller could not take yet (their folder settings are invalid): offered
        again every `hold_back_seconds`, and at once when a folder settings file changes."""
        self.hold_back_seconds = HELD_BACK_RETRY_SECONDS
        self._next_offer_again = 0.0
        self._settings_changed = False
        """An event named a folder settings file since the held-back files were last offered."""

    @property
    def available(self) -> bool:
        """False while the inbox folder is missing or unreadable: nothing is taken, nothing dropped."""
        return self._unavailable_reason is None

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable_reason

    @property
    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the inbox folder being watched; None while it is unavailable."""
        return self._identity if self.available else None

    @property
    def observer(self) -> BaseObserver | None:
        """The running watchdog observer (None while the inbox is unavailable or none could start)."""
        return self._observer

    @property
    def observer_kind(self) -> str | None:
        """'events' or 'polling', the kind of `observer`."""
        return self._observer_kind

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start watching; the first `take_settled` call also rescans what is already there.

        An inbox missing at this moment is reported, and `check_health` starts watching once it is back.
        """
        identity, problem = self._probe()
        if problem is not None:
            self._lose_inbox(problem)
        else:
            self._connect(identity)

    def stop(self) -> None:
        observer, self._observer, self._observer_kind = self._observer, None, None
        if observer is not None:
            stop_quietly(observer)

    def check_health(self) -> None:
        """Keep watching whatever happened: a dead observer, a vanished or replaced inbox folder.

        Cheap enough for every pass of the main loop: it looks at most every HEALTH_CHECK_SECONDS
        (one stat, a few thread flags; the mount table only when the folder changed identity).
        """
        now = self._clock()
        if now < self._next_health_check:
            return
        self._next_health_check = now + HEALTH_CHECK_SECONDS
        identity, problem = self._probe()
        if problem is not None:
            if self.available:
                self._lose_inbox(problem)
            else:
                self._unavailable_reason = problem  # e.g. first missing, then the mount known gone
            return
        if not self.available:
            log.info("watch.inbox_back", inbox=str(self.inbox), was=self._unavailable_reason, replaced=False)
            self._connect(identity)
            return
        if identity != self._identity:  # never missed, yet the path now leads to another folder
            log.warning("watch.inbox_back", inbox=str(self.inbox), was=None, replaced=True)
            self.stop()
            self._connect(identity)
            return
        if self._observer is None:  # none could start last time: try again, and catch up on what it missed
            self._start_observer()
            if self._observer is not None:
                self.request_rescan()
            return
        dead = dead_thread(self._observer)
        if dead is not None:
            log.error("watch.observer_died", inbox=str(self.inbox), observer=self._observer_kind, thread=dead,
                      fallback="polling", detail="rescanning the inbox so nothing dropped meanwhile is missed")
            self._events_failed = True
            self.stop()
            self._start_observer()
            self.request_rescan()

    def _probe(self) -> tuple[tuple[int, int] | None, str | None]:
        """`probe_inbox`, and when the folder changed identity: is the mount it was on gone?"""
        identity, problem = probe_inbox(self.inbox)
        if problem is None and identity != self._identity and self._mount is not None:
            current = mount_of(os.path.realpath(self.inbox), self._mountinfo())
            if mount_gone(self._mount, current):
                problem = (f"the {self._mount.fstype} file system mounted at {self._mount.mount_point} "
                           "is no longer mounted")
        return identity, problem

    def _connect(self, identity: tuple[int, int] | None) -> None:
        """Watch the inbox folder now at the path: choose the observer afresh, and rescan it."""
        self._mount = mount_of(os.path.realpath(self.inbox), self._mountinfo())
        self._fstype = self._mount.fstype if self._mount else None
        self._identity = identity
        self._unavailable_reason = None
        self._events_failed = False
        self._start_observer()
        self.request_rescan()

    def _lose_inbox(self, reason: str) -> None:
        """The inbox is gone: say so once, stop the observer, keep every tracked file and job."""
        log.error("watch.inbox_unavailable", inbox=str(self.inbox), reason=reason, tracked_files=len(self._tracker),
                  detail="no file is taken and no job dropped until it is back; checked every two seconds")
        self._unavailable_reason = reason
        self.stop()

    def _start_observer(self) -> None:
        """Start the observer the mode asks for; if inotify cannot start, poll instead."""
        wanted = "polling" if self._events_failed else choose_observer(self.mode, self._fstype)
        for kind in (wanted,) if wanted == "polling" else ("events", "polling"):
            handler = QueueingHandler(self._events, self._wake, reports_close=kind == "events")
            try:
                self._observer = start_observer(kind, self.inbox, handler, self._polling_interval)
            except Exception as exc:  # noqa: BLE001 - OSError above all (ENOSPC, EMFILE); rescans go on
                self._observer_failed(kind, exc)
                continue
            self._observer_kind, self._last_start_error = kind, None
            self._new_watch = kind == "events"
            log.info("watch.started", inbox=str(self.inbox), mode=self.mode, fstype=self._fstype, observer=kind,
                     **({"interval": self._polling_interval} if kind == "polling" else {}))
            return

    def _observer_failed(self, kind: str, exc: Exception) -> None:
        """Log why an observer could not start, once per distinct error (it is retried every two seconds)."""
        if kind == "events":
            self._events_failed = True
        error = f"{exc.strerror or exc}" if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        if error != self._last_start_error:
            self._last_start_error = error
            log.error("watch.observer_failed", inbox=str(self.inbox), observer=kind, error=error,
                      fallback="polling" if kind == "events" else "rescans only; retried every two seconds",
                      fix=START_FAILURE_FIXES.get(getattr(exc, "errno", None)))

    # ------------------------------------------------------------------ the main loop's step

    def take_settled(self, active_jobs: ActiveJobs = no_jobs, limit: int | None = None) -> list[Sighting]:
        """Drain events, rescan when due, look at what changed or is due, and hand back settled files.

        The journal is the memory: a file is followed only until it settles, and a file that already
        has an unfinished job (`active_jobs`) is dropped, not tracked. So a pass costs what changed
        (events, files found new by a rescan, settle times that came), never what is in the inbox.
        A file changed after it was taken, while its job is unfinished, is held and offered again
        once that job has ended; one the caller gave back (`hold_back`) is offered again later. At
        most `limit` files are handed back per pass; the rest wait settled for the next pass (the
        caller's sleep sees `next_deadline` is now). While the inbox
        is unavailable nothing is looked at (and nothing forgotten); the rescan when it is back
        catches up.
        """
        if not self.available:
            return []
        now = self._clock()
        with self._lock:
            first_scan = False
            found: set[str] = set()
            if now >= self._next_rescan:
                self._next_rescan = now + self.rescan_seconds
                found, first_scan, self._new_watch = self._scan(self.inbox), self._new_watch, False
            reported, found_below = self._drain_events(now)
            found |= found_below
            # Found by a scan and followed by nothing yet; those with a job are the journal's to know.
            unseen = [p for p in found if p not in self._tracker and p not in self._held and p not in self._to_look
                      and p not in self._held_back]
            with_job = _lookup(active_jobs, unseen)
            for rel_path in unseen:
                if rel_path not in with_job and rel_path not in reported:
                    self._to_look[rel_path] = first_scan
            looked: set[str] = set()
            for rel_path in list(itertools.islice(self._to_look, LOOKS_PER_PASS)):
                self._look_at_unseen(rel_path, now, self._to_look.pop(rel_path))
                looked.add(rel_path)
            for rel_path in reported - looked:
                self._to_look.pop(rel_path, None)
                self._held_back.pop(rel_path, None)  # changed: followed afresh, like any file
                if rel_path in self._tracker:
                    self._stat_into_tracker(rel_path, now)
                else:  # new to the watcher: e.g. renamed in, complete already
                    self._look_at_unseen(rel_path, now, first_scan=False)
                looked.add(rel_path)
            for rel_path in self._tracker.due(now):
                if rel_path not in looked:  # its settle time came: one more look
                    self._stat_into_tracker(rel_path, now)
            self._release_held(active_jobs, now)
            self._offer_again(now)
            return self._hand_back(active_jobs, now, limit)

    def hold_back(self, sightings: Iterable[Sighting]) -> None:
        """Keep settled files the caller cannot take yet (their folder settings are invalid).

        They are offered again every `hold_back_seconds`, and at once when an event names a folder
        settings file; without a stat each time (a file that changes or goes meanwhile raises an
        event, and is then followed afresh like any other), so a thousand held files cost nothing.
        """
        with self._lock:
            for sighting in sightings:
                self._held_back[sighting.rel_path] = sighting
            self._next_offer_again = self._clock() + self.hold_back_seconds

    def _offer_again(self, now: float) -> None:
        """Held-back files back into the tracker as settled, when due: `_hand_back` hands them over."""
        settings_changed, self._settings_changed = self._settings_changed, False
        if not self._held_back or not (settings_changed or now >= self._next_offer_again):
            return
        for rel_path, sighting in self._held_back.items():
            if rel_path not in self._tracker:
                self._tracker.observe(rel_path, sighting.size, sighting.mtime_ns, now,
                                      quiet_for=self._tracker.settle_seconds)
        self._held_back.clear()

    def _hand_back(self, active_jobs: ActiveJobs, now: float, limit: int | None) -> list[Sighting]:
        """The settled files without an unfinished job, at most `limit`; settled files that have one
        are dropped (the journal has them) or held (changed since their job took them)."""
        handed: list[Sighting] = []
        settled = self._tracker.settled(now)
        for start in range(0, len(settled), LOOKUP_CHUNK):
            chunk = settled[start:start + LOOKUP_CHUNK]
            with_job = _lookup(active_jobs, [s.rel_path for s in chunk])
            for sighting in chunk:
                taken_as = with_job.get(sighting.rel_path)
                if taken_as is None:
                    if limit is not None and len(handed) >= limit:
                        return handed
                    handed.append(sighting)
                elif taken_as != (sighting.size, sighting.mtime_ns):
                    self._held[sighting.rel_path] = sighting
                self._tracker.forget(sighting.rel_path)
        return handed

    def _release_held(self, active_jobs: ActiveJobs, now: float) -> None:
        """Held files whose job has ended are looked at afresh (they settle again before they are taken)."""
        if not self._held:
            return
        still = _lookup(active_jobs, list(self._held))
        for rel_path in [p for p in self._held if p not in still]:
            del self._held[rel_path]
            self._stat_into_tracker(rel_path, now)

    def next_deadline(self) -> float:
        """When `take_settled` (or, while the inbox is away, `check_health`) next has something to do:
        now, if settled files are still waiting to be handed back."""
        if not self.available:
            return self._next_health_check
        now = self._clock()
        settle = self._tracker.next_deadline(now)
        if self._to_look:
            return now  # files found by a scan still wait for their first look
        soonest = min(self._next_rescan, self._next_health_check)
        if self._held_back:
            soonest = min(soonest, now if self._settings_changed else self._next_offer_again)
        return min(soonest, settle) if settle is not None else soonest

    def request_rescan(self) -> None:
        self._next_rescan = 0.0
        self._wake()

    # ------------------------------------------------------------------ helpers

    def _relative(self, path: str) -> str | None:
        try:
            return Path(path).relative_to(self.inbox).as_posix()
        except ValueError:
            return None

    def _drain_events(self, now: float) -> tuple[set[str], set[str]]:
        """Apply the queued events: the paths they named, and the files found in folders that appeared
        (written there, maybe, before the folder had its own watch)."""
        reported: set[str] = set()
        found: set[str] = set()
        while True:
            try:
                kind, path = self._events.get_nowait()
            except queue.Empty:
                return reported, found
            if kind == "appeared" and os.path.isdir(path) and not os.path.islink(path):
                found.update(self._scan(Path(path)))
                continue
            rel_path = self._relative(path)
            if rel_path is not None and rel_path.rpartition("/")[2] == FOLDER_SETTINGS_FILE:
                self._settings_changed = True  # held-back files are offered again: it may be fixed
                continue
            if rel_path is None or rel_path == "." or is_ignored(rel_path, self.ignore):
                continue
            if kind == "gone":
                self._tracker.forget(rel_path)
                self._held.pop(rel_path, None)
                self._to_look.pop(rel_path, None)
                self._held_back.pop(rel_path, None)
                continue
            reported.add(rel_path)
            if kind == "write":
                self._tracker.write_opened(rel_path, now)
            elif kind == "closed":
                self._tracker.write_closed(rel_path, now)

    def _scan(self, top: Path) -> set[str]:
        """Every candidate file below `top`; a symlinked folder is a candidate itself, never walked.

        One scandir pass with string paths: names only (d_type says what is a folder), no stat, so a
        rescan of a share of tens of thousands of files costs a listing, not a look at each file.
        """
        found: set[str] = set()
        start = self._relative(str(top))
        if start is None:
            return found
        folders = [(str(top), "" if start == "." else start + "/")]
        while folders:
            folder, prefix = folders.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:  # gone, or unreadable: as os.walk, skipped (the next rescan looks again)
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith("."):
                        folders.append((entry.path, prefix + entry.name + "/"))
                    continue
                rel_path = prefix + entry.name
                if not is_ignored(rel_path, self.ignore):
                    found.add(rel_path)
        return found

    def _lstat(self, rel_path: str) -> os.stat_result | None:
        """The file's lstat if it is a file (or a symbolic link); None, and forgotten, otherwise."""
        try:
            st = os.stat(self.inbox / rel_path, follow_symlinks=False)
        except FileNotFoundError:
            self._tracker.forget(rel_path)  # deleted or renamed before it was taken: forget quietly
            return None
        except OSError as exc:
            self._warn_once(rel_path, "file.unreadable", error=exc.strerror)
            self._tracker.forget(rel_path)  # looked at again by the next rescan, or its next event
            return None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            self._tracker.forget(rel_path)
            return None
        # A symbolic link settles on its own lstat and is handed up like a file: preflight refuses
        # it, so it ends explained in failed/ instead of sitting in the inbox. It is never followed.
        return st

    def _stat_into_tracker(self, rel_path: str, now: float) -> os.stat_result | None:
        """Record the file's lstat in the tracker and return it; None when it is not (or no longer) tracked."""
        st = self._lstat(rel_path)
        if st is not None:
            self._tracker.observe(rel_path, st.st_size, st.st_mtime_ns, now)
        return st

    def _look_at_unseen(self, rel_path: str, now: float, first_scan: bool) -> None:
        """A file a scan found, that nothing follows yet: track it, and ask whether a write is open.

        When the kernel says no write is open, the file's quiet time so far (its mtime's age) counts
        toward the settle time: a backlog present at start need not wait it out once more. A share's
        mtime comes from another machine's clock, and there the kernel is not asked: not counted.
        """
        st = self._lstat(rel_path)
        if st is None:
            return
        is_open = self._kernel_says_open(rel_path, st)
        quiet = max(0.0, time.time() - st.st_mtime_ns / 1e9)
        self._tracker.observe(rel_path, st.st_size, st.st_mtime_ns, now, quiet_for=quiet if is_open is False else 0.0)
        if self._observer_kind == "events" and stat.S_ISREG(st.st_mode):
            self._ask_if_open(rel_path, is_open, quiet, now, first_scan)

    def _kernel_says_open(self, rel_path: str, st: os.stat_result) -> bool | None:
        """`open_for_writing` where it can answer (a regular file on a local file system, watched by
        inotify); None elsewhere."""
        if self._observer_kind != "events" or not stat.S_ISREG(st.st_mode):
            return None
        if self._fstype is not None and needs_polling(self._fstype):
            return None
        return open_for_writing(self.inbox / rel_path)

    def _ask_if_open(self, rel_path: str, is_open: bool | None, quiet: float, now: float, first_scan: bool) -> None:
        """A file a scan found, with no event about it: is a write open that began before the watch?

        Only where inotify reports closes (with polling the settle time is all there is). The kernel
        is asked on local file systems (`is_open`); where it cannot say, the first scan of a new watch
        holds a file written less than `open_write_limit` ago as still open, until its close is seen
        or that much silence has passed: a delay, never a half-written file.
        """
        if is_open:
            self._tracker.write_opened(rel_path, now)
            log.info("file.still_open", rel_path=rel_path, detail="open for writing, though no event showed a "
                     "write (opened before the watch began); taken once it is closed")
            return
        if is_open is None and first_scan and quiet < self._tracker.open_write_limit:
            self._tracker.open_before_watch(rel_path, now - quiet)
            log.info("file.maybe_open", rel_path=rel_path, written_seconds_ago=round(quiet, 3),
                     wait_at_most=round(self._tracker.open_write_limit - quiet, 3),
                     detail="written just before the watch began and the kernel cannot say if it is still "
                            "open for writing; taken once its close is seen or it has been quiet that long")

    def _warn_once(self, rel_path: str, event: str, **fields: object) -> None:
        if rel_path not in self._warned:
            self._warned.add(rel_path)
            log.warning(event, rel_path=rel_path, **fields)
