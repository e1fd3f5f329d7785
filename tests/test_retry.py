"""`codeformer-daemon retry`: failed files go through the pipeline again, history kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daemon.config import config_from_mapping
from daemon.demo import make_photo
from daemon.journal import Journal, JobState
from daemon.service import journal_path

from .conftest import config_mapping, visible_files, wait_for, write_config


def retry(config_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "retry", "--config", str(config_path), *args],
                          capture_output=True, text=True, timeout=60)


def setup(tmp_path, folders, emulator):
    mapping = config_mapping(folders, emulator)
    return write_config(tmp_path / "config.yaml", mapping), config_from_mapping(mapping, tmp_path)


def history(config, rel_path: str) -> list[str]:
    journal = Journal(journal_path(config), read_only=True)
    try:
        [job] = [j for j in journal.jobs_in(*JobState) if j.rel_path == rel_path]
        return [e["to_state"] for e in journal.history(job.id)]
    finally:
        journal.close()


def test_retry_brings_a_failed_file_back_to_a_restored_output_while_the_daemon_runs(
        tmp_path, folders, emulator, run_daemon):
    config_path, config = setup(tmp_path, folders, emulator)
    emulator.model_disabled = True
    run_daemon(config)
    make_photo(folders["inbox"] / "album" / "scan.jpg", 200, 160, seed=1, format="JPEG")
    wait_for(lambda: (folders["failed"] / "album" / "scan.jpg.error.json").exists(), 20, what="the failure")

    emulator.model_disabled = False  # the cause is gone
    done = retry(config_path, str(folders["failed"] / "album" / "scan.jpg"))
    assert done.returncode == 0, done.stderr
    assert "back in the inbox as album/scan.jpg" in done.stdout
    wait_for(lambda: (folders["outbox"] / "album" / "scan.png").exists(), 20, what="the restored output")
    wait_for(lambda: history(config, "album/scan.jpg")[-1] == "done", 10, what="the job done")
    assert (folders["archive"] / "album" / "scan.jpg").exists()
    assert not visible_files(folders["failed"]), "the file and its old error record left failed/"
    assert emulator.stats()["submits_received"] == 2 and emulator.stats()["submits_accepted"] == 1
    steps = history(config, "album/scan.jpg")
    assert steps[:4] == ["pending", "publishing", "submitting", "failing"] and "failed" in steps
    assert steps[-1] == "done" and steps.count("pending") == 2, "one job, its whole story kept"


def test_retry_while_the_daemon_is_stopped_waits_in_the_inbox_for_the_next_run(
        tmp_path, folders, emulator, run_daemon):
    config_path, config = setup(tmp_path, folders, emulator)
    emulator.inject("outcome_failed", 2)
    daemon = run_daemon(config)
    make_photo(folders["inbox"] / "a.jpg", 200, 160, seed=1, format="JPEG")
    make_photo(folders["inbox"] / "b.jpg", 200, 160, seed=2, format="JPEG")
    wait_for(lambda: len(list(folders["failed"].glob("*.error.json"))) == 2, 20, what="two failures")
    daemon.stop()

    (folders["inbox"] / "a.jpg").write_bytes(b"a new scan that took the old name")
    done = retry(config_path, "--all")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in folders["inbox"].iterdir()) == ["a-1.jpg", "a.jpg", "b.jpg"]
    assert "back in the inbox as a-1.jpg" in done.stdout
    assert not visible_files(folders["failed"])

    run_daemon(config)
    wait_for(lambda: {p.name for p in visible_files(folders["outbox"])} == {"a-1.png", "b.png"}, 20,
             what="both restored after the restart")
    wait_for(lambda: (folders["failed"] / "a.jpg.error.json").exists(), 10, what="the new scan, not an image")
    assert "not an image" in json.loads((folders["failed"] / "a.jpg.error.json").read_text())["reason"]


def test_retry_refuses_what_it_does_not_know_and_moves_nothing(tmp_path, folders, emulator, run_daemon):
    config_path, config = setup(tmp_path, folders, emulator)
    emulator.model_disabled = True
    daemon = run_daemon(config)
    make_photo(folders["inbox"] / "scan.jpg", 200, 160, seed=1, format="JPEG")
    wait_for(lambda: (folders["failed"] / "scan.jpg.error.json").exists(), 20, what="the failure")
    daemon.stop()

    refused = retry(config_path, str(folders["failed"] / "scan.jpg"), "no-such-scan.jpg")
    assert refused.returncode == 1 and "no-such-scan.jpg" in refused.stderr and "scan.jpg," not in refused.stderr
    assert (folders["failed"] / "scan.jpg").exists() and not visible_files(folders["inbox"])

    both = retry(config_path, "scan.jpg", "--all")
    assert both.returncode == 2 and "not both" in both.stderr
    neither = retry(config_path)
    assert neither.returncode == 2

    by_record = retry(config_path, "scan.jpg.error.json")  # the name inside failed/, or its record, will do
    assert by_record.returncode == 0, by_record.stderr
    assert (folders["inbox"] / "scan.jpg").exists()
    again = retry(config_path, "scan.jpg")
    assert again.returncode == 1 and "not a failed file" in again.stderr


def test_retry_all_leaves_out_what_may_already_have_been_paid_for(tmp_path, folders, emulator, run_daemon):
    config_path, config = setup(tmp_path, folders, emulator)
    config = config_from_mapping(config_mapping(folders, emulator, api={"read_timeout": 0.5}), tmp_path)
    emulator.hang_seconds = 2.0
    emulator.inject("submit_timeout")
    daemon = run_daemon(config)
    make_photo(folders["inbox"] / "lost.jpg", 200, 160, seed=1, format="JPEG")
    wait_for(lambda: (folders["failed"] / "lost.jpg.error.json").exists(), 20, what="the ambiguous failure")
    emulator.model_disabled = True
    make_photo(folders["inbox"] / "bad.jpg", 200, 160, seed=2, format="JPEG")
    wait_for(lambda: (folders["failed"] / "bad.jpg.error.json").exists(), 20, what="the rejected one")
    daemon.stop()

    done = retry(config_path, "--all")
    assert done.returncode == 0, done.stderr
    assert "lost.jpg -> left out: it may already have been paid for (submit_ambiguous)" in done.stdout
    assert (folders["failed"] / "lost.jpg").exists() and (folders["inbox"] / "bad.jpg").exists()
    named = retry(config_path, "lost.jpg")  # named, it goes: the person has checked
    assert named.returncode == 0 and (folders["inbox"] / "lost.jpg").exists()
