"""What a person asks of the running daemon: pause submits, resume them, send failed files again.

The CLI and the dashboard ask through these functions, and the daemon's loop carries the requests
out between its own steps: the request is a row in the journal, so it survives a restart, and the
process asking never races the watcher or the scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .journal import Job, Journal
from .retry import select_failed

PAUSED_BY_PERSON = "paused by a person"
"""The pause reason `status`, the log and the dashboard show while a person has paused submits."""

PAUSE_META = "paused_by_person"
"""Journal meta key: the wall time a person paused submits at; absent while they are not paused."""

DAEMON_PAUSE_META = "paused"
"""Journal meta key: why the daemons hold submits by themselves (the provider's refusal, a budget limit
reached), for `status`; absent while they do not."""


def pause_submits(journal: Journal, now: float | None = None) -> bool:
    """Pause new submits (jobs already at the provider finish); False if they were paused already."""
    if journal.get_meta(PAUSE_META) is not None:
        return False
    journal.set_meta(PAUSE_META, repr(time.time() if now is None else now))
    return True


def resume_submits(journal: Journal) -> bool:
    """Let submits go on; False if no person had paused them (a pause for an empty wallet stays)."""
    if journal.get_meta(PAUSE_META) is None:
        return False
    journal.set_meta(PAUSE_META, None)
    return True


def paused_by_person_since(journal: Journal) -> float | None:
    """When a person paused submits, or None."""
    value = journal.get_meta(PAUSE_META)
    try:
        return float(value) if value is not None else None
    except ValueError:  # written by hand: still a pause
        return 0.0


@dataclass(frozen=True)
class RetryRequest:
    """What a retry request asked for: the jobs sent to the daemon, and those left out as possibly paid."""

    requested: list[Job]
    possibly_paid: list[Job]


def request_retries(journal: Journal, failed_dir: Path, targets: list[str], everything: bool) -> RetryRequest:
    """Ask the running daemon to send failed files again, with `codeformer-daemon retry`'s rules.

    `targets` name files in failed/; `everything` takes every failed file except those that may
    already have been paid for. Raises RetryError naming any target that is not a failed file.
    """
    jobs, possibly_paid = select_failed(journal, failed_dir, targets, everything)
    if jobs:
        journal.request_retry([job.id for job in jobs])
    return RetryRequest(jobs, possibly_paid)
