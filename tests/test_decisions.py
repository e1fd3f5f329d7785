"""The small decisions behind the promises, each a pure function tested by a table, and the pin itself."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from daemon.demo import make_photo
from daemon.context import staged_job_id
from daemon.duplicates import DuplicateAction, duplicate_action
from daemon.journal import Job, Journal, JobState
from daemon.pacing import PollEvidence, overdue_reason
from daemon.preflight import check_image, pin, pin_holds
from daemon.stages import looks_like_fetch_failure, still_being_written

PARAMS = {"upscale": 2}


def job(state: JobState, output_path: str | None = None) -> Job:
    return Job(id=7, rel_path="a.jpg", state=state, size=1, mtime_ns=1, params=PARAMS, output_path=output_path)


@pytest.mark.parametrize("state, output_path, tried, expected", [
    (JobState.DONE, "/out/a.png", False, DuplicateAction.REUSE),
    (JobState.DONE, None, False, DuplicateAction.REUSE),  # its media URL may still serve the result
    (JobState.DONE, "/out/a.png", True, DuplicateAction.SUBMIT),  # looked for, gone: pay again
    (JobState.DELIVERING, "/out/a.png", False, DuplicateAction.REUSE),
    (JobState.DELIVERING, "/out/a.png", True, DuplicateAction.WAIT),
    (JobState.SUBMITTED, None, False, DuplicateAction.WAIT),
    (JobState.SUBMITTING, None, False, DuplicateAction.WAIT),
    (JobState.DOWNLOADING, None, True, DuplicateAction.WAIT),
    (JobState.PUBLISHING, None, False, DuplicateAction.WAIT),  # an older twin ahead in the queue
    (JobState.PENDING, None, False, DuplicateAction.WAIT),
])
def test_what_a_job_does_about_an_identical_one(state, output_path, tried, expected):
    assert duplicate_action(job(state, output_path), tried=tried) is expected


def evidence(*answers: tuple[float, int | None, bool, bool]) -> PollEvidence:
    e = PollEvidence()
    for at, status, usable, waiting in answers:
        e.heard(status, usable=usable, waiting=waiting, message=f"HTTP {status}", now=at)
    return e


@pytest.mark.parametrize("answers, expected_kind, words", [
    ([], None, None),
    ([(50.0, 200, True, True)], None, None),  # still waiting, within the timeout
    ([(150.0, 200, True, True)], "timeout", "still QUEUED after api.job_timeout"),
    ([(10.0, 404, False, False), (105.0, 404, False, False)], None, None),  # 95 s of 404s: not yet
    ([(10.0, 404, False, False), (111.0, 404, False, False)], "lost_at_provider", "no longer knows this job"),
    ([(10.0, 410, False, False), (111.0, 410, False, False)], "lost_at_provider", "no longer knows this job"),
    ([(10.0, 200, False, False), (111.0, 200, False, False)], "lost_at_provider", "no usable status"),  # nonsense
    ([(10.0, 400, False, False), (111.0, 400, False, False)], "lost_at_provider", "no usable status"),
    ([(10.0, 503, False, False), (111.0, 500, False, False)], None, None),  # an outage speaks of the provider
    ([(10.0, 429, False, False), (111.0, 429, False, False)], None, None),
    ([(10.0, 404, False, False), (60.0, 503, False, False), (111.0, 404, False, False)], "lost_at_provider",
     "no longer knows this job"),  # an overload in between neither resets nor counts
    ([(10.0, 404, False, False), (60.0, 200, True, True), (111.0, 404, False, False)], None, None),  # a usable answer resets
    ([(10.0, 404, False, False), (60.0, None, False, False), (111.0, None, False, False)], None, None),  # no answer: no word
    ([(200.0, 404, False, False), (290.0, 404, False, False)], None, None),  # long after the submit, a streak still counts
])
def test_when_a_job_in_flight_is_given_up(answers, expected_kind, words):
    verdict = overdue_reason(0.0, evidence(*answers), 100.0, remote_status="QUEUED")
    if expected_kind is None:
        assert verdict is None
    else:
        kind, reason = verdict
        assert kind == expected_kind and words in reason and "100" in reason


@pytest.mark.parametrize("message, expected", [
    ("Could not fetch image: HTTP 404", True),
    ("Could not fetch image: ConnectionError", True),
    ("failed to download the input image", True),
    ("Image URL returned 403", True),
    ("input unreachable", True),
    ("Injected failure: face restoration failed", False),
    ("Could not decode image: cannot identify image file", False),
    ("", False),
])
def test_which_provider_failures_say_it_could_not_fetch_the_scan(message, expected):
    assert looks_like_fetch_failure(message) is expected


@pytest.mark.parametrize("taken, now, age, settle, expected", [
    ((100, 5_000_000_000), (100, 5_000_000_000), 10.0, 0.5, False),  # old and unchanged: truly broken
    ((100, 5_000_000_000), (200, 6_000_000_000), 10.0, 0.5, True),  # grew since it was taken
    ((100, 5_000_000_000), (100, 5_000_000_000), 1.0, 0.5, True),  # modified within three settle periods
    ((100, 5_000_000_000), (100, 5_000_000_000), 1.6, 0.5, False),
    ((100, 5_000_000_000), (100, 5_000_000_000), 0.0, 0.0, False),  # no settle time: nothing to wait for
    ((100, 5_000_000_000), (100, 5_000_000_000), -3600.0, 0.5, False),  # a writer's clock an hour ahead
])
def test_when_a_scan_that_looks_incomplete_may_still_be_written(taken, now, age, settle, expected):
    wall = now[1] / 1e9 + age
    assert still_being_written(taken, now, wall, settle) is expected


@pytest.mark.parametrize("name, expected", [
    ("job-12-scan.jpg", 12), ("job-12.png", 12), ("job-3-a.b c.jpg", 3), ("job-12.png.tmp", 12),
    (".pin-0af3.tmp", None), ("job-x.png", None), ("jobs-1-a.jpg", None), ("notes.txt", None),
])
def test_which_job_a_staged_file_belongs_to(name, expected):
    assert staged_job_id(name) == expected


# --------------------------------------------------------------------------- the pin


def test_a_pin_on_the_same_file_system_is_a_hard_link_to_the_very_file_opened(tmp_path):
    (tmp_path / "inbox").mkdir()
    scan = make_photo(tmp_path / "inbox" / "a.jpg", 120, 90, seed=1, format="JPEG")
    with open(scan, "rb") as f:
        pinned, digest = pin(f, tmp_path / "staging", "job-1-a.jpg")
    assert os.stat(pinned).st_ino == os.stat(scan).st_ino
    assert pin_holds(pinned, digest, converted=False)
    with open(scan, "r+b") as f:  # a writer going on in place changes the pin too: it no longer holds
        f.seek(10)
        f.write(b"\x00\x01\x02")
    assert not pin_holds(pinned, digest, converted=False)


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
                    reason="needs a second file system for the staging folder")
def test_pinning_an_unchanged_scan_again_leaves_nothing_but_the_pin(tmp_path):
    (tmp_path / "inbox").mkdir()
    scan = make_photo(tmp_path / "inbox" / "a.jpg", 120, 90, seed=6, format="JPEG")
    for _ in range(3):  # a retry after a 5xx, a twin finished, a restart: each pins the same file again
        with open(scan, "rb") as f:
            pin(f, tmp_path / "staging", "job-1-a.jpg")
    assert os.listdir(tmp_path / "staging") == ["job-1-a.jpg"]


def test_a_pin_across_file_systems_is_a_copy_that_later_writes_cannot_reach(tmp_path):
    (tmp_path / "inbox").mkdir()
    scan = make_photo(tmp_path / "inbox" / "a.jpg", 120, 90, seed=2, format="JPEG")
    staging = Path("/dev/shm") / f"cfd-staging-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with open(scan, "rb") as f:
            pinned, digest = pin(f, staging, "job-1-a.jpg")
        assert os.stat(pinned).st_ino != os.stat(scan).st_ino and pinned.read_bytes() == scan.read_bytes()
        scan.write_bytes(b"replaced")
        assert pin_holds(pinned, digest, converted=False)
    finally:
        for p in staging.glob("*"):
            p.unlink()
        staging.rmdir()


def test_what_is_published_is_the_pin_not_whatever_the_inbox_path_leads_to_later(tmp_path):
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    (inbox / "album").mkdir(parents=True)
    outside.mkdir()
    scan = make_photo(inbox / "album" / "a.jpg", 120, 90, seed=3, format="JPEG")
    original = scan.read_bytes()
    checked = check_image(scan, tmp_path / "staging", "job-5", max_pixels=10**7)
    assert checked.upload_path.parent == tmp_path / "staging" and checked.upload_path.name == "job-5-a.jpg"
    # Someone with write access swaps the folder for a link to another one after the check.
    make_photo(outside / "a.jpg", 120, 90, seed=4, format="JPEG")
    (inbox / "album").rename(tmp_path / "album-moved")
    (inbox / "album").symlink_to(outside)
    assert checked.upload_path.read_bytes() == original and checked.still_pinned()


def test_a_bad_scan_leaves_no_pin_behind(tmp_path):
    (tmp_path / "inbox").mkdir()
    broken = tmp_path / "inbox" / "broken.jpg"
    broken.write_bytes(make_photo(tmp_path / "ok.jpg", 120, 90, seed=5, format="JPEG").read_bytes()[:500])
    from daemon.preflight import PreflightError

    with pytest.raises(PreflightError) as refused:
        check_image(broken, tmp_path / "staging", "job-6", max_pixels=10**7)
    assert refused.value.may_be_incomplete and "truncated" in refused.value.reason
    assert os.listdir(tmp_path / "staging") == []


# --------------------------------------------------------------------------- the journal's side


def test_enter_submitting_counts_a_done_twin_unless_its_result_was_already_found_gone(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite3")
    done = journal.add_job("a.jpg", 10, 1, PARAMS)
    for state in (JobState.PUBLISHING, JobState.SUBMITTING, JobState.SUBMITTED, JobState.DOWNLOADING,
                  JobState.DELIVERING, JobState.DONE):
        done = journal.transition(done, state, sha256="same")
    later = journal.update(journal.transition(journal.add_job("b.jpg", 10, 1, PARAMS), JobState.PUBLISHING),
                           sha256="same")
    blocked, twin = journal.enter_submitting(later, "submit")
    assert blocked is None and twin.id == done.id
    submitting, twin = journal.enter_submitting(later, "submit", settled_twins={done.id})
    assert twin is None and submitting.state is JobState.SUBMITTING
    journal.close()


def test_ready_jobs_are_chosen_in_sql_past_the_ones_backing_off_or_running(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite3")
    waiting = [journal.update(journal.add_job(f"old{n}.jpg", 1, 1, PARAMS), not_before=time.time() + 3600)
               for n in range(3)]
    running = journal.add_job("running.jpg", 1, 1, PARAMS)
    ready = journal.add_job("new.jpg", 1, 1, PARAMS)
    chosen = journal.jobs_in(JobState.PENDING, limit=1, due_by=time.time(), exclude=[running.id])
    assert [j.id for j in chosen] == [ready.id] and waiting
    journal.close()
