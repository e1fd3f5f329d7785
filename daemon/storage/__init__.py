"""Where the journal keeps its rows: one small connector per database, the same SQL above them.

The journal (daemon.journal) speaks the domain's words (add a job, compare-and-set a move, claim
work, take over a silent daemon's jobs) in SQL both databases understand; a connector owns what
differs: connecting, the schema and its migrations, transactions, and the locks that serialise a
decision across processes. SQLite is the embedded default for one daemon; PostgreSQL lets a fleet of
daemons on several machines share one queue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol


class JournalError(Exception):
    """The journal cannot be opened or used (corrupt, read-only, newer schema)."""


class StorageUnavailable(JournalError):
    """The database cannot be reached just now (a server down, a network cut): try again later.

    Nothing was written by the statement that raised it; the caller keeps what it holds and retries.
    """


class Cursor(Protocol):
    """The part of a DB-API cursor the journal uses, with `?` placeholders on every database."""

    rowcount: int

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Cursor: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Connector(Protocol):
    """One database connection behind a lock, for one process.

    Rows read through it answer both `row["column"]` and `row[0]`, and `dict(row)`.
    """

    shared: bool
    """True when several daemons may use the database at once (leases then matter)."""
    now_sql: str
    """An SQL expression for the database's clock in seconds since the epoch: leases are dated by
    one clock, whichever machine writes them."""
    skip_locked: str
    """Appended to a SELECT that picks rows to claim: other daemons' claims in progress are skipped."""

    def transaction(self) -> contextlib.AbstractContextManager[Cursor]:
        """Begin, yield a cursor, commit; roll back if the block raises. Nested use joins the outer one."""

    def lock(self, cursor: Cursor, name: str) -> None:
        """Serialise the rest of this transaction with every other process taking the same `name`."""

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read-only query."""

    def close(self) -> None: ...


@contextlib.contextmanager
def nested(depth_holder: Any, begin, commit, rollback) -> Iterator[None]:
    """The shared shape of a transaction that nested callers join: only the outermost begins and ends it."""
    outermost = depth_holder.depth == 0
    if outermost:
        begin()
    depth_holder.depth += 1
    try:
        yield
    except BaseException:
        if outermost:
            rollback()
        raise
    else:
        if outermost:
            commit()
    finally:
        depth_holder.depth -= 1


JOURNAL_NAME = "journal.sqlite3"


def refuse_other_schema(found: int, current: int, where: object, *, migrating: bool = False) -> None:
    """A journal of a newer release is refused, by a daemon and a reader alike. One of an older release
    is brought up to date by a daemon (`migrating`); a reader (`status`), which never migrates, names
    it with what to do rather than failing later on a column it lacks."""
    if found > current:
        raise JournalError(f"the journal at {where} has schema version {found}, newer than this release's "
                           f"{current}; upgrade codeformer-daemon")
    if found < current and not migrating:
        raise JournalError(f"the journal at {where} is at schema version {found}, older than this release's "
                           f"{current}: start the daemon once (it upgrades the journal), then ask again")


def open_store(config: Any, *, read_only: bool = False, environ: Any = None) -> Connector:
    """The journal's database as `config.state` says: the SQLite file in state_dir, or the fleet's
    PostgreSQL (with the password of the systemd credential postgresql_password, when passed)."""
    from pathlib import Path

    state = config.state
    if state.backend == "postgresql":
        from ..config import resolve_postgresql_password
        from .postgresql import PostgresConnector

        password = resolve_postgresql_password(environ)
        if password is not None:
            from ..logging import register_secret

            register_secret(password.reveal())
        return PostgresConnector(state.postgresql.dsn, password=password.reveal() if password else None,
                                 read_only=read_only)
    from .sqlite import SQLiteConnector

    return SQLiteConnector(Path(config.state_dir) / JOURNAL_NAME, read_only=read_only)
