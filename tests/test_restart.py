"""Nothing lost, nothing paid twice: the daemon as a real process, killed and stopped at any moment."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from daemon.demo import make_photo
from daemon.journal import FINAL_STATES, Journal, JobState
from daemon.service import JOURNAL_NAME

from .conftest import config_mapping, free_port, visible_files, wait_for, write_config


def chaos_config(tmp_path, folders, emulator, **api):
    mapping = config_mapping(folders, emulator,
                             api={"poll_interval": 0.1, "max_in_flight": 4, **api},
                             hosting={"adapter": "builtin", "builtin": {"listen": f"127.0.0.1:{free_port()}"}},
                             watch={"settle_seconds": 0.2, "rescan_seconds": 2},
                             logging={"format": "json", "level": "info"},
                             shutdown_timeout=5)
    return write_config(tmp_path / "config.yaml", mapping)


def drop(inbox: Path, staging: Path, name: str, seed: int) -> None:
    """Write elsewhere, then rename in: a complete file appears at once, as from a scanner."""
    temp = make_photo(staging / name, 160 + seed % 7 * 8, 120, seed=seed, format="JPEG")
    (inbox / name).parent.mkdir(parents=True, exist_ok=True)
    temp.rename(inbox / name)


def accounted_for(folders, names: list[str]) -> bool:
    """Every input has its output or its failed record, and the inbox is empty."""
    for name in names:
        output = folders["outbox"] / Path(name).with_suffix(".png")
        record = folders["failed"] / (name + ".error.json")
        if not (output.exists() or record.exists()):
            return False
    return visible_files(folders["inbox"]) == []


def every_job_final(folders) -> bool:
    """Nothing left for the daemon to do: past this, no submit, output or move can happen any more."""
    journal = Journal(folders["state"] / JOURNAL_NAME, read_only=True)
    try:
        return journal.count_in(*(set(JobState) - FINAL_STATES)) == 0
    finally:
        journal.close()


def run_chaos(tmp_path, folders, emulator, daemon_process, *, files: int, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    emulator.latency = 1.0
    config_path = chaos_config(tmp_path, folders, emulator)
    staging = tmp_path / "staging"
    staging.mkdir()
    names = [f"batch-{i // 5}/scan-{i:03d}.jpg" for i in range(files)]
    pending = list(names)
    per_round = -(-files // (kills + 1))

    proc = None
    for round_number in range(kills + 1):
        for name in pending[:per_round]:  # some arrive while the daemon is down, some while it runs
            drop(folders["inbox"], staging, name, seed=names.index(name))
        pending = pending[per_round:]
        proc = daemon_process(config_path)
        proc.wait_ready(count=round_number + 1)
        if round_number == kills:
            break
        time.sleep(rng.uniform(0.1, 2.5))
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)

    wait_for(lambda: accounted_for(folders, names), 120, interval=0.2, what="every input accounted for")
    wait_for(lambda: every_job_final(folders), 20, what="every job final in the journal")
    assert emulator.wait_idle(20), "the provider is still working on something"
    assert proc.terminate() == 0

    outbox_files = sorted(p for p in folders["outbox"].rglob("*") if p.is_file())
    failed_records = sorted(folders["failed"].rglob("*.error.json"))
    for name in names:
        output = folders["outbox"] / Path(name).with_suffix(".png")
        record = folders["failed"] / (name + ".error.json")
        assert output.exists() != record.exists(), f"{name}: exactly one of output / failed record"
    assert len(outbox_files) + len(failed_records) == files, "no extra (numbered or partial) outputs"
    assert all(not p.name.startswith(".") for p in outbox_files), "no temporary file left in the outbox"
    assert visible_files(folders["inbox"]) == []
    twice = {sha: n for sha, n in emulator.submits_by_content().items() if n > 1}
    assert twice == {}, "contents submitted twice"
    archived = visible_files(folders["archive"])
    assert len(archived) == len(outbox_files), "every restored original is archived, once"
    for record in failed_records:  # a failure after a kill can only be the one ambiguous window
        assert "may have reached the provider" in record.read_text() or "stopped while" in record.read_text()


def test_sigkill_at_random_moments_loses_nothing_and_pays_nothing_twice(tmp_path, folders, emulator,
                                                                       daemon_process):
    run_chaos(tmp_path, folders, emulator, daemon_process, files=20, kills=5, seed=20261124)


@pytest.mark.long
def test_sigkill_chaos_long(tmp_path, folders, emulator, daemon_process):
    run_chaos(tmp_path, folders, emulator, daemon_process, files=60, kills=15, seed=7)


def test_sigterm_during_a_busy_batch_exits_cleanly_and_a_restart_finishes_it(tmp_path, folders, emulator,
                                                                            daemon_process):
    emulator.latency = 2.0
    config_path = chaos_config(tmp_path, folders, emulator)
    staging = tmp_path / "staging"
    staging.mkdir()
    names = [f"scan-{i}.jpg" for i in range(8)]
    proc = daemon_process(config_path)
    proc.wait_ready()
    for i, name in enumerate(names):
        drop(folders["inbox"], staging, name, seed=i)
    wait_for(lambda: emulator.stats()["submits_accepted"] >= 4, 15, what="a busy batch")

    started = time.monotonic()
    assert proc.terminate(timeout=10) == 0
    took = time.monotonic() - started
    assert took < 5, f"stopped in {took:.1f}s, over shutdown_timeout"
    events = [e["event"] for e in proc.events()]
    assert "daemon.stopping" in events and "daemon.stopped" in events
    accepted_before = emulator.stats()["submits_accepted"]
    assert accepted_before < len(names), "the stop came while work was still waiting"

    proc = daemon_process(config_path)
    proc.wait_ready(count=2)
    wait_for(lambda: accounted_for(folders, names), 60, what="the batch finished after restart")
    assert len(visible_files(folders["outbox"])) == len(names)
    assert visible_files(folders["failed"]) == []
    assert emulator.stats()["submits_accepted"] == len(names)
    assert all(n == 1 for n in emulator.submits_by_content().values())
    resumed = [e for e in proc.events() if e.get("event") == "job.resumed"]
    assert resumed, "jobs still at the provider were resumed, not resubmitted"
    assert proc.terminate() == 0


def test_one_job_that_cannot_be_recovered_does_not_stop_the_others(folders, emulator, make_config, monkeypatch,
                                                                   captured_logs):
    """Recovery is per job: a job whose recovery fails (the inbox not mounted yet, a disk error)
    is left for the loop, and every other job is still carried on."""
    from daemon import recovery
    from daemon.journal import Journal, JobState
    from daemon.service import Service, journal_path
    from daemon.config import Secret

    config = make_config()
    journal = Journal(journal_path(config))
    params = config.restore.as_request()
    stuck = journal.add_job("a.jpg", 1, 1, params)
    stuck = journal.transition(journal.transition(stuck, JobState.PUBLISHING), JobState.SUBMITTING)
    other = journal.add_job("b.jpg", 1, 1, params)
    scan = folders["inbox"] / "b.jpg"
    scan.write_bytes(b"\xff\xd8 not really a jpeg, only served")
    other = journal.transition(journal.transition(other, JobState.PUBLISHING), JobState.SUBMITTING)
    journal.transition(other, JobState.SUBMITTED, hosted_key="K" * 43 + ".jpg", upload_path=str(scan),
                       request_id="r-1", polling_url=f"{emulator.status_url}/r-1", submitted_at=1.0)
    journal.close()

    def failing_fail(ctx, job, kind, reason, **kwargs):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(recovery, "fail", failing_fail)
    service = Service(config, Secret("k"))
    service.start()
    try:
        recovery.recover(service.scheduler.ctx)
        assert service.host.published_count() == 1, "the submitted job is served again"
        assert any(e["event"] == "recover.job_error" and e["job_id"] == stuck.id for e in captured_logs)
        assert any(e["event"] == "job.resumed" for e in captured_logs)
    finally:
        service.scheduler.stop()
        service._shutdown()
