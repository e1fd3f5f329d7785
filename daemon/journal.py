"""The journal: the single source of truth for every job and its state machine.

Every state change is a compare-and-set committed before the side effect it allows, so after a crash
the daemon reads the journal and carries each job on from where it stopped. The rows live in SQLite
(one daemon) or PostgreSQL (a fleet sharing one queue), behind a connector (daemon.storage); the
SQL here is the same for both.

In a fleet every job past PENDING is held by one daemon's run (its `owner` token): only that run
may move it, and another takes it over, from the state it was left in, once the holder's lease
lapses (`take_over`). A daemon renews one lease for everything it holds, on its heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

# The job types are the journal's words: they are imported from here as much as from daemon.jobs.
from .jobs import (FINAL_STATES, HELD_STATES, IN_FLIGHT_STATES, TRANSITIONS, Charge, Job, JobState,  # noqa: F401
                   NewJob, Node, StaleTransition)
from .storage import Connector, JournalError, StorageUnavailable  # noqa: F401
from .storage.sqlite import SCHEMA_VERSION, SQLiteConnector  # noqa: F401

_JOB_COLUMNS = [f.name for f in fields(Job)]
JSON_COLUMNS = ("params", "output_settings")
"""Job columns stored as JSON text."""

MOVED_TO_META = "moved_to"
"""Set in an SQLite journal that `migrate-state` copied into PostgreSQL: no daemon may start on it again."""

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


def _row_to_job(row: Any) -> Job:
    data = {name: row[name] for name in _JOB_COLUMNS}
    data["state"] = JobState(data["state"])
    for name in JSON_COLUMNS:
        if data[name] is not None:
            data[name] = json.loads(data[name])
    return Job(**data)



FORGET_RUNS_AFTER = 7 * 86400.0
"""Seconds after its lease ended that a run holding nothing is dropped from the list of daemons."""

_HELD_IN = f"state IN ({', '.join(sorted(repr(state.value) for state in HELD_STATES))})"
"""SQL: the job is in a held state (literal values, written once, for every query that asks)."""

_PAID_BETWEEN = "SELECT sum(CASE kind WHEN 'refunded' THEN -1 ELSE 1 END) FROM charges WHERE at >= ? AND at < ?"
"""Images paid for in [since, until): charges and possible charges, less refunds."""


def _marks(values: Collection[Any]) -> str:
    return ", ".join("?" for _ in values)


class Journal:
    """Jobs and their states, on a connector (a path: the SQLite file); every write goes through
    `transaction()`."""

    def __init__(self, store: Path | str | Connector, *, clock=time.time, read_only: bool = False) -> None:
        self.store: Connector = SQLiteConnector(Path(store), read_only=read_only) \
            if isinstance(store, (str, os.PathLike)) else store
        self.path = getattr(self.store, "path", None)
        self._db = getattr(self.store, "connection", None)  # SQLite's own connection, for its tests' tracing
        self._clock = clock
        self.token: str | None = None
        """This daemon run's token once it joined (`join`): its held jobs are the ones it may move."""
        self.lease_seconds = 30.0

    def close(self) -> None:
        self.store.close()

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """Begin, yield a cursor, commit; roll back if the block raises. The only way to write.

        Nested use joins the outer transaction, so helpers compose into one atomic step.
        """
        return self.store.transaction()

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read-only query, for the reports `status` and the dashboard show (daemon.reports)."""
        return self.store.read(sql, args)

    def read_jobs(self, sql: str, args: Sequence[Any] = ()) -> list[Job]:
        """Jobs from one read-only `SELECT * FROM jobs ...` query (daemon.reports)."""
        return [_row_to_job(r) for r in self.read(sql, args)]

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        rows = self.read(sql, args)
        return rows[0] if rows else None

    # ------------------------------------------------------------------ meta (daemon-wide facts)

    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
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
                        "SET value = CAST(CAST(meta.value AS INTEGER) + ? AS TEXT)", (key, str(amount), amount))

    def counter(self, key: str) -> int:
        value = self.get_meta(key)
        return int(value) if value else 0

    # ------------------------------------------------------------------ the fleet: runs and their leases

    def join(self, name: str | None = None, lease_seconds: float = 30.0) -> str:
        """Start holding jobs as a new run of daemon `name` (default: the host name); returns its token.

        Each start gets a token of its own: a run that was killed and started again under the same
        name is a new holder, and its old run's jobs are taken over like anyone's.
        """
        self.token = secrets.token_hex(8)
        self.lease_seconds = float(lease_seconds)
        now = self.store.now_sql
        with self.transaction() as cur:
            cur.execute(f"INSERT INTO nodes(token, name, host, pid, started_at, heartbeat_at, lease_until) "
                        f"VALUES (?, ?, ?, ?, {now}, {now}, {now} + ?)",
                        (self.token, name or socket.gethostname(), socket.gethostname(), os.getpid(),
                         self.lease_seconds))
            # Runs long over that hold nothing leave the list, so it stays as short as `status` shows it.
            cur.execute(f"DELETE FROM nodes WHERE lease_until < {now} - ? AND token NOT IN "
                        f"(SELECT owner FROM jobs WHERE owner IS NOT NULL AND {_HELD_IN})", (FORGET_RUNS_AFTER,))
        return self.token

    def renew_lease(self) -> bool:
        """Extend this run's lease on everything it holds by `lease_seconds` from now (one row, however
        many jobs). False if the run's row is gone (it left, or the journal was replaced)."""
        if self.token is None:
            return False
        now = self.store.now_sql
        with self.transaction() as cur:
            cur.execute(f"UPDATE nodes SET heartbeat_at = {now}, lease_until = {now} + ? WHERE token = ?",
                        (self.lease_seconds, self.token))
            return cur.rowcount == 1

    def leave(self) -> None:
        """A clean stop: the lease ends now, so others take over what is left at once, not after it lapses."""
        if self.token is None:
            return
        now = self.store.now_sql
        with self.transaction() as cur:
            cur.execute(f"UPDATE nodes SET lease_until = {now}, left_at = {now} WHERE token = ?", (self.token,))

    def alone(self) -> bool:
        """No other daemon of the fleet is alive (always, on SQLite, whose lock file keeps it so)."""
        if not self.store.shared:
            return True
        return self._one(f"SELECT count(*) FROM nodes WHERE token != ? AND left_at IS NULL "
                         f"AND lease_until > {self.store.now_sql}", (self.token or "",))[0] == 0

    def note_inbox(self, reason: str | None) -> None:
        """Record for `status` why this run cannot read its inbox (None: it can again). It is kept on this
        run's own row: in a fleet each station mounts the share itself, and one station losing it says
        nothing of the others."""
        if self.token is None:
            return
        with self.transaction() as cur:
            cur.execute("UPDATE nodes SET inbox_unavailable = ? WHERE token = ?", (reason, self.token))

    def take_over(self, *, everything: bool = False) -> list[Job]:
        """Hold, from now on, the jobs of runs whose lease lapsed (or that left), and held jobs without
        a holder; with `everything`, every held job that is not this run's (one daemon on its own
        journal: whoever held them before is this daemon's previous run). Returns them, oldest first,
        in the states they were left in, for the caller to carry on as a restart does.
        """
        if self.token is None:
            raise RuntimeError("join() before take_over()")
        lapsed = "" if everything else \
            f" AND (owner IS NULL OR owner NOT IN (SELECT token FROM nodes WHERE lease_until > {self.store.now_sql}))"
        with self.transaction() as cur:
            self.store.lock(cur, "codeformer-daemon takeover")
            rows = cur.execute(
                f"SELECT id FROM jobs WHERE {_HELD_IN} AND (owner IS NULL OR owner != ?){lapsed} "
                f"ORDER BY id{self.store.skip_locked}", (self.token,)).fetchall()
            ids = [int(r[0]) for r in rows]
            if not ids:
                return []
            cur.execute(f"UPDATE jobs SET owner = ? WHERE id IN ({_marks(ids)})", (self.token, *ids))
            found = cur.execute(f"SELECT * FROM jobs WHERE id IN ({_marks(ids)}) ORDER BY id", ids).fetchall()
        return [_row_to_job(r) for r in found]

    def hosted_keys(self) -> set[str]:
        """The hosting keys of every held job, every daemon's: what an orphan sweep must leave."""
        return {r[0] for r in self.read(f"SELECT hosted_key FROM jobs WHERE hosted_key IS NOT NULL AND {_HELD_IN}")}

    def holds(self, job: Job) -> bool:
        """Whether this run may move `job` (as read): not held by anyone, or held by this run."""
        return self.token is None or job.state not in HELD_STATES or job.owner == self.token

    def nodes(self) -> list[Node]:
        """Every run that has used the journal, newest first, with how many jobs each holds now."""
        rows = self.read(f"SELECT n.*, (SELECT count(*) FROM jobs WHERE owner = n.token AND {_HELD_IN}) AS holding "
                         "FROM nodes n ORDER BY n.started_at DESC")
        return [Node(name=r["name"], token=r["token"], host=r["host"], pid=r["pid"], started_at=float(r["started_at"]),
                     heartbeat_at=float(r["heartbeat_at"]), lease_until=float(r["lease_until"]),
                     left_at=r["left_at"], holding=int(r["holding"]), inbox_unavailable=r["inbox_unavailable"])
                for r in rows]

    def database_time(self) -> float:
        """The database's clock (leases are dated by it, whichever machine writes them)."""
        return float(self._one(f"SELECT {self.store.now_sql}")[0])

    # ------------------------------------------------------------------ jobs

    def add_job(self, rel_path: str, size: int, mtime_ns: int, params: dict[str, Any]) -> Job | None:
        """Record a new file as PENDING; None if the path already has an unfinished job."""
        added = self.add_jobs([(rel_path, size, mtime_ns)], params)
        return added[0] if added else None

    def add_jobs(self, files: Sequence[NewJob | tuple[str, int, int]],
                 params: dict[str, Any] | None = None) -> list[Job]:
        """Record new files as PENDING in one transaction: one commit for a burst, not one per file.

        Each file is a `NewJob` with its own settings, or (rel_path, size, mtime_ns) taken with
        `params`. A path that already has an unfinished job is skipped: the database's unique index
        decides, so of several daemons seeing the same new file on a share exactly one records it.
        """
        now = self._clock()
        ids: list[int] = []
        with self.transaction() as cur:
            for new in files:
                if not isinstance(new, NewJob):
                    new = NewJob(*new, params=params if params is not None else {})
                output = json.dumps(new.output_settings, sort_keys=True) if new.output_settings is not None else None
                row = cur.execute(
                    "INSERT INTO jobs(rel_path, state, size, mtime_ns, params, profile, output_settings, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                    (new.rel_path, JobState.PENDING.value, new.size, new.mtime_ns,
                     json.dumps(new.params, sort_keys=True), new.profile, output, now, now)).fetchone()
                if row is not None:
                    ids.append(int(row[0]))
            cur.executemany("INSERT INTO job_events(job_id, at, from_state, to_state, detail) "
                            "VALUES (?, ?, NULL, ?, 'detected')", [(i, now, JobState.PENDING.value) for i in ids])
            rows = cur.execute(f"SELECT * FROM jobs WHERE id IN ({_marks(ids)}) ORDER BY id",
                               ids).fetchall() if ids else []
        return [_row_to_job(r) for r in rows]

    def transition(self, job: Job, to_state: JobState, detail: str | None = None, **changes: Any) -> Job:
        """Move `job` from the state it was read in to `to_state`, with column changes, atomically.

        Raises StaleTransition when the row is no longer in `job.state` (another path won) or, in a
        fleet, no longer held by this run (another daemon took it over); ValueError for a move the
        state machine does not allow.
        """
        if to_state not in TRANSITIONS[job.state]:
            raise ValueError(f"illegal transition {job.state.value} -> {to_state.value} for job {job.id}")
        return self._compare_and_set(job, to_state, detail, changes)

    def update(self, job: Job, **changes: Any) -> Job:
        """Change columns of `job` without changing its state (still compare-and-set on the state)."""
        return self._compare_and_set(job, job.state, None, changes)

    def _compare_and_set(self, job: Job, to_state: JobState, detail: str | None, changes: dict[str, Any]) -> Job:
        unknown = set(changes) - set(_JOB_COLUMNS)
        if unknown or "owner" in changes:
            raise ValueError(f"unknown job columns: {sorted(unknown | ({'owner'} & set(changes)))}")
        now = self._clock()
        values = dict(changes, state=to_state.value, updated_at=now)
        if self.token is not None:  # a run holds what it moves into a held state, and lets go of the rest
            values["owner"] = self.token if to_state in HELD_STATES else None
        for name in JSON_COLUMNS:
            if name in values and values[name] is not None:
                values[name] = json.dumps(values[name], sort_keys=True)
        assignments = ", ".join(f"{name} = ?" for name in values)
        where, args = "id = ? AND state = ?", [job.id, job.state.value]
        if self.token is not None and job.state in HELD_STATES:
            where += " AND owner = ?"
            args.append(self.token)
        with self.transaction() as cur:
            cur.execute(f"UPDATE jobs SET {assignments} WHERE {where}", (*values.values(), *args))
            if cur.rowcount != 1:
                raise StaleTransition(f"job {job.id} is no longer {job.state.value}"
                                      + (" here" if self.token is not None and job.state in HELD_STATES else ""))
            if to_state != job.state:
                cur.execute(
                    "INSERT INTO job_events(job_id, at, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                    (job.id, now, job.state.value, to_state.value, detail),
                )
            row = cur.execute("SELECT * FROM jobs WHERE id = ?", (job.id,)).fetchone()
        return _row_to_job(row)

    def claim(self, limit: int, *, in_flight_limit: int, due_by: float, exclude: Collection[int] = (),
              spending_caps: Sequence[tuple[int, float, float]] = (), detail: str = "slot taken") -> list[Job]:
        """Take up to `limit` of the oldest PENDING jobs due by `due_by` into PUBLISHING, held by this
        run, without ever letting the jobs in flight (every daemon's) exceed `in_flight_limit`, nor the
        paid and launching submits in any [since, until) of `spending_caps` exceed its count.

        The counts and the claim are one transaction under one lock, so daemons claiming at the same
        moment never both take the last slot (or the last image of a budget); rows another daemon is
        claiming are skipped, not waited for.
        """
        if limit <= 0:
            return []
        with self.transaction() as cur:
            self.store.lock(cur, "codeformer-daemon slots")
            in_flight = cur.execute(f"SELECT count(*) FROM jobs WHERE state IN ({_marks(IN_FLIGHT_STATES)})",
                                    [s.value for s in IN_FLIGHT_STATES]).fetchone()[0]
            room = min(limit, in_flight_limit - int(in_flight))
            if spending_caps:
                # Launching first, then the ledger: an accepted submit committed in between is counted
                # twice (too careful by one for a moment), never missed.
                launching = int(cur.execute("SELECT count(*) FROM jobs WHERE state IN ('publishing', 'submitting')"
                                            ).fetchone()[0])
                for cap, since, until in spending_caps:
                    paid = cur.execute(_PAID_BETWEEN, (since, until)).fetchone()[0]
                    room = min(room, cap - launching - max(0, int(paid or 0)))
            if room <= 0:
                return []
            sql = "SELECT * FROM jobs INDEXED BY jobs_by_state WHERE state = 'pending' AND not_before <= ?"
            args: list[Any] = [due_by]
            if exclude:
                sql += f" AND id NOT IN ({_marks(exclude)})"
                args.extend(exclude)
            rows = cur.execute(f"{sql} ORDER BY id LIMIT {int(room)}{self.store.skip_locked}", args).fetchall()
            claimed = []
            for row in rows:
                with contextlib.suppress(StaleTransition):
                    claimed.append(self.transition(_row_to_job(row), JobState.PUBLISHING, detail))
        return claimed

    def find_twin(self, job: Job) -> Job | None:
        """Another job with identical content and parameters whose result this one should use.

        Done and in-flight twins count whatever their age; twins not launched yet only if older,
        so two waiting jobs can never wait for each other. A done twin with its output first,
        then one in flight (to wait for), then a done one whose output is gone (its media URL).
        """
        if not job.sha256:
            return None
        twins = self.read_jobs(
            f"SELECT * FROM jobs WHERE sha256 = ? AND params = ? AND id != ? AND "
            f"(state = 'done' OR state IN ({_marks(AHEAD_STATES)}) OR (state IN ({_marks(NOT_LAUNCHED_STATES)}) "
            "AND id < ?)) ORDER BY id DESC",
            (job.sha256, json.dumps(job.params, sort_keys=True), job.id, *AHEAD_STATES, *NOT_LAUNCHED_STATES, job.id))
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

        One transaction under a lock on the content, so of two identical jobs racing here (on any
        daemon) exactly one gets through; the other gets the twin, to wait for (in flight) or to reuse
        the result of (done). A done twin counts however it got there, even while this job was
        publishing; `settled_twins` are done twins the caller already tried and whose result is gone.
        This is the last guard against paying twice.
        """
        settled = _marks(settled_twins) or "-1"  # ids start at 1; NOT IN (NULL) is never true
        with self.transaction() as cur:
            self.store.lock(cur, f"codeformer-daemon content {job.sha256}")
            row = cur.execute(
                f"SELECT * FROM jobs WHERE sha256 = ? AND params = ? AND id != ? AND "
                f"(state IN ({_marks(AHEAD_STATES)}) OR (state = 'done' AND id NOT IN ({settled}))) "
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
        row = self._one(_PAID_BETWEEN, (since, until))
        return max(0, int(row[0] or 0))

    def last_charge_id(self) -> int:
        """The id of the ledger's newest line (0: empty). It changes exactly when a line is added, so a
        reader may keep its sums until it does (the loop asks every pass; this is one index seek)."""
        return int(self._one("SELECT max(id) FROM charges")[0] or 0)

    # ------------------------------------------------------------------ retry requests (from the CLI)

    def request_retry(self, job_ids: list[int]) -> None:
        """Ask the running daemon to send these failed jobs again (see daemon.retry)."""
        with self.transaction() as cur:
            cur.executemany("INSERT INTO retry_requests(job_id, requested_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                            [(job_id, self._clock()) for job_id in job_ids])

    def retry_requests(self) -> list[int]:
        return [int(r[0]) for r in self.read("SELECT job_id FROM retry_requests ORDER BY job_id")]

    def take_retry_request(self, job_id: int) -> bool:
        """Remove one request; True for the one caller that removed it (of a fleet's daemons, the one
        that carries it out)."""
        with self.transaction() as cur:
            cur.execute("DELETE FROM retry_requests WHERE job_id = ?", (job_id,))
            return cur.rowcount == 1

    # ------------------------------------------------------------------ reading jobs

    def get(self, job_id: int) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _row_to_job(row) if row else None

    def _held_here(self, states: Collection[JobState]) -> tuple[str, list[Any]]:
        """The condition that keeps, of `states`, the held ones to this run's own (a fleet's daemon
        works only on what it holds; the queue is everyone's)."""
        if self.token is None or not any(s in HELD_STATES for s in states):
            return "", []
        return f" AND (NOT {_HELD_IN} OR owner = ?)", [self.token]

    def jobs_in(self, *states: JobState, limit: int | None = None, due_by: float | None = None,
                exclude: Collection[int] = ()) -> list[Job]:
        """Jobs in any of `states`, oldest first; for a run in a fleet, held ones only if it holds them.

        `due_by` keeps only jobs whose backoff (`not_before`) has passed by then, and `exclude` leaves
        out the given ids, both in SQL: a LIMIT applied before them would let jobs that are backing
        off (or already running) hide the newer ones that are ready.
        """
        # One state: walk its index in id order and stop at the limit. Left to itself SQLite may
        # prefer the (state, not_before) index and sort every matching row first: a backlog's worth.
        by_state = " INDEXED BY jobs_by_state" if len(states) == 1 else ""
        mine, mine_args = self._held_here(states)
        sql = f"SELECT * FROM jobs{by_state} WHERE state IN ({_marks(states)}){mine}"
        args: list[Any] = [s.value for s in states] + mine_args
        if due_by is not None:
            sql += " AND not_before <= ?"
            args.append(due_by)
        if exclude:
            sql += f" AND id NOT IN ({_marks(exclude)})"
            args.extend(exclude)
        sql += " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return self.read_jobs(sql, args)

    def next_due(self, states: Collection[JobState], after: float) -> float | None:
        """The earliest backoff among jobs in `states` that ends after `after`, for the loop's sleep:
        a seek in the (state, not_before) index per state, whatever the backlog."""
        mine, mine_args = self._held_here(states)
        row = self._one(f"SELECT min(not_before) FROM jobs WHERE state IN ({_marks(states)}){mine} "
                        "AND not_before > ?", (*(s.value for s in states), *mine_args, after))
        return float(row[0]) if row[0] is not None else None

    def next_pending(self, *, limit: int, due_by: float, exclude: Collection[int] = ()) -> list[tuple[int, bool]]:
        """(id, already checked) of the oldest PENDING jobs due by `due_by`, without reading their rows."""
        sql = ("SELECT id, sha256 IS NOT NULL FROM jobs INDEXED BY jobs_by_state WHERE state = 'pending' "
               "AND not_before <= ?")
        args: list[Any] = [due_by]
        if exclude:
            sql += f" AND id NOT IN ({_marks(exclude)})"
            args.extend(exclude)
        return [(int(r[0]), bool(r[1])) for r in self.read(sql + f" ORDER BY id LIMIT {int(limit)}", args)]

    def ids_in(self, state: JobState) -> list[int]:
        """Ids of the jobs in `state` (this run's, if held), oldest first, without reading their rows."""
        mine, mine_args = self._held_here([state])
        return [int(r[0]) for r in self.read(f"SELECT id FROM jobs INDEXED BY jobs_by_state WHERE state = ?{mine} "
                                             "ORDER BY id", (state.value, *mine_args))]

    def count_in(self, *states: JobState) -> int:
        """Jobs in any of `states`, every daemon's: slots are counted fleet-wide."""
        return int(self._one(f"SELECT count(*) FROM jobs WHERE state IN ({_marks(states)})",
                             [s.value for s in states])[0])

    def active_jobs_for(self, paths: Collection[str]) -> dict[str, tuple[int, int]]:
        """Which of `paths` have an unfinished job: rel_path -> (size, mtime_ns) it was taken with.

        One lookup per path in the partial index of unfinished jobs (the same condition as the
        index's, so SQLite uses it), never a read of every job.
        """
        if not paths:
            return {}
        rows = self.read(f"SELECT rel_path, size, mtime_ns FROM jobs INDEXED BY jobs_one_active_per_path "
                         f"WHERE rel_path IN ({_marks(paths)}) AND state NOT IN ('done', 'failed', 'vanished')",
                         list(paths))
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def has_active_job(self, rel_path: str) -> bool:
        return bool(self.active_jobs_for([rel_path]))

    def counts_by_state(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self.read("SELECT state, count(*) FROM jobs GROUP BY state")}

    def recent(self, state: JobState, limit: int = 10) -> list[Job]:
        return self.read_jobs("SELECT * FROM jobs WHERE state = ? ORDER BY updated_at DESC LIMIT ?",
                              (state.value, limit))

    def history(self, job_id: int) -> list[dict[str, Any]]:
        """The transitions of one job, oldest first, for error records and `status`."""
        return [dict(r) for r in self.read("SELECT at, from_state, to_state, detail FROM job_events "
                                           "WHERE job_id = ? ORDER BY id", (job_id,))]

    def submissions_spent(self) -> int:
        """Submits the provider accepted, ever (each move into SUBMITTED is one)."""
        return int(self._one("SELECT count(*) FROM job_events WHERE to_state = 'submitted'")[0])
