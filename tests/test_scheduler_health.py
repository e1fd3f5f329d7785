"""The scheduler stays healthy: no spinning loop, no stuck pause, no double spend under unlucky timing."""

from __future__ import annotations

import shutil
import threading
import time

from daemon import stages
from daemon.demo import make_photo
from daemon.journal import JobState

from .conftest import visible_files, wait_for


def _passes(daemon, seconds):
    """Loop passes per second, counted at the heartbeat step."""
    sched, count = daemon.service.scheduler, [0]
    real = sched.heartbeat
    sched.heartbeat = lambda: (count.__setitem__(0, count[0] + 1), real())
    time.sleep(seconds)
    sched.heartbeat = real
    return count[0] / seconds


def test_the_younger_copy_checked_first_still_costs_one_submit(tmp_path, folders, emulator, make_config, run_daemon, monkeypatch):
    real = stages.check_image
    younger_went_first = threading.Event()

    def slow_first(path, staging, stem, **k):
        if stem == "job-1":  # held until the younger copy has been checked and its submit has reached the provider
            deadline = time.monotonic() + 10
            while emulator.stats()["submits_received"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            if emulator.stats()["submits_received"]:
                younger_went_first.set()
        return real(path, staging, stem, **k)
    monkeypatch.setattr(stages, "check_image", slow_first)
    run_daemon(make_config())
    original = make_photo(tmp_path / "scan.jpg", 240, 180, seed=4, format="JPEG")
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(original, tmp_path / name)
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).rename(folders["inbox"] / name)
    wait_for(lambda: len(visible_files(folders["outbox"])) == 2, 20, what="two outputs")
    assert younger_went_first.is_set(), "the race this test is about did not happen"
    assert emulator.stats()["submits_accepted"] == 1


def test_the_loop_idles_after_a_job_timed_out(folders, emulator, make_config, run_daemon):
    emulator.latency = 30
    d = run_daemon(make_config(api={"job_timeout": 1, "poll_interval": 0.2}))
    make_photo(folders["inbox"] / "scan.jpg", 200, 160, seed=1, format="JPEG")
    wait_for(lambda: visible_files(folders["failed"]), 20, what="timeout failure")
    assert _passes(d, 2.0) < 20


def test_submits_resume_when_the_probe_job_vanished_while_paused(folders, emulator, make_config, run_daemon):
    emulator.balance = 0
    d = run_daemon(make_config())
    make_photo(folders["inbox"] / "gone.jpg", 200, 160, seed=1, format="JPEG")
    wait_for(lambda: d.service.scheduler.gate.paused, 10, what="paused")
    (folders["inbox"] / "gone.jpg").unlink()
    # The probe (after the gate's first backoff) goes to the job whose file is gone: it ends vanished, unsent.
    wait_for(lambda: d.service.journal.jobs_in(JobState.VANISHED), 20, what="the probe job to vanish")
    emulator.balance = 10
    make_photo(folders["inbox"] / "new.jpg", 200, 160, seed=2, format="JPEG")
    wait_for(lambda: (folders["outbox"] / "new.png").exists(), 20, what="the next probe to go out and succeed")
