"""A person pausing and resuming submits, through the CLI, while the daemon runs."""

from __future__ import annotations

import json

from daemon.cli import main
from daemon.control import PAUSED_BY_PERSON
from daemon.journal import JobState

from .conftest import config_mapping, drop_scan, wait_for, write_config


def status_json(config_path, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", "--json", "--config", str(config_path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_person_pauses_submits_and_resumes_them(folders, emulator, tmp_path, run_daemon, make_config,
                                                   captured_logs, capsys):
    emulator.latency = 1.0
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    daemon = run_daemon(make_config())
    drop_scan(folders, "in-flight.jpg")
    wait_for(lambda: emulator.stats()["submits_accepted"] == 1, 20, what="the first submit")

    assert main(["pause", "--config", str(config_path)]) == 0
    wait_for(lambda: any(e["event"] == "submits.paused" and e["reason"] == PAUSED_BY_PERSON for e in captured_logs),
             10, what="the pause taking effect")
    drop_scan(folders, "waits.jpg", seed=1)
    # The job already at the provider finishes; the new file waits.
    wait_for(lambda: (folders["outbox"] / "in-flight.png").exists(), 30, what="the job in flight delivered")
    daemon.wait_for_passes(1.5)
    assert emulator.stats()["submits_accepted"] == 1
    report = status_json(config_path, capsys)
    assert report["paused"] == PAUSED_BY_PERSON and report["paused_by_person_since"] is not None
    assert report["counts"]["pending"] == 1 and report["oldest_pending"]["file"] == "waits.jpg"
    assert main(["pause", "--config", str(config_path)]) == 0
    assert "already paused" in capsys.readouterr().out

    assert main(["resume", "--config", str(config_path)]) == 0
    wait_for(lambda: (folders["outbox"] / "waits.png").exists(), 30, what="the waiting file restored after resume")
    assert any(e["event"] == "submits.resumed" and e.get("by") == "a person" for e in captured_logs)
    report = status_json(config_path, capsys)
    assert report["paused"] is None and report["paused_by_person_since"] is None
    assert report["submits_today"] == 2 == report["submits_this_month"]
    # The output is placed before the original is archived and the job marked done.
    wait_for(lambda: daemon.service.journal.count_in(JobState.DONE) == 2, 10, what="both jobs done")


def test_resume_leaves_a_pause_the_daemon_made_itself(folders, emulator, tmp_path, run_daemon, make_config, capsys):
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    run_daemon(make_config())
    assert main(["resume", "--config", str(config_path)]) == 0
    assert "not paused by a person" in capsys.readouterr().out


def test_a_pause_left_by_a_daemon_that_was_killed_is_not_shown_once_another_starts(folders, emulator, make_config,
                                                                                  run_daemon, capsys, tmp_path):
    """A daemon killed while the wallet was empty leaves its word in the journal; the next one starts
    with the wallet full: `status` must not say it is paused, and it is not."""
    from daemon.control import DAEMON_PAUSE_META
    from daemon.journal import Journal
    from daemon.service import journal_path

    config = make_config()
    left_behind = Journal(journal_path(config))
    left_behind.set_meta(DAEMON_PAUSE_META, "insufficient balance")
    left_behind.close()
    daemon = run_daemon(config)
    daemon.wait_for_passes()  # its start is behind it
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    assert status_json(config_path, capsys)["paused"] is None
    drop_scan(folders, "next.jpg", seed=3)
    wait_for(lambda: (folders["outbox"] / "next.png").exists(), 30, what="the next file restored")
