"""`codeformer-daemon migrate-state --to postgresql`: one daemon's SQLite journal copied into an empty PostgreSQL
database (the real server, tests/postgres_server.py), whole or not at all, and refused when it would be unsafe."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from daemon.cli import main
from daemon.control import PAUSE_META, pause_submits
from daemon.journal import Charge, JobState, Journal, NewJob
from daemon.config import Secret, load_config
from daemon.service import Service, StartupError, try_instance_lock
from daemon.storage.postgresql import SCHEMA_VERSION as POSTGRES_SCHEMA, PostgresConnector

from .conftest import ManualClock, config_mapping, write_config

PUBLIC_TABLES = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
SUBMIT_AT = 1_700_000_000.0


def postgres_config(tmp_path: Path, folders, emulator, dsn: str | None, backend: str = "postgresql") -> Path:
    state = {"backend": backend, "postgresql": {"dsn": dsn} if dsn else {}}
    return write_config(tmp_path / "config.yaml", config_mapping(folders, emulator, state=state))


def build_sqlite_journal(state_dir: Path) -> tuple[Journal, dict[int, object]]:
    """A journal as a daemon leaves it: jobs queued, in flight (held by its run), done and failed; a ledger;
    counters; a retry asked for; and the per-process facts the new database must not inherit."""
    clock = ManualClock()
    clock.now = SUBMIT_AT - 100
    journal = Journal(state_dir / "journal.sqlite3", clock=clock)
    journal.join("pi-in-the-attic")
    waiting, in_flight, done, failed = journal.add_jobs([
        NewJob("waiting.jpg", 100, 1, {"upscale": 2}),
        NewJob("album/in flight.jpg", 200, 2, {"upscale": 4, "codeformer_fidelity": 0.7}, profile="portraits",
               output_settings={"format": "jpeg", "quality": 90}),
        NewJob("done.jpg", 300, 3, {"upscale": 2}),
        NewJob("failed.jpg", 400, 4, {"upscale": 2}),
    ])
    clock.now = SUBMIT_AT
    for job in (in_flight, done, failed):
        job = journal.transition(job, JobState.PUBLISHING, "slot taken")
        job = journal.transition(job, JobState.SUBMITTING, "published", hosted_key=f"k-{job.id}", sha256="ab" * 32)
        with journal.transaction():
            job = journal.transition(job, JobState.SUBMITTED, "accepted", request_id=f"req-{job.id}",
                                     polling_url=f"https://example.invalid/status/{job.id}", submitted_at=clock.now)
            journal.record_charge(job.id, job.request_id, clock.now, Charge.CHARGED)
        if job.rel_path == "done.jpg":
            clock.now += 5
            job = journal.transition(job, JobState.DOWNLOADING, "finished", remote_status="COMPLETED",
                                     media_url="https://example.invalid/out.png")
            job = journal.transition(job, JobState.DELIVERING, "downloaded", output_path="/outbox/done.png",
                                     output_sha256="cd" * 32)
            journal.transition(job, JobState.DONE, "delivered", final_path="/archive/done.jpg", finished_at=clock.now)
        elif job.rel_path == "failed.jpg":
            clock.now += 5
            with journal.transaction():
                job = journal.transition(job, JobState.FAILING, "provider error", last_error="system error",
                                         error_kind="provider_error")
                journal.record_charge(job.id, job.request_id, SUBMIT_AT, Charge.REFUNDED)
            journal.transition(job, JobState.FAILED, "moved to failed/", final_path="/failed/failed.jpg",
                               finished_at=clock.now)
    journal.request_retry([failed.id])
    journal.add_to_counter("duplicates_skipped", 3)
    journal.add_to_counter("ambiguous_at_restart")
    pause_submits(journal, now=SUBMIT_AT)
    for key, value in (("pid", "4242"), ("paused", "daily limit reached"), ("inbox_unavailable", "share gone"),
                       ("heartbeat_file", "/run/codeformer/heartbeat")):
        journal.set_meta(key, value)
    assert journal.get(in_flight.id).owner is not None  # held by the SQLite daemon's run
    return journal, {job.id: journal.get(job.id) for job in (waiting, in_flight, done, failed)}


def test_migrate_state_copies_the_journal_into_postgresql(tmp_path, folders, emulator, postgres_dsn):
    config_path = postgres_config(tmp_path, folders, emulator, postgres_dsn)
    folders["state"].mkdir()
    source, jobs = build_sqlite_journal(folders["state"])
    histories = {job_id: source.history(job_id) for job_id in jobs}
    events = len(source.read("SELECT id FROM job_events"))
    windows = [(SUBMIT_AT, SUBMIT_AT + 1), (SUBMIT_AT + 1, SUBMIT_AT + 10), (0, SUBMIT_AT * 2)]
    charged = [source.charged_between(*window) for window in windows]
    source.close()

    result = subprocess.run([sys.executable, "-m", "daemon.cli", "migrate-state", "--config", str(config_path),
                             "--to", "postgresql"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CODEFORMER_API_KEY": "unused"})
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith(f"copied 4 jobs, {events} events and 4 ledger lines from ")
    assert "start the daemons" in line

    fleet = Journal(PostgresConnector(postgres_dsn))
    try:
        for job_id, job in jobs.items():
            assert fleet.get(job_id) == dataclasses.replace(job, owner=None)  # every column, the same id
            assert fleet.history(job_id) == histories[job_id]
        assert {j.state for j in jobs.values()} == {JobState.PENDING, JobState.SUBMITTED, JobState.DONE,
                                                    JobState.FAILED}
        assert [fleet.charged_between(*window) for window in windows] == charged == [1, 1, 2]  # 3 paid, 1 refunded
        assert fleet.submissions_spent() == 3
        assert fleet.counter("duplicates_skipped") == 3 and fleet.counter("ambiguous_at_restart") == 1
        assert fleet.get_meta(PAUSE_META) == repr(SUBMIT_AT)  # a person's pause holds for the fleet too
        for key in ("pid", "paused", "inbox_unavailable", "heartbeat_file"):
            assert fleet.get_meta(key) is None, key
        assert fleet.get_meta("schema_version") == str(POSTGRES_SCHEMA)  # its own, not SQLite's
        assert fleet.retry_requests() == [j.id for j in jobs.values() if j.state is JobState.FAILED]
        assert fleet.nodes() == []

        # A daemon of the fleet takes the job the SQLite daemon held over, and new rows get new ids.
        fleet.join("fleet-1")
        [held] = fleet.take_over()
        assert held.state is JobState.SUBMITTED and held.request_id == f"req-{held.id}"
        last_charge = fleet.last_charge_id()
        [new] = fleet.add_jobs([("new.jpg", 1, 1)], {})
        assert new.id > max(jobs)
        fleet.record_charge(new.id, None, SUBMIT_AT + 10, Charge.POSSIBLY_CHARGED)
        assert fleet.last_charge_id() > last_charge
    finally:
        fleet.close()

    # The SQLite journal is kept, marked: a daemon started on it again would send its waiting files twice.
    sqlite_config = write_config(tmp_path / "sqlite.yaml", config_mapping(folders, emulator))
    with pytest.raises(StartupError, match="copied to the PostgreSQL journal .*set state.backend: postgresql"):
        Service(load_config(sqlite_config), Secret("unused-key-1234")).start()


def test_refused_while_a_daemon_holds_the_journal(tmp_path, folders, emulator, postgres_dsn, capsys):
    config_path = postgres_config(tmp_path, folders, emulator, postgres_dsn)
    folders["state"].mkdir()
    build_sqlite_journal(folders["state"])[0].close()
    lock = try_instance_lock(folders["state"])
    assert lock is not None
    try:
        assert main(["migrate-state", "--config", str(config_path), "--to", "postgresql"]) == 1
    finally:
        os.close(lock)
    assert "is running" in capsys.readouterr().err
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute(PUBLIC_TABLES).fetchone() == (0,)  # not even the schema was created


def test_refused_into_a_database_that_has_jobs(tmp_path, folders, emulator, postgres_dsn, capsys):
    config_path = postgres_config(tmp_path, folders, emulator, postgres_dsn)
    folders["state"].mkdir()
    build_sqlite_journal(folders["state"])[0].close()
    fleet = Journal(PostgresConnector(postgres_dsn))
    try:
        [theirs] = fleet.add_jobs([("already here.jpg", 5, 5)], {"upscale": 2})
        assert main(["migrate-state", "--config", str(config_path), "--to", "postgresql"]) == 1
        assert "copies into an empty database" in capsys.readouterr().err
        assert [j.id for j in fleet.read_jobs("SELECT * FROM jobs")] == [theirs.id]
        assert fleet.history(theirs.id)[0]["detail"] == "detected"
        assert len(fleet.read("SELECT id FROM job_events")) == 1
        assert fleet.read("SELECT id FROM charges") == [] and fleet.retry_requests() == []
        assert fleet.counter("duplicates_skipped") == 0
    finally:
        fleet.close()


def test_a_failed_copy_leaves_the_target_empty(tmp_path, folders, emulator, postgres_dsn, capsys):
    config_path = postgres_config(tmp_path, folders, emulator, postgres_dsn)
    folders["state"].mkdir()
    source, _jobs = build_sqlite_journal(folders["state"])
    with source.transaction() as cur:  # SQLite does not enforce the foreign key; PostgreSQL does
        cur.execute("INSERT INTO job_events(job_id, at, from_state, to_state) VALUES (999, 1, NULL, 'pending')")
    source.close()
    assert main(["migrate-state", "--config", str(config_path), "--to", "postgresql"]) == 1
    assert "nothing was written" in capsys.readouterr().err
    fleet = Journal(PostgresConnector(postgres_dsn))
    try:
        assert fleet.counts_by_state() == {}  # the jobs copied before the bad event were rolled back with it
        assert fleet.read("SELECT id FROM charges") == [] and fleet.counter("duplicates_skipped") == 0
    finally:
        fleet.close()


def test_a_config_without_a_dsn_says_so_and_dsn_overrides(tmp_path, folders, emulator, postgres_dsn, capsys,
                                                           monkeypatch):
    config_path = postgres_config(tmp_path, folders, emulator, None, backend="sqlite")
    folders["state"].mkdir()
    source, jobs = build_sqlite_journal(folders["state"])
    events = len(source.read("SELECT id FROM job_events"))
    source.close()
    assert main(["migrate-state", "--config", str(config_path), "--to", "postgresql"]) == 2
    err = capsys.readouterr().err
    assert "state.postgresql.dsn" in err and "--dsn" in err and "Traceback" not in err

    assert main(["migrate-state", "--config", str(config_path), "--to", "postgresql",
                 "--dsn", "host=127.0.0.1 password=hunter2-secret"]) == 2
    err = capsys.readouterr().err
    assert "holds a password" in err and "hunter2-secret" not in err

    monkeypatch.setattr("daemon.migrate.BATCH", 3)  # several pages of every table
    assert main(["migrate-state", "--config", str(config_path), "--to", "postgresql", "--dsn", postgres_dsn]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"copied 4 jobs, {events} events and 4 ledger lines ") and "set state.backend" in out
    fleet = Journal(PostgresConnector(postgres_dsn))
    try:
        assert [j.id for j in fleet.read_jobs("SELECT * FROM jobs ORDER BY id")] == sorted(jobs)
        assert len(fleet.read("SELECT id FROM job_events")) == events
    finally:
        fleet.close()
    lock = try_instance_lock(folders["state"])  # migrate-state let go of the daemon's lock (same process)
    assert lock is not None
    os.close(lock)


def test_refused_without_a_sqlite_journal(tmp_path, folders, emulator, postgres_dsn, capsys):
    config_path = postgres_config(tmp_path, folders, emulator, postgres_dsn)
    assert main(["migrate-state", "--config", str(config_path), "--to", "postgresql"]) == 1
    assert "no SQLite journal at" in capsys.readouterr().err
    assert not (folders["state"] / "journal.sqlite3").exists()
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute(PUBLIC_TABLES).fetchone() == (0,)


@pytest.mark.parametrize("key", ["pid", "heartbeat", "paused", "inbox_unavailable", "schema_version"])
def test_meta_of_one_process_is_left_behind(key):
    from daemon.migrate import meta_to_copy

    assert meta_to_copy([(key, "x"), ("duplicates_skipped", "3")]) == [("duplicates_skipped", "3")]
