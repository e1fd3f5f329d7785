"""The embedded journal database: one SQLite file in the state folder, for one daemon.

One connection serves the whole process behind a lock (SQLite serialises writers anyway); `status`
opens its own read-only connection, which WAL mode lets run beside the daemon. Every transaction is
BEGIN IMMEDIATE, so it already holds the one write lock: `lock()` has nothing left to do.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import JournalError, nested, refuse_other_schema

SCHEMA_VERSION = 9

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

_NODES = """
CREATE TABLE IF NOT EXISTS nodes (
    token TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    host TEXT,
    pid INTEGER,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    lease_until REAL NOT NULL,
    left_at REAL
);
"""
"""The daemons that have used this journal, each run under a token of its own (schema 8)."""

_NODES_INBOX = """
ALTER TABLE nodes ADD COLUMN inbox_unavailable TEXT;
DELETE FROM meta WHERE key = 'inbox_unavailable';
"""
"""Why a daemon cannot read its inbox, for `status` (schema 9): each run's own, as each station mounts
the share; it was one meta key before."""

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
    output_settings TEXT,
    owner TEXT
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
""" + _CHARGES + _NODES + _NODES_INBOX

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
    8: "ALTER TABLE jobs ADD COLUMN owner TEXT;" + _NODES,
    9: _NODES_INBOX,
}
"""SQL that takes an existing journal from version N-1 to N; a new journal gets `_SCHEMA` directly."""


class SQLiteConnector:
    """The journal's SQLite file; see the module docstring."""

    shared = False
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"
    skip_locked = ""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.depth = 0
        self._lock = threading.RLock()
        try:
            if read_only:
                self.connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                                  isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.connection.row_factory = sqlite3.Row
            self.connection.execute("PRAGMA busy_timeout = 5000")
            if not read_only:
                self.connection.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit survives a power cut, which is what "recorded before acting" relies on.
                self.connection.execute("PRAGMA synchronous = FULL")
                self._migrate()
            else:
                self.connection.execute("SELECT count(*) FROM jobs").fetchone()
                row = self.connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                refuse_other_schema(int(row[0]) if row else 0, SCHEMA_VERSION, self.path)
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from None

    def __str__(self) -> str:
        return str(self.path)

    def close(self) -> None:
        with self._lock:
            self.connection.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cursor = self.connection.cursor()
            try:
                with nested(self, lambda: cursor.execute("BEGIN IMMEDIATE"), self._commit,
                            lambda: cursor.execute("ROLLBACK")):
                    yield cursor
            finally:
                cursor.close()

    def _commit(self) -> None:
        try:
            self.connection.execute("COMMIT")
        except BaseException:
            if self.connection.in_transaction:  # a failed COMMIT (disk full) must not leave it open
                self.connection.execute("ROLLBACK")
            raise

    def lock(self, cursor: sqlite3.Cursor, name: str) -> None:
        """BEGIN IMMEDIATE took the database's one write lock already."""

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.connection.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        """Create a new journal at the current schema, or bring an older one up to it step by step."""
        with self._lock:
            self.connection.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self.connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            refuse_other_schema(version, SCHEMA_VERSION, self.path, migrating=True)
            if version == 0:
                self.connection.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA}; INSERT INTO meta(key, value) VALUES "
                    f"('schema_version', '{SCHEMA_VERSION}'); COMMIT;")
                return
            for target in range(version + 1, SCHEMA_VERSION + 1):
                # Each step and its version bump commit together: a crash never half-migrates.
                self.connection.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[target]}; "
                                              f"UPDATE meta SET value = '{target}' WHERE key = 'schema_version'; "
                                              "COMMIT;")
