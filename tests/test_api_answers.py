"""Every answer the provider can give, injected in the emulator, against the real daemon.

Each test checks where the file ends up, how many submits the emulator counted (money), and what
`status` says.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from daemon import reports
from daemon.cli import render_status
from daemon.demo import make_photo
from daemon.journal import IN_FLIGHT_STATES, Journal, JobState
from daemon.service import journal_path

from .conftest import API_KEY, config_mapping, free_port, visible_files, wait_for, write_config


def drop(folder: Path, *names: str, size=(200, 160)) -> None:
    for seed, name in enumerate(names, 1):
        make_photo(folder / name, *size, seed=seed, format="JPEG")


def status_text(config) -> str:
    """What `codeformer-daemon status` prints for this state_dir."""
    journal = Journal(journal_path(config), read_only=True)
    try:
        return render_status(reports.journal_summary(journal, time.time()))
    finally:
        journal.close()


def error_record(folders, name: str) -> dict:
    return json.loads((folders["failed"] / f"{name}.error.json").read_text(encoding="utf-8"))


def failure_record(folders, name: str, timeout: float = 20) -> dict:
    """Wait until `name` is explained in failed/, and return its .error.json."""
    wait_for(lambda: (folders["failed"] / f"{name}.error.json").exists(), timeout, what=f"{name} in failed/")
    return error_record(folders, name)


def wait_for_status(config, text: str) -> None:
    """`status` says `text` (jobs reach their final state just after their files move)."""
    wait_for(lambda: text in status_text(config), 5, what=f"status: {text}")


def submitted_at(config) -> float:
    """When the daemon recorded its only job as accepted by the provider (its own wall clock)."""
    journal = Journal(journal_path(config), read_only=True)
    try:
        [job] = journal.jobs_in(*JobState)
        return job.submitted_at
    finally:
        journal.close()


def wait_until_requeued(daemon, waiting: int) -> None:
    """The refused submits are answered: nothing in flight, `waiting` jobs pending (or, wrongly, failed:
    the caller's assertions then say so)."""
    journal = daemon.service.journal
    wait_for(lambda: journal.count_in(*IN_FLIGHT_STATES, JobState.FAILING) == 0
             and journal.count_in(JobState.PENDING, JobState.FAILED) == waiting,
             10, what=f"{waiting} jobs waiting, none in flight")


def events(logs, name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def outputs(folders) -> list[str]:
    return [p.name for p in visible_files(folders["outbox"])]


# --------------------------------------------------------------------------- 402, 401/403


def test_an_empty_wallet_pauses_submits_and_they_resume_when_topped_up(
        folders, emulator, make_config, run_daemon, captured_logs):
    emulator.balance = 2
    config = make_config()
    daemon = run_daemon(config)
    names = [f"scan{i}.jpg" for i in range(5)]
    drop(folders["inbox"], *names)
    wait_for(lambda: len(outputs(folders)) == 2 and "paused: insufficient balance" in status_text(config), 20,
             what="two restored, then a pause")
    wait_until_requeued(daemon, 3)
    daemon.wait_for_passes(1.0)  # the loop goes on passing while paused: still nothing more may happen
    assert len(outputs(folders)) == 2
    assert len(visible_files(folders["inbox"])) == 3, "the other three wait in the inbox"
    assert not visible_files(folders["failed"])
    assert emulator.stats()["submits_accepted"] == 2
    paused = events(captured_logs, "submits.paused")
    assert len(paused) == 1 and paused[0]["level"] == "error"
    assert paused[0]["reason"] == "insufficient balance" and "top up" in paused[0]["fix"]
    assert not events(captured_logs, "job.failed")

    emulator.balance = 10
    wait_for(lambda: len(outputs(folders)) == 5 and not visible_files(folders["inbox"]), 30,
             what="the other three restored and archived after the top-up")
    assert emulator.stats()["submits_accepted"] == 5
    assert not visible_files(folders["failed"])
    assert "paused" not in status_text(config)
    assert events(captured_logs, "submits.resumed")


def test_a_revoked_key_stops_submits_keeps_every_file_and_resumes_when_the_key_works_again(
        folders, emulator, make_config, run_daemon, captured_logs):
    emulator.revoked_keys = {API_KEY}
    config = make_config()
    daemon = run_daemon(config)
    drop(folders["inbox"], "a.jpg", "b.jpg", "c.jpg")
    wait_for(lambda: "paused: key rejected" in status_text(config), 15, what="a pause for the key")
    wait_until_requeued(daemon, 3)
    daemon.wait_for_passes(1.0)  # the loop goes on passing while paused: still nothing more may happen
    assert len(visible_files(folders["inbox"])) == 3 and not visible_files(folders["failed"])
    assert emulator.stats()["submits_accepted"] == 0
    [paused] = events(captured_logs, "submits.paused")
    assert paused["level"] == "error" and "key" in paused["fix"] and API_KEY not in json.dumps(paused)

    emulator.revoked_keys = set()  # the periodic re-check notices without any reload
    wait_for(lambda: len(outputs(folders)) == 3, 30, what="all three once the key works")
    assert emulator.stats()["submits_accepted"] == 3 and not visible_files(folders["failed"])


def test_a_key_revoked_while_jobs_are_at_the_provider_does_not_time_them_out(
        folders, emulator, make_config, run_daemon):
    emulator.latency = 1.0
    config = make_config(api={"job_timeout": 2, "poll_interval": 0.2})
    run_daemon(config)
    drop(folders["inbox"], "scan.jpg")
    wait_for(lambda: emulator.stats()["submits_accepted"] == 1, 10, what="the submit")
    emulator.revoked_keys = {API_KEY}
    wait_for(lambda: "paused: key rejected" in status_text(config), 10, what="a pause from the polls")
    # Past api.job_timeout the daemon could not ask, so it must not give up: let it poll (refused) a few
    # times after the deadline; each of those passes looked for overdue jobs just before polling.
    deadline = submitted_at(config) + config.api.job_timeout
    wait_for(lambda: time.time() > deadline, 10, what="api.job_timeout to pass")
    polls = emulator.stats()["polls"]
    wait_for(lambda: emulator.stats()["polls"] >= polls + 3 or visible_files(folders["failed"]), 10,
             what="three refused polls after the deadline")
    assert not visible_files(folders["failed"])
    emulator.revoked_keys = set()
    wait_for(lambda: outputs(folders) == ["scan.png"], 20, what="the result once polls work again")
    assert emulator.stats()["submits_accepted"] == 1 and not visible_files(folders["failed"])


def test_a_new_key_is_taken_on_sighup(tmp_path, folders, emulator, daemon_process):
    key_file = tmp_path / "api_key"
    key_file.write_text("an-old-key-0000\n")
    mapping = config_mapping(folders, emulator, api={"api_key_file": str(key_file)})
    proc = daemon_process(write_config(tmp_path / "config.yaml", mapping), env={"CODEFORMER_API_KEY": ""})
    proc.wait_ready()
    drop(folders["inbox"], "scan.jpg")
    wait_for(lambda: any(e.get("event") == "submits.paused" for e in proc.events()), 15, what="the pause")
    [paused] = [e for e in proc.events() if e.get("event") == "submits.paused"]
    assert str(key_file) in paused["fix"] and "SIGHUP" in paused["fix"]
    assert "an-old-key" not in proc.log_path.read_text()

    key_file.write_text(API_KEY + "\n")
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: (folders["outbox"] / "scan.png").exists(), 20, what="the output after the reload")
    [reloaded] = [e for e in proc.events() if e.get("event") == "daemon.reloaded"]
    assert reloaded["key_changed"] is True
    assert proc.proc.poll() is None, "SIGHUP must not stop the daemon"
    assert proc.terminate() == 0
    assert API_KEY not in proc.log_path.read_text()


# --------------------------------------------------------------------------- 429


def test_a_rate_limited_gateway_completes_every_file_without_failures(
        folders, emulator, make_config, run_daemon, captured_logs):
    emulator.rate_limit = 1.0  # one accepted submit per second
    config = make_config()
    run_daemon(config)
    names = [f"scan{i}.jpg" for i in range(6)]
    drop(folders["inbox"], *names)
    wait_for(lambda: len(outputs(folders)) == 6, 40, what="all six")
    stats = emulator.stats()
    assert stats["submits_accepted"] == 6 and stats["rejected"].get("429", 0) > 0
    assert not visible_files(folders["failed"])
    assert events(captured_logs, "submits.rate_limited")
    assert not events(captured_logs, "job.failed")
    wait_for_status(config, "jobs: done 6")


# --------------------------------------------------------------------------- 5xx, connection errors, timeouts


def test_server_errors_are_retried_and_then_explained_with_their_history(
        folders, emulator, make_config, run_daemon):
    config = make_config(api={"max_attempts": 3})
    run_daemon(config)
    emulator.inject("submit_500", 2)
    drop(folders["inbox"], "flaky.jpg")
    wait_for(lambda: outputs(folders) == ["flaky.png"], 20, what="restored after two 500s")
    assert emulator.stats()["submits_received"] == 3 and emulator.stats()["submits_accepted"] == 1
    wait_for_status(config, "jobs: done 1")

    emulator.inject("submit_500", 100)
    drop(folders["inbox"], "down.jpg")
    record = failure_record(folders, "down.jpg", 30)
    assert record["stage"] == "attempts_exhausted" and "HTTP 500" in record["reason"]
    assert record["submit_attempts"] == 3
    assert sum("HTTP 500" in (step["detail"] or "") for step in record["history"]) == 3
    assert emulator.stats()["submits_received"] == 6 and emulator.stats()["submits_accepted"] == 1
    wait_for_status(config, "down.jpg")


def test_an_unreachable_provider_is_retried_and_then_explained(folders, emulator, make_config, run_daemon):
    closed = f"http://127.0.0.1:{free_port()}"
    config = make_config(api={"base_url": closed, "status_url": f"{closed}/v2/requests/status",
                              "max_attempts": 2, "connect_timeout": 0.5})
    run_daemon(config)
    drop(folders["inbox"], "scan.jpg")
    record = failure_record(folders, "scan.jpg", 30)
    assert record["stage"] == "attempts_exhausted" and "not sent" in record["reason"]
    assert (folders["failed"] / "scan.jpg").exists()
    wait_for_status(config, "scan.jpg: gave up after 2 attempts")


def test_a_submit_whose_answer_times_out_is_never_resent(folders, emulator, make_config, run_daemon):
    emulator.hang_seconds = 3.0
    emulator.inject("submit_timeout")
    config = make_config(api={"read_timeout": 0.5})
    daemon = run_daemon(config)
    drop(folders["inbox"], "lost.jpg")
    record = failure_record(folders, "lost.jpg")
    assert record["stage"] == "submit_ambiguous" and "retry" in record["reason"]
    wait_for_status(config, "lost.jpg: the submit may have reached the provider")  # FAILED in the journal
    daemon.wait_for_passes(1.0)  # and the loop ran on for a while after
    assert emulator.stats()["submits_received"] == 1, "never resent: it may have been paid for"


# --------------------------------------------------------------------------- 400


def test_bad_requests_fail_at_once_and_a_run_of_them_points_at_the_configuration(
        folders, emulator, make_config, run_daemon, captured_logs):
    emulator.model_disabled = True
    config = make_config()
    run_daemon(config)
    drop(folders["inbox"], "a.jpg", "b.jpg", "c.jpg")
    wait_for(lambda: len(list(folders["failed"].glob("*.error.json"))) == 3, 20, what="three failures")
    record = error_record(folders, "a.jpg")
    assert record["stage"] == "rejected" and "Model not found" in record["api_error"]
    assert record["submit_attempts"] == 0
    assert emulator.stats()["submits_received"] == 3, "no retries"
    # The third refusal's failure record is written by the stage; the scheduler hears of it just after.
    wait_for(lambda: events(captured_logs, "submits.all_rejected"), 10, what="the configuration hint")
    [hint] = events(captured_logs, "submits.all_rejected")
    assert "configuration" in hint["hint"]
    wait_for_status(config, "Model not found")


# --------------------------------------------------------------------------- the job's outcome


def test_a_failed_job_goes_to_failed_with_the_providers_words(folders, emulator, make_config, run_daemon):
    emulator.inject("outcome_failed")
    config = make_config()
    run_daemon(config)
    drop(folders["inbox"], "face.jpg")
    record = failure_record(folders, "face.jpg")
    assert record["stage"] == "provider_failed"
    assert record["api_error"] == "Injected failure: face restoration failed" and record["request_id"]
    assert emulator.stats()["submits_accepted"] == 1
    wait_for_status(config, "face.jpg")


def test_a_system_error_is_resubmitted_up_to_max_attempts(folders, emulator, make_config, run_daemon):
    config = make_config(api={"max_attempts": 3})
    run_daemon(config)
    emulator.inject("outcome_error")
    drop(folders["inbox"], "once.jpg")
    wait_for(lambda: outputs(folders) == ["once.png"], 20, what="restored on the second submit")
    assert emulator.stats()["submits_accepted"] == 2
    wait_for_status(config, "jobs: done 1")

    emulator.inject("outcome_error", 3)
    drop(folders["inbox"], "always.jpg")
    record = failure_record(folders, "always.jpg", 30)
    assert record["stage"] == "attempts_exhausted" and "system error" in record["reason"]
    assert emulator.stats()["submits_accepted"] == 5
    wait_for_status(config, "always.jpg: gave up after 3 attempts")


def test_a_job_the_provider_holds_too_long_fails_with_that_reason(folders, emulator, make_config, run_daemon):
    emulator.latency = 30
    config = make_config(api={"job_timeout": 1.5, "poll_interval": 0.2})
    run_daemon(config)
    drop(folders["inbox"], "slow.jpg")
    record = failure_record(folders, "slow.jpg")
    assert record["stage"] == "timeout" and "api.job_timeout" in record["reason"]
    assert emulator.stats()["submits_accepted"] == 1
    wait_for_status(config, "slow.jpg: still")


def test_a_malformed_status_answer_is_transient_and_logged_with_an_excerpt(
        folders, emulator, make_config, run_daemon, captured_logs):
    emulator.latency = 0.6
    emulator.inject("poll_garbage", 3)
    config = make_config()
    run_daemon(config)
    drop(folders["inbox"], "scan.jpg")
    wait_for(lambda: outputs(folders) == ["scan.png"], 20, what="restored despite nonsense answers")
    noise = events(captured_logs, "job.poll_error")
    assert len(noise) == 3 and all("<html>" in e["error"] and len(e["error"]) < 300 for e in noise)
    assert emulator.stats()["submits_accepted"] == 1
    wait_for_status(config, "jobs: done 1")


# --------------------------------------------------------------------------- downloading the result


def test_a_failed_download_is_retried(folders, emulator, make_config, run_daemon):
    emulator.inject("media_500", 2)
    config = make_config()
    run_daemon(config)
    drop(folders["inbox"], "scan.jpg")
    wait_for(lambda: outputs(folders) == ["scan.png"], 30, what="restored on the third download")
    assert emulator.stats()["submits_accepted"] == 1
    wait_for_status(config, "jobs: done 1")


def test_a_result_that_is_not_an_image_is_never_delivered(folders, emulator, make_config, run_daemon):
    config = make_config(api={"max_attempts": 2})
    run_daemon(config)
    emulator.inject("media_garbage", 2)
    drop(folders["inbox"], "scan.jpg")
    assert "not a readable image" in failure_record(folders, "scan.jpg", 30)["reason"]
    assert not visible_files(folders["outbox"])
    assert emulator.stats()["submits_accepted"] == 1
    wait_for_status(config, "scan.jpg: could not fetch the result after 2 attempt(s)")


def test_a_result_over_the_size_cap_is_refused_without_retrying(folders, emulator, make_config, run_daemon):
    config = make_config(api={"max_download_mb": 1}, restore={"upscale": 4})
    run_daemon(config)
    drop(folders["inbox"], "big.jpg", size=(640, 480))
    assert "api.max_download_mb" in failure_record(folders, "big.jpg", 30)["reason"]
    assert not visible_files(folders["outbox"])
    assert emulator.stats()["media_downloads"] == 1
    wait_for_status(config, "big.jpg: could not fetch the result after 1 attempt(s)")


def test_a_media_url_that_is_not_http_is_never_followed(folders, emulator, make_config, run_daemon):
    emulator.inject("outcome_bad_media_url")
    config = make_config()
    run_daemon(config)
    drop(folders["inbox"], "scan.jpg")
    record = failure_record(folders, "scan.jpg")
    assert "non-http(s)" in record["reason"] and not visible_files(folders["outbox"])
    assert emulator.stats()["submits_accepted"] == 1
    wait_for_status(config, "scan.jpg: could not fetch the result")


def test_a_job_finished_while_the_daemon_was_down_past_job_timeout_is_delivered_not_timed_out(
        folders, emulator, make_config, run_daemon):
    """Only the provider's own word (a poll after the deadline saying QUEUED/PROCESSING) times a
    job out: after a power cut or an outage the job is polled first, and it may well be done."""
    emulator.latency = 0.5
    config = make_config(api={"job_timeout": 1.5, "poll_interval": 0.2})
    first = run_daemon(config)
    drop(folders["inbox"], "scan.jpg")
    wait_for(lambda: emulator.stats()["submits_accepted"] == 1, 10, what="the submit")
    first.stop()
    # The provider finishes and the deadline passes while nobody is asking.
    deadline = submitted_at(config) + config.api.job_timeout
    wait_for(lambda: [j["status"] for j in emulator.stats()["jobs"]] == ["COMPLETED"], 10,
             what="the provider to finish the job")
    wait_for(lambda: time.time() > deadline, 10, what="api.job_timeout to pass")
    run_daemon(config)
    wait_for(lambda: outputs(folders) == ["scan.png"], 20, what="the result after the restart")
    assert not visible_files(folders["failed"]) and emulator.stats()["submits_accepted"] == 1
