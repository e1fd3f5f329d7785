"""When a file is complete: the settle check, as pure bookkeeping over an injected clock.

The watcher feeds it what it sees (stats, write and close events, the kernel's word on writes opened
before the watch began) and takes back the files that have settled. No I/O happens here, so every
ordering of events and stats can be tested by table.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Sighting:
    """A settled file, ready to become a job."""

    rel_path: str
    size: int
    mtime_ns: int
    waited: float


@dataclass
class _Candidate:
    size: int | None
    """None until the file's first stat: a write event may come before it."""
    mtime_ns: int | None
    stable_since: float
    first_seen: float
    writing: bool = False
    last_event: float = 0.0
    version: int = 0
    """Bumped on every change; a deadline queued for an older version is stale."""


class SettleTracker:
    """Decides when a file is complete; pure bookkeeping over an injected clock, no I/O.

    A file is settled when its (size, mtime) has not changed for `settle_seconds` and, where the
    observer reports close-after-write, no write is left open: a write is open from an IN_MODIFY
    (or the kernel's word) until an IN_CLOSE_WRITE, whichever order events and stats come in. A
    write still open after `open_write_limit` seconds of silence is assumed lost (a missed close
    event) and settles normally.

    Deadlines wait in a heap, so a pass costs what is due, not what is tracked: `due` names the
    files whose settle time has come (to be looked at once more), `settled` those that are complete.
    """

    def __init__(self, settle_seconds: float, open_write_limit: float) -> None:
        self.settle_seconds = settle_seconds
        self.open_write_limit = open_write_limit
        self._files: dict[str, _Candidate] = {}
        self._deadlines: list[tuple[float, int, str, int]] = []
        """(settle time, tie-break, path, version): one entry per change, stale ones skipped."""
        self._order = itertools.count()
        self._ripe: set[str] = set()
        """Files whose settle time has passed with no change since: settled, or waiting for a stat."""

    def __contains__(self, rel_path: str) -> bool:
        return rel_path in self._files

    def __len__(self) -> int:
        return len(self._files)

    def observe(self, rel_path: str, size: int, mtime_ns: int, now: float, quiet_for: float = 0.0) -> None:
        """Record a stat of the file; any change restarts its settle clock.

        `quiet_for`: seconds the file is known to have been unchanged already when first seen (the
        kernel said no write is open and its mtime is that old), counted toward the settle time.
        """
        current = self._files.get(rel_path)
        if current is None:
            stable_since = now - max(0.0, min(quiet_for, self.settle_seconds))
            self._schedule(rel_path, _Candidate(size, mtime_ns, stable_since, now))
        elif (current.size, current.mtime_ns) != (size, mtime_ns):
            current.size, current.mtime_ns, current.stable_since = size, mtime_ns, now
            self._schedule(rel_path, current)

    def write_opened(self, rel_path: str, now: float) -> None:
        """A write is open; remembered even before the file's first stat, which fills in the rest."""
        candidate = self._files.get(rel_path) or _Candidate(None, None, now, now)
        candidate.writing, candidate.last_event, candidate.stable_since = True, now, now
        self._schedule(rel_path, candidate)

    def open_before_watch(self, rel_path: str, last_change: float) -> None:
        """The file may have a write open from before the watch began, unseen by any event: hold it as
        an open write that went silent at `last_change` (its mtime), until a close or the limit."""
        candidate = self._files.get(rel_path)
        if candidate is not None and not candidate.writing:
            candidate.writing, candidate.last_event = True, last_change
            self._schedule(rel_path, candidate)

    def write_closed(self, rel_path: str, now: float) -> None:
        candidate = self._files.get(rel_path)
        if candidate is not None:
            candidate.writing, candidate.last_event = False, now
            self._schedule(rel_path, candidate)

    def forget(self, rel_path: str) -> None:
        self._files.pop(rel_path, None)  # its queued deadlines go stale
        self._ripe.discard(rel_path)

    def _schedule(self, rel_path: str, candidate: _Candidate) -> None:
        candidate.version += 1
        self._files[rel_path] = candidate
        self._ripe.discard(rel_path)
        heapq.heappush(self._deadlines, (self._settles_at(candidate), next(self._order), rel_path, candidate.version))

    def _is_current(self, rel_path: str, version: int) -> bool:
        candidate = self._files.get(rel_path)
        return candidate is not None and candidate.version == version

    def _ripen(self, now: float) -> None:
        """Move the files whose settle time has come from the heap to the ripe set."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, rel_path, version = heapq.heappop(self._deadlines)
            if self._is_current(rel_path, version):
                self._ripe.add(rel_path)

    def _settles_at(self, c: _Candidate) -> float:
        settles_at = c.stable_since + self.settle_seconds
        return max(settles_at, c.last_event + self.open_write_limit) if c.writing else settles_at

    def due(self, now: float) -> list[str]:
        """The files whose settle time has come: each is looked at once more before it is taken."""
        self._ripen(now)
        return sorted(self._ripe)

    def settled(self, now: float) -> list[Sighting]:
        """The files that are complete now, longest seen first; the caller `forget`s those it takes."""
        self._ripen(now)
        ready = [Sighting(p, c.size, c.mtime_ns, now - c.first_seen)
                 for p in self._ripe if (c := self._files[p]).size is not None]
        return sorted(ready, key=lambda s: (-s.waited, s.rel_path))

    def next_deadline(self, now: float) -> float | None:
        """The earliest time a tracked file could settle, for the caller's sleep; `now` when some
        already have (the caller has work left, e.g. more settled files than it takes in a pass)."""
        self._ripen(now)
        if self._ripe:
            return now
        while self._deadlines and not self._is_current(self._deadlines[0][2], self._deadlines[0][3]):
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None
