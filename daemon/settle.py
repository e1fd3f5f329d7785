"""When a file is complete: the settle check, as pure bookkeeping over an injected clock.

The watcher feeds it what it sees (stats, write and close events, the kernel's word on writes opened
before the watch began) and takes back the files that have settled. No I/O happens here, so every
ordering of events and stats can be tested by table.
"""

from __future__ import annotations

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


class SettleTracker:
    """Decides when a file is complete; pure bookkeeping over an injected clock, no I/O.

    A file is settled when its (size, mtime) has not changed for `settle_seconds` and, where the
    observer reports close-after-write, no write is left open: a write is open from an IN_MODIFY
    (or the kernel's word) until an IN_CLOSE_WRITE, whichever order events and stats come in. A
    write still open after `open_write_limit` seconds of silence is assumed lost (a missed close
    event) and settles normally.
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
        """A write is open; remembered even before the file's first stat, which fills in the rest."""
        candidate = self._files.setdefault(rel_path, _Candidate(None, None, now, now))
        candidate.writing, candidate.last_event, candidate.stable_since = True, now, now

    def open_before_watch(self, rel_path: str, last_change: float) -> None:
        """The file may have a write open from before the watch began, unseen by any event: hold it as
        an open write that went silent at `last_change` (its mtime), until a close or the limit."""
        candidate = self._files.get(rel_path)
        if candidate is not None and not candidate.writing:
            candidate.writing, candidate.last_event = True, last_change

    def write_closed(self, rel_path: str, now: float) -> None:
        candidate = self._files.get(rel_path)
        if candidate is not None:
            candidate.writing, candidate.last_event = False, now

    def forget(self, rel_path: str) -> None:
        self._files.pop(rel_path, None)

    def paths(self) -> list[str]:
        return list(self._files)

    def _is_settled(self, c: _Candidate, now: float) -> bool:
        return c.size is not None and now >= self._settles_at(c)

    def _settles_at(self, c: _Candidate) -> float:
        settles_at = c.stable_since + self.settle_seconds
        return max(settles_at, c.last_event + self.open_write_limit) if c.writing else settles_at

    def settled(self, now: float) -> list[Sighting]:
        """The files that are complete now; the caller `forget`s those it takes."""
        return [Sighting(p, c.size, c.mtime_ns, now - c.first_seen)
                for p, c in self._files.items() if self._is_settled(c, now)]

    def next_deadline(self, now: float) -> float | None:
        """The earliest future time a tracked file could settle, for the caller's sleep.

        Files already settled are left out: they are either handed back on this pass or wait for
        their job to end, and counting them would make the caller spin.
        """
        times = [t for c in self._files.values() if (t := self._settles_at(c)) > now]
        return min(times) if times else None
