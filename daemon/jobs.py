"""What the journal keeps: a job's states and their legal moves, the job itself, and the ledger's kinds.

Plain types with no storage in them, so every module can speak of jobs without reaching the journal.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class JobState(str, enum.Enum):
    """Where a job stands. The value is what SQLite stores, so the journal reads plainly."""

    PENDING = "pending"
    """Recorded and waiting for a submit slot (or for its backoff to pass)."""
    PUBLISHING = "publishing"
    """Holds a slot; the file is being checked and published. A crash here just starts over."""
    SUBMITTING = "submitting"
    """Published; the submit request is about to be or is being sent. The one ambiguous window."""
    SUBMITTED = "submitted"
    """The provider accepted it (request_id known); polled until it finishes."""
    DOWNLOADING = "downloading"
    """The provider finished; the result is being fetched into the outbox."""
    DELIVERING = "delivering"
    """The output is in the outbox; the original is being archived and unpublished."""
    FAILING = "failing"
    """The job cannot succeed; the original is being moved to failed/ with its reason."""
    DONE = "done"
    """Restored: output in the outbox, original in the archive."""
    FAILED = "failed"
    """Explained: original in failed/ beside its .error.json (until `retry` sends it again)."""
    VANISHED = "vanished"
    """The file left the inbox before it was sent (deleted or renamed away): nothing to do."""


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.VANISHED})
IN_FLIGHT_STATES = frozenset({JobState.PUBLISHING, JobState.SUBMITTING, JobState.SUBMITTED})
"""States that hold one of the `api.max_in_flight` slots."""
HELD_STATES = frozenset(state for state in JobState if state not in FINAL_STATES and state is not JobState.PENDING)
"""States in which one daemon's run holds the job (its `owner`): the rest are the shared queue or history."""

TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PUBLISHING, JobState.FAILING, JobState.VANISHED}),
    JobState.PUBLISHING: frozenset({JobState.SUBMITTING, JobState.PENDING, JobState.FAILING, JobState.VANISHED,
                                    JobState.DELIVERING}),  # DELIVERING: the result of identical content reused
    JobState.SUBMITTING: frozenset({JobState.SUBMITTED, JobState.PENDING, JobState.FAILING}),
    JobState.SUBMITTED: frozenset({JobState.DOWNLOADING, JobState.PENDING, JobState.FAILING}),
    JobState.DOWNLOADING: frozenset({JobState.DELIVERING, JobState.FAILING}),
    JobState.DELIVERING: frozenset({JobState.DONE}),
    JobState.FAILING: frozenset({JobState.FAILED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.PENDING}),  # `codeformer-daemon retry`
    JobState.VANISHED: frozenset(),
}
"""The legal moves of the state machine; anything else is a bug and raises."""


class StaleTransition(Exception):
    """A compare-and-set found the job no longer in the expected state: someone else moved it."""


class Charge(str, enum.Enum):
    """One line of the ledger of paid submits (table `charges`); the value is what SQLite stores."""

    CHARGED = "charged"
    """The provider accepted a submit: one image paid for."""
    REFUNDED = "refunded"
    """The provider ended that submit with ERROR ("system error - not charged"): it cancels the charge."""
    POSSIBLY_CHARGED = "possibly_charged"
    """A submit whose answer was lost (or cut off by a stop): counted as paid, since it may have been."""


@dataclass(frozen=True)
class Job:
    """One file's journey, as stored in one journal row."""

    id: int
    rel_path: str
    state: JobState
    size: int
    mtime_ns: int
    params: dict[str, Any]
    sha256: str | None = None
    upload_path: str | None = None
    hosted_key: str | None = None
    request_id: str | None = None
    polling_url: str | None = None
    remote_status: str | None = None
    media_url: str | None = None
    output_path: str | None = None
    output_sha256: str | None = None
    """Of the result recorded with `output_path`: after a crash, a file under that name is this job's
    output only if its bytes match (another job may have taken the name meanwhile)."""
    final_path: str | None = None
    submit_attempts: int = 0
    download_attempts: int = 0
    not_before: float = 0.0
    last_error: str | None = None
    error_kind: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    submitted_at: float | None = None
    finished_at: float | None = None
    duplicate_of: int | None = None
    """The earlier job with the same content and parameters whose result this one reused."""
    profile: str | None = None
    """The profile (or folder settings file) whose settings the file was taken with; None: the top level."""
    output_settings: dict[str, Any] | None = None
    """The `output:` settings in force when the file was taken (a profile's merged over the top
    level); None for jobs taken before they were recorded: the configuration's current ones."""
    owner: str | None = None
    """The token of the daemon run that holds this job (in a held state); None in the queue and after."""


@dataclass(frozen=True)
class Node:
    """One daemon run that has used the journal, as `status` shows the fleet."""

    name: str
    token: str
    host: str | None
    pid: int | None
    started_at: float
    heartbeat_at: float
    lease_until: float
    left_at: float | None
    holding: int
    inbox_unavailable: str | None = None
    """Why this run could not read its inbox when it last said so; None while it can."""


@dataclass(frozen=True)
class NewJob:
    """A settled file to record as a job, with the settings it is taken with (see daemon.profiles)."""

    rel_path: str
    size: int
    mtime_ns: int
    params: dict[str, Any]
    profile: str | None = None
    output_settings: dict[str, Any] | None = None
