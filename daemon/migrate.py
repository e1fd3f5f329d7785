"""`migrate-state`: copy one daemon's SQLite journal into an empty PostgreSQL database, for a fleet to start on.

Everything is copied in one PostgreSQL transaction, so a failure (or a target found not empty) leaves the
database as it was; the SQLite file is only read, and kept. Ids are kept too: job numbers in logs, error
records and `status` still name the same files. What belonged to the one daemon process (its run in
`nodes`, its pid and heartbeat, the jobs it held) is left behind: the first daemon to start on the new
database takes the held jobs over from the states they were left in, as a restart does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, validate
from .journal import MOVED_TO_META, Job, Journal
from .storage import JOURNAL_NAME, JournalError, open_store

BATCH = 2000
"""Rows read from SQLite and sent to PostgreSQL at a time: a large journal is never held in memory whole."""

PROCESS_META = frozenset({"schema_version", "pid", "heartbeat_file", "heartbeat", "paused", "inbox_unavailable",
                          "settings_invalid"})
"""Meta keys the new database starts without: facts about the one daemon process that wrote them (each
daemon writes its own at start), and the schema version, which the target has its own of."""


@dataclass(frozen=True)
class Table:
    """One table copied row by row, in the order of `key`."""

    name: str
    key: str
    columns: tuple[str, ...]
    cleared: tuple[str, ...] = ()
    """Columns copied as NULL."""
    identity: bool = True
    """Its `key` is an identity column whose sequence must move past the copied ids."""


TABLES = (
    # owner: the SQLite daemon's run is not in the new database; held jobs are taken over by the first to start.
    Table("jobs", "id", tuple(f.name for f in dataclasses.fields(Job)), cleared=("owner",)),
    Table("job_events", "id", ("id", "job_id", "at", "from_state", "to_state", "detail")),
    Table("charges", "id", ("id", "job_id", "request_id", "at", "kind")),
    Table("retry_requests", "job_id", ("job_id", "requested_at"), identity=False),
)
"""In an order that satisfies the foreign keys (job_events refer to jobs). `nodes` is not copied."""


class MigrationError(Exception):
    """migrate-state refused, or failed with nothing written to the target."""


@dataclass(frozen=True)
class Migration:
    """What was copied, from where to where."""

    source: Path
    target: str
    copied: Mapping[str, int]
    """Rows per table, and "meta" for the counters and facts."""
    next_step: str

    def summary(self) -> str:
        copied = self.copied
        return (f"copied {copied['jobs']} jobs, {copied['job_events']} events and {copied['charges']} ledger lines "
                f"from {self.source} into {self.target}; next: {self.next_step}")


def target_config(config: Config, dsn: str | None = None) -> Config:
    """The configuration as the fleet will run it: state.backend postgresql at `dsn` (default: the configured
    state.postgresql.dsn), checked like the configuration file (no password in the DSN)."""
    dsn = (dsn or config.state.postgresql.dsn or "").strip()
    if not dsn:
        raise ConfigError("state.postgresql.dsn: migrate-state copies into the PostgreSQL database it names; set it "
                          '(e.g. "host=db.example.org dbname=codeformer user=codeformer") or pass --dsn')
    state = dataclasses.replace(config.state, backend="postgresql",
                                postgresql=dataclasses.replace(config.state.postgresql, dsn=dsn))
    target = dataclasses.replace(config, state=state)
    validate(target)
    return target


def next_step(config: Config, target: Config) -> str:
    """What the person does once the rows are in: the configuration every daemon of the fleet needs."""
    if config.state.backend == "postgresql" and config.state.postgresql.dsn == target.state.postgresql.dsn:
        return "start the daemons (this configuration uses that database already)"
    return (f"set state.backend: postgresql and state.postgresql.dsn: \"{target.state.postgresql.dsn}\" in the "
            "configuration, then start the daemons")


def meta_to_copy(rows: Iterable[Sequence[Any]]) -> list[tuple[str, str]]:
    """The (key, value) meta rows worth carrying over: counters and facts, not one process's own."""
    return [(str(key), str(value)) for key, value in rows if key not in PROCESS_META]


def migrate_state(config: Config, dsn: str | None = None, *, environ: Mapping[str, str] | None = None) -> Migration:
    """Copy state_dir's SQLite journal into the empty PostgreSQL database at `dsn` (default: the configured one).

    Refuses (MigrationError) while a daemon holds the journal, when there is none, and when the target
    already has jobs; ConfigError when no database is named.
    """
    from .service import try_instance_lock  # the daemon's own lock: no daemon may write while it is copied

    target = target_config(config, dsn)
    source = Path(config.state_dir) / JOURNAL_NAME
    if not source.exists():
        raise MigrationError(f"no SQLite journal at {source}: nothing to copy (the daemon has not run with this "
                             "state_dir)")
    with contextlib.ExitStack() as held:
        lock = try_instance_lock(config.state_dir)
        if lock is None:
            raise MigrationError(f"a codeformer-daemon is running with state_dir {config.state_dir}; stop it first, "
                                 "so its journal does not change while it is copied")
        held.callback(os.close, lock)  # released last, once everything is copied
        try:
            journal = held.enter_context(contextlib.closing(Journal(source)))  # an older one is brought up to date
            store = held.enter_context(contextlib.closing(open_store(target, environ=environ)))
        except JournalError as exc:
            raise MigrationError(str(exc)) from None
        copied = _copy(journal, Journal(store), str(store))
        # A daemon started on the SQLite journal again would send its queued files a second time.
        journal.set_meta(MOVED_TO_META, str(store))
        return Migration(source=source, target=str(store), copied=copied, next_step=next_step(config, target))


def _copy(source: Journal, target: Journal, where: str) -> dict[str, int]:
    """Every table and the meta rows in one transaction of the target: all of it, or nothing."""
    import psycopg

    try:
        with target.transaction() as cur:
            # A daemon started on the target meanwhile waits here: no job can slip in between check and copy.
            cur.execute("LOCK TABLE jobs IN EXCLUSIVE MODE")
            if cur.execute("SELECT count(*) FROM jobs").fetchone()[0]:
                raise MigrationError(f"the PostgreSQL database at {where} already has jobs; migrate-state copies "
                                     "into an empty database")
            copied = {}
            for table in TABLES:
                copied[table.name], last = _copy_table(source, cur, table)
                if table.identity and last is not None:
                    cur.execute("SELECT setval(pg_get_serial_sequence(?, ?), ?)", (table.name, table.key, last))
            meta = meta_to_copy(source.read("SELECT key, value FROM meta ORDER BY key"))
            cur.executemany("INSERT INTO meta(key, value) VALUES (?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value", meta)
            copied["meta"] = len(meta)
    except (psycopg.Error, sqlite3.Error, JournalError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MigrationError(f"copying into {where} failed, nothing was written: {first}") from None
    return copied


def _copy_table(source: Journal, cur: Any, table: Table) -> tuple[int, Any]:
    """Copy one table in batches; returns how many rows, and the last key copied (None: empty)."""
    selected = ", ".join(f"NULL AS {c}" if c in table.cleared else c for c in table.columns)
    insert = (f"INSERT INTO {table.name}({', '.join(table.columns)}) "
              f"VALUES ({', '.join('?' for _ in table.columns)})")
    count, last = 0, None
    while True:
        after = "" if last is None else f" WHERE {table.key} > ?"
        rows = source.read(f"SELECT {selected} FROM {table.name}{after} ORDER BY {table.key} LIMIT {BATCH}",
                           () if last is None else (last,))
        if not rows:
            return count, last
        cur.executemany(insert, [tuple(row) for row in rows])
        count += len(rows)
        last = rows[-1][table.key]
