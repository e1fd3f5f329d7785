"""One contract, two databases: the journal's promises hold the same on SQLite and on a real PostgreSQL.

Each test opens the journal through the `open_journal` fixture, once per backend; "another daemon" is
a second Journal on the same database (a second connection), as a second process would have.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.journal import Charge, Journal, JobState, NewJob, StaleTransition
from daemon.reports import journal_summary, status_report
from daemon.storage.postgresql import PostgresConnector
from daemon.storage.sqlite import SQLiteConnector

PARAMS = {"codeformer_fidelity": 0.7, "upscale": 2}


@pytest.fixture(params=["sqlite", "postgresql"])
def open_journal(request, tmp_path: Path) -> Callable[[], Journal]:
    """Opens a Journal on this test's database; every call is a new connection to the same one."""
    opened: list[Journal] = []
    if request.param == "sqlite":
        def connector():
            return SQLiteConnector(tmp_path / "journal.sqlite3")
    else:
        dsn = request.getfixturevalue("postgres_dsn")

        def connector():
            return PostgresConnector(dsn)

    def open_one() -> Journal:
        journal = Journal(connector())
        opened.append(journal)
        return journal

    yield open_one
    for journal in opened:
        journal.close()


def to_submitted(journal: Journal, job, request_id: str = "req-1"):
    job = journal.transition(job, JobState.PUBLISHING, "slot taken")
    job = journal.update(job, sha256=f"sha-{job.id}", hosted_key=f"key-{job.id}")
    job, twin = journal.enter_submitting(job, "submit about to be sent")
    assert twin is None
    return journal.transition(job, JobState.SUBMITTED, "accepted", request_id=request_id, submitted_at=time.time())


# --------------------------------------------------------------------------- jobs and the state machine


def test_one_unfinished_job_per_path(open_journal):
    journal = open_journal()
    first = journal.add_job("a/scan.jpg", 10, 1, PARAMS)
    assert first is not None and first.state is JobState.PENDING and first.params == PARAMS
    assert journal.add_job("a/scan.jpg", 10, 1, PARAMS) is None
    added = journal.add_jobs([NewJob("a/scan.jpg", 10, 1, PARAMS), NewJob("b.jpg", 5, 2, PARAMS, profile="p",
                                                                           output_settings={"format": "png"})])
    assert [j.rel_path for j in added] == ["b.jpg"] and added[0].output_settings == {"format": "png"}
    job = journal.transition(first, JobState.FAILING, "bad file")
    journal.transition(job, JobState.FAILED, "moved")
    again = journal.add_job("a/scan.jpg", 10, 1, PARAMS)
    assert again is not None and again.id > added[0].id, "a finished path can be taken again"
    assert journal.active_jobs_for(["a/scan.jpg", "b.jpg", "c.jpg"]) == {"a/scan.jpg": (10, 1), "b.jpg": (5, 2)}


def test_compare_and_set_and_history(open_journal):
    journal = open_journal()
    job = journal.add_job("scan.jpg", 10, 1, PARAMS)
    moved = journal.transition(job, JobState.PUBLISHING, "slot taken", not_before=5.0)
    assert moved.state is JobState.PUBLISHING and moved.not_before == 5.0
    with pytest.raises(StaleTransition):
        journal.transition(job, JobState.PUBLISHING, "second path")  # read as PENDING: no longer so
    with pytest.raises(ValueError, match="illegal transition"):
        journal.transition(moved, JobState.DONE)
    with pytest.raises(ValueError, match="unknown job columns"):
        journal.update(moved, colour="red")
    assert [(e["from_state"], e["to_state"], e["detail"]) for e in journal.history(job.id)] == [
        (None, "pending", "detected"), ("pending", "publishing", "slot taken")]


def test_queries_the_loop_uses(open_journal):
    journal = open_journal()
    jobs = journal.add_jobs([(f"s{i}.jpg", i, i) for i in range(5)], PARAMS)
    journal.update(jobs[0], not_before=100.0)
    journal.update(jobs[1], sha256="abc")
    assert [i for i, _ in journal.next_pending(limit=3, due_by=50.0)] == [jobs[1].id, jobs[2].id, jobs[3].id]
    assert journal.next_pending(limit=1, due_by=50.0, exclude=[jobs[1].id]) == [(jobs[2].id, False)]
    assert journal.next_pending(limit=1, due_by=50.0) == [(jobs[1].id, True)]
    assert journal.next_due([JobState.PENDING], after=50.0) == 100.0
    assert [j.id for j in journal.jobs_in(JobState.PENDING, limit=2, due_by=50.0)] == [jobs[1].id, jobs[2].id]
    assert journal.count_in(JobState.PENDING) == 5
    assert journal.ids_in(JobState.PENDING) == [j.id for j in jobs]
    assert journal.counts_by_state() == {"pending": 5}


def test_meta_counters_and_retry_requests(open_journal):
    journal = open_journal()
    journal.set_meta("paused", "insufficient balance")
    journal.set_meta("paused", "key rejected")
    assert journal.get_meta("paused") == "key rejected"
    journal.set_meta("paused", None)
    assert journal.get_meta("paused") is None
    journal.add_to_counter("duplicates_skipped")
    journal.add_to_counter("duplicates_skipped", 2)
    assert journal.counter("duplicates_skipped") == 3
    journal.request_retry([3, 1])
    journal.request_retry([1])
    assert journal.retry_requests() == [1, 3]
    assert journal.take_retry_request(1) is True
    assert open_journal().take_retry_request(1) is False, "of several daemons, one takes a request"
    assert journal.retry_requests() == [3]


def test_the_ledger(open_journal):
    journal = open_journal()
    with journal.transaction():
        journal.record_charge(1, "r1", 1000.0, Charge.CHARGED)
        journal.record_charge(2, "r2", 1500.0, Charge.POSSIBLY_CHARGED)
    journal.record_charge(1, "r1", 1000.0, Charge.REFUNDED)
    assert journal.charged_between(0, 2000) == 1
    assert journal.charged_between(1200, 2000) == 1
    assert journal.charged_between(0, 1200) == 0
    assert journal.last_charge_id() == 3


def test_a_transaction_is_all_or_nothing(open_journal):
    journal = open_journal()
    job = journal.add_job("scan.jpg", 10, 1, PARAMS)
    with pytest.raises(RuntimeError):
        with journal.transaction():
            journal.transition(job, JobState.PUBLISHING, "slot taken")
            journal.record_charge(job.id, None, 1.0, Charge.CHARGED)
            raise RuntimeError("crash before the commit")
    assert journal.get(job.id).state is JobState.PENDING
    assert journal.last_charge_id() == 0
    assert journal.history(job.id)[-1]["to_state"] == "pending"


def test_twins_and_the_last_guard_against_paying_twice(open_journal):
    journal = open_journal()
    first, second = journal.add_jobs([("a.jpg", 1, 1), ("copy-of-a.jpg", 1, 1)], PARAMS)
    first = journal.update(journal.transition(first, JobState.PUBLISHING), sha256="same")
    second = journal.update(journal.transition(second, JobState.PUBLISHING), sha256="same")
    assert journal.find_twin(second).id == first.id  # older, not launched yet: the newer waits for it
    assert journal.find_twin(first) is None
    submitting, twin = journal.enter_submitting(first, "submit")
    assert submitting.state is JobState.SUBMITTING and twin is None
    blocked, twin = journal.enter_submitting(second, "submit")
    assert blocked is None and twin.id == first.id


# --------------------------------------------------------------------------- several daemons on one database


def test_one_file_seen_by_two_daemons_is_one_job(open_journal):
    daemons = [open_journal(), open_journal()]
    results: list = []
    barrier = threading.Barrier(2)

    def add(journal):
        barrier.wait()
        results.append(journal.add_jobs([(f"shared/scan-{i}.jpg", 1, 1) for i in range(20)], PARAMS))

    threads = [threading.Thread(target=add, args=(j,)) for j in daemons]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sum(len(r) for r in results) == 20
    assert daemons[0].count_in(JobState.PENDING) == 20


def test_identical_content_racing_on_two_daemons_is_submitted_once(open_journal):
    first, second = open_journal(), open_journal()
    for journal in (first, second):
        journal.join("station")
    a, b = first.add_jobs([("a.jpg", 1, 1), ("b.jpg", 1, 1)], PARAMS)
    a = first.update(first.transition(a, JobState.PUBLISHING), sha256="same")
    b = second.update(second.transition(b, JobState.PUBLISHING), sha256="same")
    outcomes: list = []
    barrier = threading.Barrier(2)

    def enter(journal, job):
        barrier.wait()
        outcomes.append(journal.enter_submitting(job, "submit"))

    threads = [threading.Thread(target=enter, args=args) for args in ((first, a), (second, b))]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sorted(moved is not None for moved, _twin in outcomes) == [False, True]


def test_claims_never_exceed_the_fleet_limit(open_journal):
    daemons = [open_journal() for _ in range(3)]
    for i, journal in enumerate(daemons):
        journal.join(f"station-{i}")
    daemons[0].add_jobs([(f"s{i}.jpg", 1, 1) for i in range(30)], PARAMS)
    claimed: list[list] = []
    barrier = threading.Barrier(3)

    def claim(journal):
        barrier.wait()
        for _ in range(5):
            claimed.append(journal.claim(4, in_flight_limit=4, due_by=time.time()))

    threads = [threading.Thread(target=claim, args=(j,)) for j in daemons]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    taken = [job for batch in claimed for job in batch]
    assert len(taken) == 4 and len({j.id for j in taken}) == 4
    assert daemons[0].count_in(JobState.PUBLISHING) == 4
    owners = {j.owner for j in taken}
    assert owners <= {d.token for d in daemons}


def test_a_lapsed_lease_hands_the_jobs_over_and_the_old_holder_can_no_longer_move_them(open_journal):
    old, new = open_journal(), open_journal()
    old.join("north", lease_seconds=1)
    new.join("south", lease_seconds=1)
    job = to_submitted(old, old.add_job("scan.jpg", 1, 1, PARAMS))
    assert job.owner == old.token
    assert new.take_over() == [], "a live lease is not taken over"
    assert new.jobs_in(JobState.SUBMITTED) == [], "a daemon works only on what it holds"
    with pytest.raises(StaleTransition):
        new.transition(job, JobState.DOWNLOADING, "not mine")
    time.sleep(1.3)  # old's lease lapses; new renews its own
    assert new.renew_lease()
    taken = new.take_over()
    assert [(j.id, j.state, j.request_id, j.owner) for j in taken] == [(job.id, JobState.SUBMITTED, "req-1", new.token)]
    with pytest.raises(StaleTransition, match="here"):
        old.transition(job, JobState.DOWNLOADING, "too late")
    assert old.jobs_in(JobState.SUBMITTED) == []
    done = new.transition(taken[0], JobState.DOWNLOADING, "provider completed")
    assert done.owner == new.token
    assert new.take_over() == []


def test_a_clean_stop_hands_over_at_once(open_journal):
    leaving, staying = open_journal(), open_journal()
    leaving.join("north", lease_seconds=60)
    staying.join("south", lease_seconds=60)
    job = leaving.transition(leaving.add_job("scan.jpg", 1, 1, PARAMS), JobState.PUBLISHING)
    assert staying.take_over() == []
    leaving.leave()
    assert [j.id for j in staying.take_over()] == [job.id]


def test_a_restart_on_its_own_journal_takes_everything_back(open_journal):
    before = open_journal()
    before.join("station", lease_seconds=60)
    job = to_submitted(before, before.add_job("scan.jpg", 1, 1, PARAMS))
    after = open_journal()
    after.join("station", lease_seconds=60)
    assert after.take_over() == [], "in a fleet a live lease is respected"
    assert [j.id for j in after.take_over(everything=True)] == [job.id]


def test_pending_and_final_jobs_are_nobodys(open_journal):
    journal = open_journal()
    journal.join("station")
    job = journal.transition(journal.add_job("scan.jpg", 1, 1, PARAMS), JobState.PUBLISHING)
    assert job.owner == journal.token
    back = journal.transition(job, JobState.PENDING, "publish again")
    assert back.owner is None
    failing = journal.transition(back, JobState.FAILING, "bad")
    assert journal.transition(failing, JobState.FAILED, "moved").owner is None


def test_status_reads_the_same_on_both(open_journal):
    daemon, reader = open_journal(), open_journal()
    daemon.join("north", lease_seconds=30)
    to_submitted(daemon, daemon.add_job("scan.jpg", 1, 1, PARAMS))
    daemon.add_job("next.jpg", 1, 1, PARAMS)
    report = status_report(reader, time.time())
    assert report["counts"]["submitted"] == 1 and report["counts"]["pending"] == 1
    assert [j["file"] for j in report["in_flight"]] == ["scan.jpg"]
    assert report["oldest_pending"]["file"] == "next.jpg"
    assert report["submissions_spent"] == 1
    summary = journal_summary(reader, time.time())
    if reader.store.shared:
        assert [(n["node"], n["alive"], n["holding"]) for n in summary["fleet"]] == [("north", True, 1)]
    else:
        assert summary["fleet"] is None


def test_claims_never_pass_a_spending_limit_together(open_journal):
    daemons = [open_journal() for _ in range(3)]
    for i, journal in enumerate(daemons):
        journal.join(f"station-{i}")
    now = time.time()
    daemons[0].add_jobs([(f"s{i}.jpg", 1, 1) for i in range(20)], PARAMS)
    daemons[0].record_charge(999, "earlier", now - 10, Charge.CHARGED)  # one image of today's five paid already
    caps = [(5, now - 3600, now + 3600), (100, now - 86400, now + 86400)]
    claimed: list[list] = []
    barrier = threading.Barrier(3)

    def claim(journal):
        barrier.wait()
        for _ in range(4):
            claimed.append(journal.claim(3, in_flight_limit=10, due_by=now, spending_caps=caps))

    threads = [threading.Thread(target=claim, args=(j,)) for j in daemons]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sum(len(batch) for batch in claimed) == 4, "1 paid + 4 launching = the day's 5"


def test_a_daemon_sees_the_queue_and_history_but_only_its_own_held_jobs(open_journal):
    mine, theirs = open_journal(), open_journal()
    mine.join("north")
    theirs.join("south")
    queued, held_here, held_there, finished = mine.add_jobs([(f"s{i}.jpg", 1, 1) for i in range(4)], PARAMS)
    held_here = mine.transition(held_here, JobState.PUBLISHING)
    theirs.transition(held_there, JobState.PUBLISHING)
    mine.transition(mine.transition(finished, JobState.FAILING), JobState.FAILED)
    assert [j.id for j in mine.jobs_in(*JobState)] == [queued.id, held_here.id, finished.id]
    assert mine.ids_in(JobState.PUBLISHING) == [held_here.id]
    assert mine.count_in(JobState.PUBLISHING) == 2, "slots are counted fleet-wide"


def test_runs_long_over_leave_the_list_of_daemons(open_journal):
    old, holding, recent = open_journal(), open_journal(), open_journal()
    old.join("north", lease_seconds=1)
    holding.join("south", lease_seconds=1)
    holding.transition(holding.add_job("scan.jpg", 1, 1, PARAMS), JobState.PUBLISHING)
    recent.join("east", lease_seconds=1)
    with old.transaction() as cur:  # north and south ended eight days ago, east an hour ago
        cur.execute("UPDATE nodes SET lease_until = lease_until - ? WHERE name IN ('north', 'south')", (8 * 86400,))
        cur.execute("UPDATE nodes SET lease_until = lease_until - 3600 WHERE name = 'east'")
    open_journal().join("west")
    assert sorted(n.name for n in recent.nodes()) == ["east", "south", "west"], "south still holds a job"
