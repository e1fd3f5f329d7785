"""The SQLite journal: the single source of truth for every job and its state machine.

Every state change is a compare-and-set committed before the side effect it allows, so after a crash
the daemon reads the journal and carries each job on from where it stopped. One connection serves
the whole process behind a lock (SQLite serialises writers anyway); `status` opens its own read-only
connection, which WAL mode lets run beside the daemon.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 7


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


class JournalError(Exception):
    """The journal cannot be opened or used (corrupt, read-only, newer schema)."""


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


@dataclass(frozen=True)
class NewJob:
    """A settled file to record as a job, with the settings it is taken with (see daemon.profiles)."""

    rel_path: str
    size: int
    mtime_ns: int
    params: dict[str, Any]
    profile: str | None = None
    output_settings: dict[str, Any] | None = None


_JOB_COLUMNS = [f.name for f in fields(Job)]
JSON_COLUMNS = ("params", "output_settings")
"""Job columns stored as JSON text."""

_CHARGES = """
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    request_id TEXT,
    at REAL NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('charged', 'refunded', 'possibly_charged'))
);
CREATE INDEX IF NOT EXISTS charges_by_at ON charges(at);
"""
"""The ledger: one line per paid (or refunded, or possibly paid) submit (schema 7)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    rel_path TEXT NOT NULL,
    state TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    params TEXT NOT NULL,
    sha256 TEXT,
    upload_path TEXT,
    hosted_key TEXT,
    request_id TEXT,
    polling_url TEXT,
    remote_status TEXT,
    media_url TEXT,
    output_path TEXT,
    output_sha256 TEXT,
    final_path TEXT,
    submit_attempts INTEGER NOT NULL DEFAULT 0,
    download_attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    error_kind TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    submitted_at REAL,
    finished_at REAL,
    duplicate_of INTEGER,
    profile TEXT,
    output_settings TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_content ON jobs(sha256);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_active_per_path
    ON jobs(rel_path) WHERE state NOT IN ('done', 'failed', 'vanished');
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_by_state_due ON jobs(state, not_before);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events(job_id);
CREATE INDEX IF NOT EXISTS job_events_by_state_at ON job_events(to_state, at);
CREATE INDEX IF NOT EXISTS jobs_by_state_updated ON jobs(state, updated_at);
CREATE TABLE IF NOT EXISTS retry_requests (job_id INTEGER PRIMARY KEY, requested_at REAL NOT NULL);
""" + _CHARGES

MIGRATIONS: dict[int, str] = {
    2: """
        ALTER TABLE jobs ADD COLUMN duplicate_of INTEGER;
        CREATE INDEX IF NOT EXISTS jobs_by_content ON jobs(sha256);
    """,
    3: "CREATE TABLE IF NOT EXISTS retry_requests (job_id INTEGER PRIMARY KEY, requested_at REAL NOT NULL);",
    4: "ALTER TABLE jobs ADD COLUMN output_sha256 TEXT;",
    5: """
        CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
        CREATE INDEX IF NOT EXISTS jobs_by_state_due ON jobs(state, not_before);
    """,
    6: """
        CREATE INDEX IF NOT EXISTS job_events_by_state_at ON job_events(to_state, at);
        CREATE INDEX IF NOT EXISTS jobs_by_state_updated ON jobs(state, updated_at);
    """,
    7: """
        ALTER TABLE jobs ADD COLUMN profile TEXT;
        ALTER TABLE jobs ADD COLUMN output_settings TEXT;
    """ + _CHARGES,
}
"""SQL that takes an existing journal from version N-1 to N; a new journal gets `_SCHEMA` directly."""

AHEAD_STATES = ("submitting", "submitted", "downloading", "delivering")
"""A job in one of these has been (or is being) paid for: an identical job waits for it."""
NOT_LAUNCHED_STATES = ("pending", "publishing")


def heartbeat_file(state_dir: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """Where the running daemon shows it is alive: a file whose mtime is its last pass.

    In systemd's RuntimeDirectory (a tmpfs: no disk is written at all) when the unit has one, else in
    the state folder. It is touched, never synced: a heartbeat is worthless after a power cut, and a
    synced write every two seconds would wear an SD card down while the daemon does nothing.
    """
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) / "heartbeat" if runtime else Path(state_dir) / "heartbeat"


def _row_to_job(row: sqlite3.Row) -> Job:
    data = {name: row[name] for name in _JOB_COLUMNS}
    data["state"] = JobState(data["state"])
    for name in JSON_COLUMNS:
        if data[name] is not None:
            data[name] = json.loads(data[name])
    return Job(**data)


class Journal:
    """Jobs and their states in SQLite; every write goes through `transaction()`."""

    def __init__(self, path: Path, *, clock=time.time, read_only: bool = False) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._depth = 0
        try:
            if read_only:
                uri = f"file:{self.path}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout = 5000")
            if not read_only:
                self._db.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit survives a power cut, which is what "recorded before acting" relies on.
                self._db.execute("PRAGMA synchronous = FULL")
                self._migrate()
            else:
                self._db.execute("SELECT count(*) FROM jobs").fetchone()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """Begin, yield a cursor, commit; roll back if the block raises. The only way to write.

        Nested use joins the outer transaction, so helpers compose into one atomic step.
        """
        with self._lock:
            cursor = self._db.cursor()
            outermost = self._depth == 0
            if outermost:
                cursor.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield cursor
            except BaseException:
                if outermost:
                    cursor.execute("ROLLBACK")
                raise
            else:
                if outermost:
                    try:
                        cursor.execute("COMMIT")
                    except BaseException:
                        if self._db.in_transaction:  # a failed COMMIT (disk full) must not leave it open
                            self._db.execute("ROLLBACK")
                        raise
            finally:
                self._depth -= 1
                cursor.close()

    def _migrate(self) -> None:
        """Create a new journal at the current schema, or bring an older one up to it step by step."""
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        current = self.get_meta("schema_version")
        version = int(current) if current else 0
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema version {version}, newer than this daemon's "
                f"{SCHEMA_VERSION}; upgrade codeformer-daemon"
            )
        with self._lock:
            if version == 0:
                self._db.executescript(_SCHEMA)
                self.set_meta("schema_version", str(SCHEMA_VERSION))
            for target in range(version + 1, SCHEMA_VERSION + 1) if version else ():
                # Each step and its version bump commit together: a crash never half-migrates.
                self._db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[target]}; "
                                       f"UPDATE meta SET value = '{target}' WHERE key = 'schema_version'; COMMIT;")

    # ------------------------------------------------------------------ meta (daemon-wide facts)

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        with self.transaction() as cur:
            if value is None:
                cur.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                cur.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def start_heartbeat(self, path: Path) -> None:
        """Beat into `path` from now on; its place is recorded once, for `status` to find."""
        self._heartbeat = Path(path)
        self.beat()
        if self.get_meta("heartbeat_file") != str(self._heartbeat):
            self.set_meta("heartbeat_file", str(self._heartbeat))

    def beat(self) -> None:
        """The daemon is alive now: touch the heartbeat file (created if it went), no fsync, no commit."""
        path = getattr(self, "_heartbeat", None)
        if path is None:
            return
        try:
            os.utime(path)
        except FileNotFoundError:
            path.touch()

    def heartbeat_age(self, now: float) -> float | None:
        """Seconds since the running daemon's last beat (wall clock); None if it never beat."""
        recorded = self.get_meta("heartbeat_file")
        if recorded:
            try:
                return now - os.stat(recorded).st_mtime
            except OSError:
                return None
        legacy = self.get_meta("heartbeat")  # written by earlier versions into the journal itself
        return now - float(legacy) if legacy else None

    def add_to_counter(self, key: str, amount: int = 1) -> None:
        with self.transaction() as cur:
            cur.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                        "SET value = CAST(value AS INTEGER) + ?", (key, str(amount), amount))

    def counter(self, key: str) -> int:
        value = self.get_meta(key)
        return int(value) if value else 0

    # ------------------------------------------------------------------ jobs

    def add_job(self, rel_path: str, size: int, mtime_ns: int, params: dict[str, Any]) -> Job | None:
        """Record a new file as PENDING; None if the path already has an unfinished job."""
        added = self.add_jobs([(rel_path, size, mtime_ns)], params)
        return added[0] if added else None

    def add_jobs(self, files: Sequence[NewJob | tuple[str, int, int]],
                 params: dict[str, Any] | None = None) -> list[Job]:
        """Record new files as PENDING in one transaction: one commit for a burst, not one per file.

        Each file is a `NewJob` with its own settings, or (rel_path, size, mtime_ns) taken with
        `params`. A path that already has an unfinished job is skipped.
        """
        now = self._clock()
        ids: list[int] = []
        with self.transaction() as cur:
            for new in files:
                if not isinstance(new, NewJob):
                    new = NewJob(*new, params=params if params is not None else {})
                output = json.dumps(new.output_settings, sort_keys=True) if new.output_settings is not None else None
                try:
                    cur.execute(
                        "INSERT INTO jobs(rel_path, state, size, mtime_ns, params, profile, output_settings, "
                        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (new.rel_path, JobState.PENDING.value, new.size, new.mtime_ns,
                         json.dumps(new.params, sort_keys=True), new.profile, output, now, now))
                except sqlite3.IntegrityError:
                    continue
                ids.append(cur.lastrowid)
            cur.executemany("INSERT INTO job_events(job_id, at, from_state, to_state, detail) "
                            "VALUES (?, ?, NULL, ?, 'detected')", [(i, now, JobState.PENDING.value) for i in ids])
            rows = cur.execute(f"SELECT * FROM jobs WHERE id IN ({', '.join('?' for _ in ids)}) ORDER BY id",
                               ids).fetchall() if ids else []
        return [_row_to_job(r) for r in rows]

    def transition(self, job: Job, to_state: JobState, detail: str | None = None, **changes: Any) -> Job:
        """Move `job` from the state it was read in to `to_state`, with column changes, atomically.

        Raises StaleTransition when the row is no longer in `job.state` (another path won), and
        ValueError for a move the state machine does not allow.
        """
        if to_state not in TRANSITIONS[job.state]:
            raise ValueError(f"illegal transition {job.state.value} -> {to_state.value} for job {job.id}")
        return self._compare_and_set(job, to_state, detail, changes)

    def update(self, job: Job, **changes: Any) -> Job:
        """Change columns of `job` without changing its state (still compare-and-set on the state)."""
        return self._compare_and_set(job, job.state, None, changes)

    def _compare_and_set(self, job: Job, to_state: JobState, detail: str | None, changes: dict[str, Any]) -> Job:
        unknown = set(changes) - set(_JOB_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns: {sorted(unknown)}")
        now = self._clock()
        values = dict(changes, state=to_state.value, updated_at=now)
        for name in JSON_COLUMNS:
            if name in values and values[name] is not None:
                values[name] = json.dumps(values[name], sort_keys=True)
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self.transaction() as cur:
            cur.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND state = ?",
                        (*values.values(), job.id, job.state.value))
            if cur.rowcount != 1:
                raise StaleTransition(f"job {job.id} is no longer {job.state.value}")
            if to_state != job.state:
                cur.execute(
                    "INSERT INTO job_events(job_id, at, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                    (job.id, now, job.state.value, to_state.value, detail),
                )
            row = cur.execute("SELECT * FROM jobs WHERE id = ?", (job.id,)).fetchone()
        return _row_to_job(row)

    def find_twin(self, job: Job) -> Job | None:
        """Another job with identical content and parameters whose result this one should use.

        Done and in-flight twins count whatever their age; twins not launched yet only if older,
        so two waiting jobs can never wait for each other. A done twin with its output first,
        then one in flight (to wait for), then a done one whose output is gone (its media URL).
        """
        if not job.sha256:
            return None
        ahead = ", ".join("?" for _ in AHEAD_STATES)
        waiting = ", ".join("?" for _ in NOT_LAUNCHED_STATES)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE sha256 = ? AND params = ? AND id != ? AND "
                f"(state = 'done' OR state IN ({ahead}) OR (state IN ({waiting}) AND id < ?)) "
                "ORDER BY id DESC",
                (job.sha256, json.dumps(job.params, sort_keys=True), job.id, *AHEAD_STATES,
                 *NOT_LAUNCHED_STATES, job.id)).fetchall()
        twins = [_row_to_job(r) for r in rows]
        for twin in twins:
            if twin.state is JobState.DONE and twin.output_path and Path(twin.output_path).exists():
                return twin
        for twin in twins:
            if twin.state is not JobState.DONE:
                return twin
        return twins[0] if twins else None

    def enter_submitting(self, job: Job, detail: str,
                         settled_twins: Collection[int] = ()) -> tuple[Job | None, Job | None]:
        """Move `job` to SUBMITTING unless an identical job is in flight or done.

        One transaction, so of two identical jobs racing here exactly one gets through; the other
        gets the twin, to wait for (in flight) or to reuse the result of (done). A done twin counts
        however it got there, even while this job was publishing; `settled_twins` are done twins the
        caller already tried and whose result is gone. This is the last guard against paying twice.
        """
        ahead = ", ".join("?" for _ in AHEAD_STATES)
        settled = ", ".join("?" for _ in settled_twins) or "-1"  # ids start at 1; NOT IN (NULL) is never true
        with self.transaction() as cur:
            row = cur.execute(
                f"SELECT * FROM jobs WHERE sha256 = ? AND params = ? AND id != ? AND "
                f"(state IN ({ahead}) OR (state = 'done' AND id NOT IN ({settled}))) "
                "ORDER BY state = 'done', id DESC LIMIT 1",
                (job.sha256, json.dumps(job.params, sort_keys=True), job.id, *AHEAD_STATES,
                 *settled_twins)).fetchone()
            if row is not None:
                return None, _row_to_job(row)
            return self.transition(job, JobState.SUBMITTING, detail), None

    # ------------------------------------------------------------------ the ledger of charges

    def record_charge(self, job_id: int, request_id: str | None, at: float, kind: Charge) -> None:
        """Add one line to the ledger, dated `at` (wall time). Called inside the caller's `transaction()`,
        it commits with the job's move that causes it (accepted, ended with ERROR, failed as ambiguous):
        one submit is never counted twice, nor lost to a crash between the two writes.

        A refund is dated by its caller with the charge it cancels (the submit's time), so it frees a
        place in the period that charge was counted in: a submit at 23:59 refunded at 00:01 never
        makes room for an extra image the next day. When the ERROR came is in the job's history.
        """
        with self.transaction() as cur:
            cur.execute("INSERT INTO charges(job_id, request_id, at, kind) VALUES (?, ?, ?, ?)",
                        (job_id, request_id, at, Charge(kind).value))

    def charged_between(self, since: float, until: float) -> int:
        """Images paid for in [since, until) (wall time): charges and possible charges, less refunds,
        dated in it; one range of the `at` index. Never below 0 (a refund of a submit made before the
        ledger existed has no charge to cancel)."""
        with self._lock:
            row = self._db.execute("SELECT sum(CASE kind WHEN 'refunded' THEN -1 ELSE 1 END) FROM charges "
                                   "WHERE at >= ? AND at < ?", (since, until)).fetchone()
        return max(0, int(row[0] or 0))

    def last_charge_id(self) -> int:
        """The id of the ledger's newest line (0: empty). It changes exactly when a line is added, so a
        reader may keep its sums until it does (the loop asks every pass; this is one index seek)."""
        with self._lock:
            row = self._db.execute("SELECT max(id) FROM charges").fetchone()
        return int(row[0] or 0)

    # ------------------------------------------------------------------ retry requests (from the CLI)

    def request_retry(self, job_ids: list[int]) -> None:
        """Ask the running daemon to send these failed jobs again (see daemon.retry)."""
        with self.transaction() as cur:
            cur.executemany("INSERT OR IGNORE INTO retry_requests(job_id, requested_at) VALUES (?, ?)",
                            [(job_id, self._clock()) for job_id in job_ids])

    def retry_requests(self) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT job_id FROM retry_requests ORDER BY job_id")]

    def forget_retry_request(self, job_id: int) -> None:
        with self.transaction() as cur:
            cur.execute("DELETE FROM retry_requests WHERE job_id = ?", (job_id,))

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def jobs_in(self, *states: JobState, limit: int | None = None, due_by: float | None = None,
                exclude: Collection[int] = ()) -> list[Job]:
        """Jobs in any of `states`, oldest first.

        `due_by` keeps only jobs whose backoff (`not_before`) has passed by then, and `exclude` leaves
        out the given ids, both in SQL: a LIMIT applied before them would let jobs that are backing
        off (or already running) hide the newer ones that are ready.
        """
        marks = ", ".join("?" for _ in states)
        # One state: walk its index in id order and stop at the limit. Left to itself SQLite may
        # prefer the (state, not_before) index and sort every matching row first: a backlog's worth.
        by_state = " INDEXED BY jobs_by_state" if len(states) == 1 else ""
        sql = f"SELECT * FROM jobs{by_state} WHERE state IN ({marks})"
        args: list[Any] = [s.value for s in states]
        if due_by is not None:
            sql += " AND not_before <= ?"
            args.append(due_by)
        if exclude:
            sql += f" AND id NOT IN ({', '.join('?' for _ in exclude)})"
            args.extend(exclude)
        sql += " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_row_to_job(r) for r in rows]

    def next_due(self, states: Collection[JobState], after: float) -> float | None:
        """The earliest backoff among jobs in `states` that ends after `after`, for the loop's sleep:
        a seek in the (state, not_before) index per state, whatever the backlog."""
        marks = ", ".join("?" for _ in states)
        with self._lock:
            row = self._db.execute(f"SELECT min(not_before) FROM jobs WHERE state IN ({marks}) AND not_before > ?",
                                   (*(s.value for s in states), after)).fetchone()
        return float(row[0]) if row[0] is not None else None

    def next_pending(self, *, limit: int, due_by: float, exclude: Collection[int] = ()) -> list[tuple[int, bool]]:
        """(id, already checked) of the oldest PENDING jobs due by `due_by`, without reading their rows."""
        sql = "SELECT id, sha256 IS NOT NULL FROM jobs INDEXED BY jobs_by_state WHERE state = 'pending' AND not_before <= ?"
        args: list[Any] = [due_by]
        if exclude:
            sql += f" AND id NOT IN ({', '.join('?' for _ in exclude)})"
            args.extend(exclude)
        with self._lock:
            rows = self._db.execute(sql + f" ORDER BY id LIMIT {int(limit)}", args).fetchall()
        return [(int(r[0]), bool(r[1])) for r in rows]

    def ids_in(self, state: JobState) -> list[int]:
        """Ids of the jobs in `state`, oldest first, without reading their rows."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM jobs INDEXED BY jobs_by_state WHERE state = ? "
                                                   "ORDER BY id", (state.value,))]

    def count_in(self, *states: JobState) -> int:
        marks = ", ".join("?" for _ in states)
        with self._lock:
            row = self._db.execute(f"SELECT count(*) FROM jobs WHERE state IN ({marks})",
                                   [s.value for s in states]).fetchone()
        return int(row[0])

    def active_jobs_for(self, paths: Collection[str]) -> dict[str, tuple[int, int]]:
        """Which of `paths` have an unfinished job: rel_path -> (size, mtime_ns) it was taken with.

        One lookup per path in the partial index of unfinished jobs (the same condition as the
        index's, so SQLite uses it), never a read of every job.
        """
        if not paths:
            return {}
        marks = ", ".join("?" for _ in paths)
        with self._lock:
            rows = self._db.execute(
                f"SELECT rel_path, size, mtime_ns FROM jobs INDEXED BY jobs_one_active_per_path "
                f"WHERE rel_path IN ({marks}) AND state NOT IN ('done', 'failed', 'vanished')",
                list(paths)).fetchall()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def has_active_job(self, rel_path: str) -> bool:
        return bool(self.active_jobs_for([rel_path]))

    def counts_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def recent(self, state: JobState, limit: int = 10) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY updated_at DESC LIMIT ?",
                                    (state.value, limit)).fetchall()
        return [_row_to_job(r) for r in rows]

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of one read-only query, for the reports `status` and the dashboard show (daemon.reports)."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def read_jobs(self, sql: str, args: Sequence[Any] = ()) -> list[Job]:
        """Jobs from one read-only `SELECT * FROM jobs ...` query (daemon.reports)."""
        return [_row_to_job(r) for r in self.read(sql, args)]

    def history(self, job_id: int) -> list[dict[str, Any]]:
        """The transitions of one job, oldest first, for error records and `status`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT at, from_state, to_state, detail FROM job_events WHERE job_id = ? ORDER BY id",
                (job_id,)).fetchall()
        return [dict(r) for r in rows]

    def summary(self, now: float, recent_failures: int = 10) -> dict[str, Any]:
        """Everything `status` shows, as plain data (the CLI renders it, or dumps it as JSON)."""
        watching = (JobState.PUBLISHING, JobState.SUBMITTING, JobState.SUBMITTED, JobState.DOWNLOADING,
                    JobState.DELIVERING, JobState.FAILING)
        in_flight = [{
            "job_id": j.id, "file": j.rel_path, "state": j.state.value, "request_id": j.request_id,
            "remote_status": j.remote_status,
            "age_seconds": round(now - (j.submitted_at or j.created_at), 1),
            "profile": j.profile, "params": j.params,
        } for j in self.jobs_in(*watching)]
        failures = [{
            "job_id": j.id, "file": j.rel_path, "reason": j.last_error, "stage": j.error_kind,
            "request_id": j.request_id, "moved_to": j.final_path, "at": j.finished_at,
            "profile": j.profile, "params": j.params,
        } for j in self.recent(JobState.FAILED, recent_failures)]
        with self._lock:
            spent = self._db.execute("SELECT count(*) FROM job_events WHERE to_state = 'submitted'").fetchone()[0]
        heartbeat = self.heartbeat_age(now)
        return {
            "counts": {state.value: 0 for state in JobState} | self.counts_by_state(),
            "in_flight": in_flight,
            "recent_failures": failures,
            "paused": self.get_meta("paused"),
            "inbox_unavailable": self.get_meta("inbox_unavailable"),
            "ambiguous_at_restart": self.counter("ambiguous_at_restart"),
            "duplicates_skipped": self.counter("duplicates_skipped"),
            "unchanged_delivered": self.counter("unchanged_delivered"),
            "submissions_spent": int(spent),
            "heartbeat_age_seconds": round(heartbeat, 1) if heartbeat is not None else None,
            "pid": int(self.get_meta("pid") or 0) or None,
        }
