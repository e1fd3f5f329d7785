"""The journal: legal transitions only, compare-and-set, one active job per path, durable across reopen."""

from __future__ import annotations

import sqlite3
import time

import pytest

from daemon import reports
from daemon.journal import SCHEMA_VERSION, TRANSITIONS, Journal, JobState, JournalError, StaleTransition

PARAMS = {"codeformer_fidelity": 0.5, "background_enhance": True, "face_upsample": True, "upscale": 2}


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.sqlite3")
    yield j
    j.close()


def test_journal_is_wal_with_full_sync(tmp_path, monkeypatch):
    """The journal itself asks for WAL and FULL; a library whose defaults are weaker must not weaken it.

    SQLite's usual compiled default is already FULL, so every connection here starts at OFF first (as a build
    with a weaker default would): only the journal's own PRAGMA can bring it back to FULL.
    """
    real_connect = sqlite3.connect

    def connect_with_weak_defaults(*args, **kwargs):
        db = real_connect(*args, **kwargs)
        db.execute("PRAGMA synchronous = OFF")
        return db

    monkeypatch.setattr(sqlite3, "connect", connect_with_weak_defaults)
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.add_job("a.jpg", 10, 1, PARAMS)
    assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert path.with_name(path.name + "-wal").exists()  # commits went to the write-ahead log
    journal.close()
    header = path.read_bytes()[:100]
    assert header[18:20] == bytes([2, 2])  # file format versions 2/2: the database file itself is in WAL mode


def test_states_are_readable_text_and_every_state_has_a_transition_entry():
    assert set(TRANSITIONS) == set(JobState)
    assert JobState.SUBMITTED.value == "submitted"


def test_a_path_has_at_most_one_unfinished_job(journal):
    job = journal.add_job("a.jpg", 10, 1, PARAMS)
    assert journal.add_job("a.jpg", 10, 1, PARAMS) is None
    job = journal.transition(job, JobState.FAILING, "bad")
    journal.transition(job, JobState.FAILED, "bad")
    assert journal.add_job("a.jpg", 10, 1, PARAMS) is not None  # a new drop of the same name is new work


def test_illegal_transition_raises(journal):
    job = journal.add_job("a.jpg", 10, 1, PARAMS)
    with pytest.raises(ValueError, match="illegal transition pending -> done"):
        journal.transition(job, JobState.DONE)


def test_compare_and_set_lets_only_one_path_win(journal):
    job = journal.add_job("a.jpg", 10, 1, PARAMS)
    journal.transition(job, JobState.PUBLISHING)
    with pytest.raises(StaleTransition):
        journal.transition(job, JobState.PUBLISHING)  # `job` still says PENDING: the second mover loses


def test_transitions_are_durable_and_recorded_in_history(tmp_path):
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    job = journal.add_job("x/y.jpg", 10, 1, PARAMS)
    job = journal.transition(job, JobState.PUBLISHING, "slot taken", hosted_key="k")
    journal.close()
    reopened = Journal(path)
    [again] = reopened.jobs_in(JobState.PUBLISHING)
    assert again.hosted_key == "k" and again.params == PARAMS
    assert [h["to_state"] for h in reopened.history(job.id)] == ["pending", "publishing"]
    reopened.close()


def test_corrupt_journal_refuses_to_open_with_the_reason(tmp_path):
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match="cannot open journal"):
        Journal(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="schema version 99"):
        Journal(path)


def test_a_reader_names_a_journal_of_another_release_rather_than_failing_on_a_column(tmp_path):
    """`status` opens the journal read-only and never migrates it: between an upgrade and the daemon's
    restart it says what to do instead of a traceback about a missing column."""
    path = tmp_path / "journal.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.close()
    with pytest.raises(JournalError, match=f"schema version 1, older than this release's {SCHEMA_VERSION}: "
                                           "start the daemon once"):
        Journal(path, read_only=True)
    Journal(path).close()  # the daemon's start upgrades it
    Journal(path, read_only=True).close()


def test_a_lone_daemons_lost_inbox_stays_in_status_however_long_it_runs(journal):
    """On SQLite nobody renews the run's lease (the lock file keeps the daemon alone): what it said of
    its inbox holds until it says otherwise."""
    journal.join("solo", lease_seconds=0.1)
    journal.note_inbox("share gone")
    time.sleep(0.3)
    assert reports.inbox_unavailable(journal) == "share gone"
    journal.note_inbox(None)
    assert reports.inbox_unavailable(journal) is None


def test_read_only_journal_reads_beside_a_writer(journal):
    journal.add_job("a.jpg", 10, 1, PARAMS)
    reader = Journal(journal.path, read_only=True)
    assert reports.journal_summary(reader, 0)["counts"]["pending"] == 1
    reader.close()


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO meta VALUES ('inbox_unavailable', 'the share is gone');
CREATE TABLE jobs (id INTEGER PRIMARY KEY, rel_path TEXT NOT NULL, state TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, params TEXT NOT NULL, sha256 TEXT, upload_path TEXT, hosted_key TEXT,
    request_id TEXT, polling_url TEXT, remote_status TEXT, media_url TEXT, output_path TEXT, final_path TEXT,
    submit_attempts INTEGER NOT NULL DEFAULT 0, download_attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0, last_error TEXT, error_kind TEXT, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, submitted_at REAL, finished_at REAL);
CREATE TABLE job_events (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL, at REAL NOT NULL, from_state TEXT,
    to_state TEXT NOT NULL, detail TEXT);
INSERT INTO jobs (rel_path, state, size, mtime_ns, params, request_id, created_at, updated_at, submitted_at)
    VALUES ('old.jpg', 'submitted', 5, 1, '{"upscale": 2}', 'req-from-v1', 1.0, 1.0, 1.0);
"""


def test_a_version_1_journal_is_migrated_in_place_keeping_its_jobs(tmp_path):
    path = tmp_path / "journal.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.close()
    journal = Journal(path)
    assert journal.get_meta("schema_version") == str(SCHEMA_VERSION) == "9"
    [job] = journal.jobs_in(JobState.SUBMITTED)
    assert job.request_id == "req-from-v1" and job.duplicate_of is None
    journal.update(job, duplicate_of=None, sha256="abc")  # v2: the new column and index are usable
    journal.request_retry([job.id])  # v3: the retry requests table
    assert journal.retry_requests() == [job.id]
    assert journal.update(job, output_sha256="def").output_sha256 == "def"  # v4: the output's hash
    assert journal.next_due([JobState.SUBMITTED], after=0.0) is None  # v5: the backoff index
    plan = journal._db.execute("EXPLAIN QUERY PLAN SELECT min(not_before) FROM jobs WHERE state = ? "
                               "AND not_before > ?", ("pending", 0.0)).fetchall()
    assert "jobs_by_state_due" in str([tuple(r) for r in plan])
    # v6: the events by state and time, for the overview's restored-per-hour chart
    plan = journal._db.execute("EXPLAIN QUERY PLAN SELECT count(*) FROM job_events WHERE to_state = 'done' "
                               "AND at >= ?", (0.0,)).fetchall()
    assert "job_events_by_state_at" in str([tuple(r) for r in plan])
    plan = journal._db.execute("EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE state = 'failed' "
                               "ORDER BY updated_at DESC LIMIT 10").fetchall()
    assert "jobs_by_state_updated" in str([tuple(r) for r in plan])  # the recent failures, without a sort
    job = journal.update(journal.get(job.id), profile="portraits", output_settings={"format": "jpeg"})
    assert (job.profile, job.output_settings) == ("portraits", {"format": "jpeg"})  # v7: what a job was taken with
    assert journal.get(job.id).output_settings == {"format": "jpeg"}
    journal._db.execute("INSERT INTO charges(job_id, request_id, at, kind) VALUES (?, 'r', 1.0, 'charged')",
                        (job.id,))  # v7: the ledger
    assert journal.get_meta("inbox_unavailable") is None  # v9: each run's own, on its row
    journal.join("station")  # v8: the runs that held jobs, and their leases
    journal.note_inbox("share gone")  # v9: why a run cannot read its inbox
    [node] = journal.nodes()
    assert (node.name, node.inbox_unavailable) == ("station", "share gone")
    journal.close()


def test_of_two_identical_jobs_only_one_can_enter_submitting(journal):
    """The younger copy claimed its content first and got ahead: the older one must wait, not pay."""
    older = journal.add_job("a.jpg", 10, 1, PARAMS)
    younger = journal.add_job("b.jpg", 10, 1, PARAMS)
    younger = journal.update(journal.transition(younger, JobState.PUBLISHING), sha256="same")
    older = journal.update(journal.transition(older, JobState.PUBLISHING), sha256="same")
    submitting, twin = journal.enter_submitting(younger, "first")
    assert submitting.state is JobState.SUBMITTING and twin is None
    blocked, twin = journal.enter_submitting(older, "second")
    assert blocked is None and twin.id == younger.id
    assert journal.find_twin(older).id == younger.id  # a younger twin ahead of it counts too


def test_waiting_twins_never_wait_for_each_other(journal):
    first = journal.update(journal.add_job("a.jpg", 10, 1, PARAMS), sha256="same")
    second = journal.update(journal.add_job("b.jpg", 10, 1, PARAMS), sha256="same")
    assert journal.find_twin(second).id == first.id
    assert journal.find_twin(first) is None  # the older one goes first
