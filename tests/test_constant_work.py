"""Constant work per loop pass: what a pass costs follows what changed, not what the inbox holds.

Counted, not timed: the stats the watcher makes, the files it tracks, the SQL a pass runs, the
polls a job costs, the writes an idle heartbeat makes.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from pathlib import Path

import pytest

from daemon import reports
from daemon.journal import Journal, JobState
from daemon.watcher import InboxWatcher

from .conftest import ManualClock, wait_for

PARAMS = {"upscale": 2}


class StatCounter:
    """Counts the watcher's stats of inbox files (os.stat as the watcher module calls it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, inbox: Path) -> None:
        self.paths: list[str] = []
        real_stat = os.stat
        inbox_text = str(inbox)

        def counting_stat(path, *args, **kwargs):
            if str(path).startswith(inbox_text + os.sep):
                self.paths.append(str(path))
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr("daemon.watcher.os.stat", counting_stat)

    def take(self) -> list[str]:
        seen, self.paths = self.paths, []
        return seen


def small_jpeg() -> bytes:
    from daemon.demo import make_photo

    return make_photo(Path(tempfile.mkdtemp()) / "base.jpg", 48, 64, format="JPEG").read_bytes()


def fill_inbox(inbox: Path, count: int, *, age: float = 3600.0) -> list[tuple[str, int, int]]:
    """`count` small JPEGs written `age` seconds ago, each with its own comment (so its own
    content: identical bytes would be twins of one job); (rel_path, size, mtime_ns) of each."""
    base = small_jpeg()
    files = []
    past = time.time() - age
    for i in range(count):
        path = inbox / f"scan-{i:05d}.jpg"
        comment = b"scan %d" % i
        path.write_bytes(base[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + base[2:])
        os.utime(path, (past, past))
        st = path.stat()
        files.append((path.name, st.st_size, st.st_mtime_ns))
    return files


@pytest.fixture
def journal(tmp_path: Path):
    journal = Journal(tmp_path / "state" / "journal.sqlite3")
    yield journal
    journal.close()


@pytest.fixture
def watched(tmp_path: Path):
    made = []

    def make(inbox: Path, **options) -> tuple[InboxWatcher, ManualClock]:
        clock = ManualClock()
        watcher = InboxWatcher(inbox, settle_seconds=0.3, rescan_seconds=1000, clock=clock, **options)
        made.append(watcher)
        watcher.start()
        return watcher, clock

    yield make
    for watcher in made:
        watcher.stop()


def test_a_rescan_of_files_that_have_jobs_stats_none_of_them_and_tracks_none(tmp_path, journal, watched,
                                                                             monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    files = fill_inbox(inbox, 10_000)
    journal.add_jobs(files[:9_990], PARAMS)  # all but ten already have an unfinished job
    watcher, clock = watched(inbox)
    stats = StatCounter(monkeypatch, inbox)

    clock.now = 0.0
    taken = watcher.take_settled(journal.active_jobs_for, limit=500)  # the start-up rescan
    looked_at = stats.take()
    assert sorted(s.rel_path for s in taken) == [name for name, _, _ in files[9_990:]]  # quiet for an hour
    assert sorted(looked_at) == [str(inbox / name) for name, _, _ in files[9_990:]], \
        "a file the journal already has must not be looked at (and a new one only once)"
    assert len(watcher._tracker) == 0

    sql: list[str] = []
    journal._db.set_trace_callback(sql.append)
    clock.now = 1.0
    assert watcher.take_settled(journal.active_jobs_for, limit=500) == []  # nothing changed
    assert stats.take() == [] and sql == []


def test_settled_files_are_handed_back_a_batch_at_a_time_and_the_tracker_shrinks(tmp_path, journal, watched):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fill_inbox(inbox, 1_200)
    watcher, clock = watched(inbox)
    batches = []
    for step in range(4):
        clock.now = float(step)
        batch = watcher.take_settled(journal.active_jobs_for, limit=500)
        batches.append(len(batch))
        journal.add_jobs([(s.rel_path, s.size, s.mtime_ns) for s in batch], PARAMS)
        if step == 0:
            assert watcher.next_deadline() == clock.now  # more settled files wait: no nap now
    assert batches == [500, 500, 200, 0]
    assert len(watcher._tracker) == 0 and journal.count_in(JobState.PENDING) == 1_200


def test_a_file_changed_while_its_job_is_unfinished_is_held_until_the_job_ends(tmp_path, journal, watched):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watcher, clock = watched(inbox)
    clock.now = 0.0
    assert watcher.take_settled(journal.active_jobs_for) == []
    (inbox / "page.jpg").write_bytes(b"first scan")
    wait_for(lambda: watcher.take_settled(journal.active_jobs_for) == [] and "page.jpg" in watcher._tracker, 5)
    time.sleep(0.2)  # the close event, too
    assert watcher.take_settled(journal.active_jobs_for) == []  # seen complete at 0.0: settles at 0.3
    clock.now = 1.0
    [first] = watcher.take_settled(journal.active_jobs_for)
    [job] = journal.add_jobs([(first.rel_path, first.size, first.mtime_ns)], PARAMS)

    (inbox / "page.jpg").write_bytes(b"the scanner wrote it again, longer")
    wait_for(lambda: watcher.take_settled(journal.active_jobs_for) == [] and "page.jpg" in watcher._tracker, 5)
    time.sleep(0.2)  # the close event, too
    for clock.now in (2.0, 3.0):  # seen changed, then settled: its job is unfinished, so held, not taken
        assert watcher.take_settled(journal.active_jobs_for) == []
    assert "page.jpg" in watcher._held and len(watcher._tracker) == 0

    journal.transition(journal.transition(job, JobState.FAILING, "test"), JobState.FAILED, "test")
    clock.now = 4.0
    assert watcher.take_settled(journal.active_jobs_for) == []  # looked at afresh: it settles again
    clock.now = 4.5
    [again] = watcher.take_settled(journal.active_jobs_for)
    assert again.size == len(b"the scanner wrote it again, longer")


# ------------------------------------------------------------------ the daemon


def test_a_backlog_present_at_start_is_submitted_while_it_is_still_being_journalled(
        folders, emulator, make_config, run_daemon, captured_logs):
    fill_inbox(folders["inbox"], 1_500)
    emulator.latency = 30.0  # slots stay busy: only the first few are submitted
    run_daemon(make_config(watch={"settle_seconds": 30.0, "rescan_seconds": 600}))
    wait_for(lambda: sum(e["event"] == "file.detected" for e in captured_logs) == 1_500, 60,
             what="the backlog journalled")
    events = [e["event"] for e in captured_logs if e["event"] in ("file.detected", "job.submitted")]
    last_detected = len(events) - 1 - events[::-1].index("file.detected")
    assert "job.submitted" in events[:last_detected], "no submit went out before the whole backlog was journalled"
    # files quiet for an hour, that no one has open, do not wait out the 30 s settle time again
    assert all(e["settle_wait"] < 30 for e in captured_logs if e["event"] == "file.detected")


def test_an_idle_heartbeat_commits_nothing_and_syncs_nothing(folders, make_config, run_daemon, monkeypatch):
    synced = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, real=real, name=name: (synced.append(name), real(fd))[1])
    daemon = run_daemon(make_config())
    journal = daemon.service.journal
    heartbeat = Path(wait_for(lambda: journal.get_meta("heartbeat_file"), 10, what="the first heartbeat"))
    daemon.wait_for_passes(0.5)
    database = [Path(str(journal.path) + suffix) for suffix in ("", "-wal")]
    before = [(p.stat().st_size, p.stat().st_mtime_ns) for p in database]
    changes, synced[:] = journal._db.total_changes, []
    beat = heartbeat.stat().st_mtime_ns
    wait_for(lambda: heartbeat.stat().st_mtime_ns > beat, 10, what="a heartbeat")
    beat = heartbeat.stat().st_mtime_ns
    wait_for(lambda: heartbeat.stat().st_mtime_ns > beat, 10, what="another heartbeat")
    assert journal._db.total_changes == changes, "an idle heartbeat wrote to the journal"
    assert [(p.stat().st_size, p.stat().st_mtime_ns) for p in database] == before
    assert synced == []
    assert 0 <= reports.journal_summary(journal, time.time())["heartbeat_age_seconds"] < 10  # `status` still sees it


def test_a_job_with_a_webhook_is_polled_about_once(folders, emulator, make_config, run_daemon):
    from daemon.demo import make_photo

    emulator.latency = 0.5
    run_daemon(make_config(api={"poll_interval": 0.1, "max_in_flight": 4}))
    for i in range(8):
        make_photo(folders["inbox"].parent / f"p{i}.jpg", 64, 48, seed=i)
        (folders["inbox"].parent / f"p{i}.jpg").rename(folders["inbox"] / f"p{i}.jpg")
    wait_for(lambda: len(list(folders["outbox"].glob("*.png"))) == 8, 60, what="eight outputs")
    stats = emulator.stats()
    assert stats["submits_accepted"] == 8
    assert stats["polls"] / 8 <= 1.5, f"{stats['polls']} polls for 8 jobs whose webhooks all arrived"


def test_when_webhook_calls_never_come_jobs_are_still_noticed_and_polling_resumes(
        folders, emulator, make_config, run_daemon, captured_logs):
    from daemon.demo import make_photo

    emulator.latency = 0.2
    emulator.drop_webhooks = True
    run_daemon(make_config(api={"poll_interval": 0.1, "max_in_flight": 2}))
    for i in range(4):
        make_photo(folders["inbox"].parent / f"p{i}.jpg", 64, 48, seed=i)
        (folders["inbox"].parent / f"p{i}.jpg").rename(folders["inbox"] / f"p{i}.jpg")
    wait_for(lambda: len(list(folders["outbox"].glob("*.png"))) == 4, 60, what="four outputs")
    warnings = [e for e in captured_logs if e["event"] == "webhook.not_arriving"]
    assert len(warnings) == 1 and "public_url" in warnings[0]["detail"]


def test_no_pass_reads_the_whole_backlog(folders, emulator, make_config, run_daemon, captured_logs):
    """With thousands of jobs waiting (an empty wallet holds them), every query a pass makes is an
    index seek that stops early: no full scan of the jobs, no sort of every pending row."""
    fill_inbox(folders["inbox"], 3_000)
    emulator.balance = 0
    daemon = run_daemon(make_config(watch={"settle_seconds": 0.3, "rescan_seconds": 1}))
    wait_for(lambda: sum(e["event"] == "file.detected" for e in captured_logs) == 3_000, 60,
             what="the backlog journalled")
    journal = daemon.service.journal
    statements: list[str] = []
    journal._db.set_trace_callback(statements.append)
    daemon.wait_for_passes(2.5)  # a rescan of 3,000 files, heartbeats, retry checks included
    journal._db.set_trace_callback(None)
    queries = {s for s in statements if s.lstrip().upper().startswith("SELECT") and "jobs" in s}
    assert queries, "the passes asked nothing of the journal"
    with journal.store._lock:
        plans = {q: " / ".join(r[3] for r in journal._db.execute("EXPLAIN QUERY PLAN " + q)) for q in queries}
    full_reads = {q: plan for q, plan in plans.items() if "SCAN jobs" in plan or "TEMP B-TREE" in plan}
    assert full_reads == {}, "\n".join(f"{q}\n    -> {p}" for q, p in full_reads.items())


def test_submits_wait_while_finished_results_wait_for_their_delivery(folders, emulator, make_config, run_daemon,
                                                                      monkeypatch):
    """A provider faster than the station's deliveries must not run ahead until its links expire."""
    from daemon import scheduler
    from daemon.demo import make_photo

    monkeypatch.setattr(scheduler, "DOWNLOADS_AT_ONCE", 0)  # the station delivers nothing for now
    emulator.latency = 0.05
    daemon = run_daemon(make_config(api={"max_in_flight": 2}))
    for i in range(8):
        make_photo(folders["inbox"].parent / f"p{i}.jpg", 48, 40, seed=i)
        (folders["inbox"].parent / f"p{i}.jpg").rename(folders["inbox"] / f"p{i}.jpg")
    journal = daemon.service.journal
    wait_for(lambda: journal.count_in(JobState.DOWNLOADING) >= 4, 30, what="four results waiting")
    daemon.wait_for_passes(1.0)
    accepted = emulator.stats()["submits_accepted"]
    # Once 2 x max_in_flight results wait, no submit starts; only those already in flight finish.
    assert 4 <= accepted <= 4 + 2 and journal.count_in(JobState.DOWNLOADING) == accepted
    daemon.wait_for_passes(1.0)
    assert emulator.stats()["submits_accepted"] == accepted
    monkeypatch.setattr(scheduler, "DOWNLOADS_AT_ONCE", 1)
    daemon.service.scheduler.wake.set()
    wait_for(lambda: len(list(folders["outbox"].glob("*.png"))) == 8, 60, what="all eight delivered")
    assert emulator.stats()["submits_accepted"] == 8


COMMITS_PER_JOB = 8
"""A restored file's journal commits from its drop to done: taken (one batch for many files), slot
taken, checked and named for publishing, about to submit, accepted, completed, output named,
delivered with its archive name, done. Each records what must be durable before the next step's
side effect (a publish, a paid submit, a link into the outbox, a move into the archive)."""


def test_a_restored_file_costs_a_bounded_number_of_journal_commits(folders, emulator, make_config, run_daemon):
    from daemon.demo import make_photo

    daemon = run_daemon(make_config(api={"poll_interval": 0.1}))
    daemon.wait_for_passes(0.3)
    statements: list[str] = []
    daemon.service.journal._db.set_trace_callback(statements.append)
    for i in range(4):
        make_photo(folders["inbox"].parent / f"p{i}.jpg", 64, 48, seed=i)
        (folders["inbox"].parent / f"p{i}.jpg").rename(folders["inbox"] / f"p{i}.jpg")
    wait_for(lambda: len(list(folders["archive"].glob("*.jpg"))) == 4, 60, what="four originals archived")
    wait_for(lambda: daemon.service.journal.count_in(JobState.DONE) == 4, 10, what="four jobs done")
    daemon.service.journal._db.set_trace_callback(None)
    commits = sum(s.strip().upper() == "COMMIT" for s in statements)
    assert commits <= 4 * (COMMITS_PER_JOB + 1), f"{commits} commits for 4 files"
