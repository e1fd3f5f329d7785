"""Prometheus metrics from the real daemon against the emulator: the exposition parses, shows no
`_created` series, its journal figures are `status --json`'s, and its counters are what the emulator saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from daemon import logging as daemon_logging
from daemon.control import PAUSED_BY_PERSON, pause_submits
from daemon.demo import make_photo
from daemon.journal import IN_FLIGHT_STATES, Journal, JobState
from daemon.metrics import Metrics, label_word, provider_time
from daemon.pacing import NO_BALANCE
from daemon.reports import status_report

from .conftest import API_KEY, ManualClock, config_mapping, wait_for, write_config

NAMES = ("Grandma Ruth 1957.jpg", "wedding-Alvarez.jpg", "Onkel Fritz am See.jpg")
LATE = "harbour_Kowalczyk.jpg"


def drop(folder: Path, *names: str, first_seed: int = 1) -> None:
    for seed, name in enumerate(names, first_seed):
        make_photo(folder / name, 200, 160, seed=seed, format="JPEG")


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of one /metrics answer, parsed as Prometheus would: (name, labels) -> value."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode("utf-8")) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _labels), v in samples.items() if n == name)


def status_json(config_path: Path) -> dict:
    """What `codeformer-daemon status --json` prints, run as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--config", str(config_path), "--json"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CODEFORMER_API_KEY": "unused"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def disagreements(status: dict, samples: dict) -> list[str]:
    """Where /metrics and `status --json` tell a different figure (empty: they agree)."""
    expected = {("codeformer_jobs", frozenset({("state", s.value)})): status["counts"][s.value] for s in JobState}
    expected[("codeformer_jobs_in_flight", frozenset())] = sum(status["counts"][s.value] for s in IN_FLIGHT_STATES)
    expected[("codeformer_submissions_spent_total", frozenset())] = status["submissions_spent"]
    expected[("codeformer_duplicates_skipped_total", frozenset())] = status["duplicates_skipped"]
    expected[("codeformer_unchanged_deliveries_total", frozenset())] = status["unchanged_delivered"]
    expected[("codeformer_ambiguous_submits_at_restart_total", frozenset())] = status["ambiguous_at_restart"]
    expected[("codeformer_inbox_available", frozenset())] = 0 if status["inbox_unavailable"] else 1
    expected[("codeformer_submits_paused", frozenset({("reason", status["paused"] or "")}))] = (
        1 if status["paused"] else 0)
    oldest = status["oldest_pending"]
    if oldest is not None:
        expected[("codeformer_oldest_pending_job_timestamp_seconds", frozenset())] = oldest["since"]
    problems = [f"{name}{dict(labels)}: metrics {samples.get((name, labels))}, status {want}"
                for (name, labels), want in expected.items() if samples.get((name, labels)) != want]
    if oldest is None and value(samples, "codeformer_oldest_pending_job_timestamp_seconds") is not None:
        problems.append("an oldest pending timestamp while status shows nothing waiting")
    return problems


def settled(read, timeout: float = 30.0):
    """Read until the answer is empty (or falsy), or the time is up; the last answer either way.

    Metrics and `status` are two readings of a running daemon: a probe submit may move a job between them.
    """
    deadline = time.monotonic() + timeout
    while True:
        answer = read()
        if not answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def test_metrics_match_status_json_and_the_emulator(tmp_path, folders, emulator, make_config, run_daemon):
    emulator.balance = 3  # three submits paid for, then an empty wallet
    emulator.latency = 4.0  # long enough to look at the three while the provider holds them, even on a loaded machine
    emulator.inject("outcome_failed")  # one of the three fails at the provider
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    daemon = run_daemon(make_config())
    metrics, journal = daemon.service.metrics, daemon.service.journal
    drop(folders["inbox"], *NAMES)
    wait_for(lambda: journal.count_in(JobState.SUBMITTED) == 3, 20, what="three at the provider")
    samples = scrape(metrics)
    assert value(samples, "codeformer_jobs_in_flight") == value(samples, "codeformer_jobs", state="submitted") == 3
    assert disagreements(status_report(journal, time.time()), samples) == []
    wait_for(lambda: (c := journal.counts_by_state()).get("done") == 2 and c.get("failed") == 1, 30,
             what="two restored, one failed at the provider")
    drop(folders["inbox"], LATE, first_seed=4)
    wait_for(lambda: journal.get_meta("paused") == NO_BALANCE and journal.count_in(JobState.PENDING) == 1, 30,
             what="the fourth file refused for the empty wallet, submits paused")

    body = metrics.render()[0].decode("utf-8")
    assert "_created" not in body
    samples = scrape(metrics)
    assert value(samples, "codeformer_submits_paused", reason=NO_BALANCE) == 1
    assert value(samples, "codeformer_jobs", state="pending") == 1
    assert all(value(samples, "codeformer_jobs", state=s.value) is not None for s in JobState), "every state, 0 too"
    [waiting] = journal.jobs_in(JobState.PENDING)
    assert value(samples, "codeformer_oldest_pending_job_timestamp_seconds") == waiting.created_at
    assert settled(lambda: disagreements(status_json(config_path), scrape(metrics))) == []

    # The process counters, against what the emulator counted on its side of the wire.
    stats = emulator.stats()
    completed = [j for j in stats["jobs"] if j["status"] == "COMPLETED"]
    late_size = (folders["inbox"] / LATE).stat().st_size

    def counters_disagree() -> list[str]:
        stats = emulator.stats()
        samples = scrape(metrics)
        refused = stats["rejected"].get("402", 0)
        expected = {
            "codeformer_files_detected_total": 4,
            "codeformer_submits_total{outcome=accepted}": stats["submits_accepted"],
            "codeformer_submits_total{outcome=no_balance}": refused,
            "codeformer_polls_total": stats["polls"],
            "codeformer_downloads_total": stats["media_downloads"],
            "codeformer_jobs_done_total": 2,
            "codeformer_jobs_failed_total{stage=provider_failed}": 1,
            # each accepted copy fetched once by the provider; each refused probe published the late scan once
            "codeformer_uploaded_bytes_total": sum(j["fetched_size"] for j in stats["jobs"]) + refused * late_size,
        }
        seen = {
            "codeformer_files_detected_total": value(samples, "codeformer_files_detected_total"),
            "codeformer_submits_total{outcome=accepted}": value(samples, "codeformer_submits_total",
                                                                outcome="accepted"),
            "codeformer_submits_total{outcome=no_balance}": value(samples, "codeformer_submits_total",
                                                                  outcome="no_balance"),
            "codeformer_polls_total": total(samples, "codeformer_polls_total"),
            "codeformer_downloads_total": value(samples, "codeformer_downloads_total"),
            "codeformer_jobs_done_total": value(samples, "codeformer_jobs_done_total"),
            "codeformer_jobs_failed_total{stage=provider_failed}": value(samples, "codeformer_jobs_failed_total",
                                                                         stage="provider_failed"),
            "codeformer_uploaded_bytes_total": value(samples, "codeformer_uploaded_bytes_total"),
        }
        return [f"{k}: metrics {seen[k]}, expected {v}" for k, v in expected.items() if seen[k] != v]

    assert settled(counters_disagree) == []
    assert stats["submits_accepted"] == 3 and stats["media_downloads"] == 2 and stats["rejected"].get("402", 0) >= 1

    samples = scrape(metrics)
    done_jobs = journal.jobs_in(JobState.DONE)
    results = sum(len(requests.get(j.media_url, timeout=10).content) for j in done_jobs)
    assert value(samples, "codeformer_downloaded_bytes_total") == results
    # The provider's own figure (its completed_at - created_at, in milliseconds), not the daemon's wait.
    assert value(samples, "codeformer_provider_processing_seconds_count") == 2
    assert value(samples, "codeformer_provider_processing_seconds_sum") == pytest.approx(
        sum(j["finished_at"] - j["submitted_at"] for j in completed), abs=0.0025)
    assert value(samples, "codeformer_detection_to_done_seconds_count") == 2
    assert value(samples, "codeformer_detection_to_done_seconds_sum") == pytest.approx(
        sum(j.finished_at - j.created_at for j in done_jobs), abs=1e-6)
    assert value(samples, "codeformer_detection_to_done_seconds_bucket", le="+Inf") == 2
    assert value(samples, "codeformer_in_flight_limit") == 4


def test_journal_figures_survive_a_restart_and_process_counters_start_again(folders, emulator, make_config,
                                                                              run_daemon):
    config = make_config()
    first = run_daemon(config)
    drop(folders["inbox"], *NAMES[:2])
    wait_for(lambda: first.service.journal.count_in(JobState.DONE) == 2, 30, what="two restored")
    first.stop()

    second = run_daemon(config)
    samples = scrape(second.service.metrics)
    assert value(samples, "codeformer_jobs", state="done") == 2
    assert value(samples, "codeformer_submissions_spent_total") == 2
    assert value(samples, "codeformer_submits_total", outcome="accepted") == 0
    assert value(samples, "codeformer_jobs_done_total") == 0
    assert value(samples, "codeformer_oldest_pending_job_timestamp_seconds") is None, "nothing waits: no sample"

    pause_submits(second.service.journal)  # a person's pause is status's figure too, read the same way
    assert status_report(second.service.journal, time.time())["paused"] == PAUSED_BY_PERSON
    assert disagreements(status_report(second.service.journal, time.time()), scrape(second.service.metrics)) == []
    assert value(scrape(second.service.metrics), "codeformer_submits_paused", reason=PAUSED_BY_PERSON) == 1


def test_the_in_flight_limit_follows_the_scheduler_after_429s(folders, emulator, make_config, run_daemon):
    emulator.rate_limit = 0.2  # one accept every five seconds: the rest of a burst gets 429
    daemon = run_daemon(make_config())
    metrics, gate = daemon.service.metrics, daemon.service.scheduler.gate
    assert value(scrape(metrics), "codeformer_in_flight_limit") == 4
    drop(folders["inbox"], "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    # Halved once per burst of 429s (twice if a submit leaves after the first halving): whatever it is
    # now, /metrics shows the scheduler's own figure.
    wait_for(lambda: gate.limit == value(scrape(metrics), "codeformer_in_flight_limit") < 4, 10,
             what="the limit lowered by the 429s, on /metrics")
    assert value(scrape(metrics), "codeformer_submits_total", outcome="retry") >= 1


def test_in_flight_is_every_job_holding_a_slot_and_the_oldest_pending_is_the_first_detected(tmp_path):
    clock = ManualClock()
    journal = Journal(tmp_path / "journal.sqlite3", clock=clock)
    jobs = []
    for i in range(6):  # one detected every ten seconds
        clock.now = 1_700_000_000.0 + 10 * i
        jobs += journal.add_jobs([(f"scan{i}.jpg", 1, 1)], {"upscale": 2})
    walk = [JobState.PUBLISHING, JobState.SUBMITTING, JobState.SUBMITTED, JobState.DOWNLOADING]
    for job, steps in zip(jobs, (walk[:1], walk[:2], walk[:3], walk[:4])):  # the last two stay pending
        for state in steps:
            job = journal.transition(job, state)
    samples = scrape(Metrics(journal))
    assert value(samples, "codeformer_jobs_in_flight") == 3  # publishing, submitting, submitted
    assert value(samples, "codeformer_oldest_pending_job_timestamp_seconds") == jobs[4].created_at
    assert disagreements(status_report(journal, time.time()), samples) == []
    journal.close()


def test_no_label_carries_a_file_name_or_a_secret(tmp_path):
    daemon_logging.register_secret(API_KEY)
    journal = Journal(tmp_path / "journal.sqlite3")
    names = ["Grandma Ruth 1957.jpg", "../../etc/passwd", f"key {API_KEY}.jpg", 'quote" } evil{x="1.jpg']
    journal.add_jobs([(name, 1, 1) for name in names], {"upscale": 2})
    journal.set_meta("paused", f"key rejected ({API_KEY})")  # a reason that, somehow, holds the key
    metrics = Metrics(journal)
    for name in names:  # an error kind is a fixed word; were a name or a text ever passed, it must not show
        metrics.job_failed(name)
    metrics.job_failed("provider_failed")
    body = metrics.render()[0].decode("utf-8")
    labels = {v for (_name, pairs) in scrape(metrics) for _k, v in pairs}
    for secret_or_name in [API_KEY, "Grandma", "passwd", "evil"]:
        assert secret_or_name not in body
    assert labels >= {"provider_failed", "other"}
    assert all("/" not in v and ".jpg" not in v for v in labels)
    journal.close()


@pytest.mark.parametrize(("text", "label"), [
    ("provider_failed", "provider_failed"), ("download_failed", "download_failed"), ("timeout", "timeout"),
    ("scan 1.jpg", "other"), ("a/b", "other"), ("", "other"), (None, "other"), ("x" * 41, "other"),
    ("Rejected", "other"),
])
def test_label_words_are_a_fixed_vocabulary(text, label):
    assert label_word(text) == label


@pytest.mark.parametrize(("provider_seconds", "submitted_at", "now", "seconds"), [
    (12.5, 100.0, 200.0, 12.5),  # the provider's own figure wins
    (None, 100.0, 130.0, 30.0),  # else submit to completion
    (None, None, 130.0, None),  # nothing known: nothing observed
    (None, 140.0, 130.0, None),  # a clock gone backwards: no negative duration
    (-1.0, 100.0, 130.0, 30.0),  # a nonsense figure from the provider is not taken
])
def test_provider_time(provider_seconds, submitted_at, now, seconds):
    assert provider_time(provider_seconds, submitted_at, now) == seconds
