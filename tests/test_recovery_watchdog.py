"""A long start-up recovery keeps systemd's watchdog fed: it is work being done, not a hung daemon."""

from __future__ import annotations

import time

import pytest

from daemon.demo import make_photo
from daemon.journal import Journal, JobState
from daemon.service import journal_path, loop_stale_after

from .conftest import wait_for
from .hosting_fixtures import command_settings, folder_server  # noqa: F401 - fixture
from .test_systemd import abstract_listener  # noqa: F401 - fixture

@pytest.mark.parametrize("jobs, publish_seconds", [
    (8, 1.0),  # many short steps: about 8 s of recovery in all
    (1, 7.5),  # one step longer than the loop may stay silent (a republish to a slow bucket)
])
def test_a_recovery_longer_than_the_watchdog_allows_is_pinged_through(
        jobs, publish_seconds, tmp_path, folders, emulator, make_config, run_daemon, folder_server,  # noqa: F811
        abstract_listener, monkeypatch, captured_logs):  # noqa: F811
    """Jobs at the provider are republished at start-up, each upload slow: a recovery longer than the
    loop may stay silent before the watchdog stops pinging (6 s)."""
    monkeypatch.setenv("STANDIN_SLOW_SECONDS", str(publish_seconds))
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = make_config(hosting={"adapter": "command", "command": command_settings(folder_server)})
    staged = tmp_path / "staged"
    staged.mkdir()
    journal = Journal(journal_path(config))
    for n in range(jobs):  # jobs a previous run left at the provider, each to be served again
        scan = make_photo(folders["inbox"] / f"scan{n}.jpg", 120, 90, seed=n, format="JPEG")
        upload = staged / f"slow{n}.jpg"  # the stand-in uploads names with "slow" in them slowly
        upload.write_bytes(scan.read_bytes())
        st = scan.stat()
        job = journal.add_job(scan.name, st.st_size, st.st_mtime_ns, config.restore.as_request())
        for state in (JobState.PUBLISHING, JobState.SUBMITTING):
            job = journal.transition(job, state)
        journal.transition(job, JobState.SUBMITTED, request_id=f"req-{n}", hosted_key=f"{'k' * 40}{n}.jpg",
                           upload_path=str(upload), polling_url=f"{emulator.status_url}/req-{n}",
                           submitted_at=time.time())
    journal.close()

    started = time.monotonic()
    run_daemon(config)
    wait_for(lambda: sum(e["event"] == "job.resumed" for e in captured_logs) == jobs, 30,
             what="every job republished")
    recovered = time.monotonic()
    assert recovered - started > loop_stale_after(0.2) + 1.0, "the recovery must outlast the watchdog's patience"
    wait_for(lambda: abstract_listener.times_of("WATCHDOG=1") and
             abstract_listener.times_of("WATCHDOG=1")[-1] > recovered, 5, what="a ping after the recovery")
    pings = [t for t in abstract_listener.times_of("WATCHDOG=1") if t <= recovered + 0.5]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert pings and pings[0] - started < 1.0 and max(gaps) < 1.0, f"pings stopped during recovery: {gaps}"
