"""The throwaway PostgreSQL the journal's tests stand on: each database fresh and separate, and a restart that
brings the same data back at the same DSN (how the tests make the database go away and come back)."""

from __future__ import annotations

import psycopg
import pytest

from .postgres_server import PostgresServer

PUBLIC_TABLES = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"


def test_a_new_database_is_empty_and_usable(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute(PUBLIC_TABLES).fetchone() == (0,)
        conn.execute("CREATE TABLE scans (name text PRIMARY KEY)")
        conn.execute("INSERT INTO scans VALUES ('grandma.jpg')")
        conn.commit()
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT name FROM scans").fetchall() == [("grandma.jpg",)]


def test_each_database_is_separate(postgres_server: PostgresServer) -> None:
    first, second = postgres_server.create_database(), postgres_server.create_database()
    assert first != second
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE only_here (x int)")
    with psycopg.connect(second) as conn:
        assert conn.execute(PUBLIC_TABLES).fetchone() == (0,)


def test_restart_keeps_the_data_and_the_dsn(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")

    postgres_server.stop()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(postgres_dsn, connect_timeout=2).close()
    finally:
        postgres_server.start()  # the server is shared by the session: never leave it down
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]

    postgres_server.restart()
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
