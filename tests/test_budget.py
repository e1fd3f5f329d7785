"""Budgets: the ledger of charges in the journal, limits per day and month checked before each submit,
and what `status`, the dashboard and /metrics show of them.

The daemon runs for real against the emulator; a new day or month comes by replacing the running
daemon's wall clock (never by waiting for midnight). The decisions in daemon.budget are tables.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from types import SimpleNamespace

import pytest
import requests

from daemon import budget, cli
from daemon.budget import Allowance, Periods, Used
from daemon.config import BudgetConfig, config_from_mapping
from daemon.finishing import fail
from daemon.journal import Charge, Journal, JobState
from daemon.service import journal_path

from .conftest import API_KEY, config_mapping, drop_scan, visible_files, wait_for, write_config
from .test_metrics import scrape, value


# --------------------------------------------------------------------------- periods (pure)


@pytest.mark.parametrize("now, zone, day, month", [
    # Spring forward in Berlin: 30 March 2025 has 23 hours (02:00 CET -> 03:00 CEST).
    ("2025-03-30T12:00:00+02:00", "Europe/Berlin",
     ("2025-03-30T00:00:00+01:00", "2025-03-31T00:00:00+02:00"),
     ("2025-03-01T00:00:00+01:00", "2025-04-01T00:00:00+02:00")),
    # Fall back: 26 October 2025 has 25 hours; 02:30 happens twice and both belong to that day.
    ("2025-10-26T02:30:00+02:00", "Europe/Berlin",
     ("2025-10-26T00:00:00+02:00", "2025-10-27T00:00:00+01:00"),
     ("2025-10-01T00:00:00+02:00", "2025-11-01T00:00:00+01:00")),
    ("2025-10-26T02:30:00+01:00", "Europe/Berlin",
     ("2025-10-26T00:00:00+02:00", "2025-10-27T00:00:00+01:00"),
     ("2025-10-01T00:00:00+02:00", "2025-11-01T00:00:00+01:00")),
    # The last moments of a year: tomorrow and next month are both 1 January.
    ("2024-12-31T23:30:00+01:00", "Europe/Berlin",
     ("2024-12-31T00:00:00+01:00", "2025-01-01T00:00:00+01:00"),
     ("2024-12-01T00:00:00+01:00", "2025-01-01T00:00:00+01:00")),
    # The same moment in UTC: 22:30 on 31 December.
    ("2024-12-31T23:30:00+01:00", "UTC",
     ("2024-12-31T00:00:00+00:00", "2025-01-01T00:00:00+00:00"),
     ("2024-12-01T00:00:00+00:00", "2025-01-01T00:00:00+00:00")),
    # A leap day, and a month ending on the 31st.
    ("2024-02-29T12:00:00+00:00", "UTC",
     ("2024-02-29T00:00:00+00:00", "2024-03-01T00:00:00+00:00"),
     ("2024-02-01T00:00:00+00:00", "2024-03-01T00:00:00+00:00")),
    ("2025-01-31T23:59:59+00:00", "UTC",
     ("2025-01-31T00:00:00+00:00", "2025-02-01T00:00:00+00:00"),
     ("2025-01-01T00:00:00+00:00", "2025-02-01T00:00:00+00:00")),
    # Midnight itself belongs to the day it starts.
    ("2025-06-01T00:00:00+02:00", "Europe/Berlin",
     ("2025-06-01T00:00:00+02:00", "2025-06-02T00:00:00+02:00"),
     ("2025-06-01T00:00:00+02:00", "2025-07-01T00:00:00+02:00")),
])
def test_days_and_months_begin_at_midnight_in_the_budgets_zone(now, zone, day, month):
    at = datetime.fromisoformat
    expected = Periods(at(day[0]).timestamp(), at(day[1]).timestamp(), at(month[0]).timestamp(),
                       at(month[1]).timestamp())
    assert budget.periods(at(now).timestamp(), zone) == expected


def test_without_a_zone_days_are_the_systems_local_ones(monkeypatch):
    moment = datetime.fromisoformat("2025-03-09T12:00:00-04:00").timestamp()  # New York's spring forward day
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        local = budget.periods(moment, None)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert local == budget.periods(moment, "America/New_York")
    assert local.day_end - local.day_start == 23 * 3600


# --------------------------------------------------------------------------- the allowance (pure)


WHEN = Periods(day_start=1000.0, day_end=2000.0, month_start=0.0, month_end=9000.0)


@pytest.mark.parametrize("daily, monthly, used, launching, expected", [
    (None, None, Used(500, 5000), 3, Allowance(None)),
    (3, None, Used(0, 0), 0, Allowance(3)),
    (3, None, Used(1, 1), 1, Allowance(1)),
    # Filled by launches alone: none may start, but no limit is announced (a launch may come back unpaid).
    (3, None, Used(2, 2), 1, Allowance(0)),
    (3, None, Used(3, 3), 0, Allowance(0, "daily limit of 3 images reached", 2000.0)),
    (3, None, Used(4, 4), 0, Allowance(0, "daily limit of 3 images reached", 2000.0)),
    (1, None, Used(1, 1), 0, Allowance(0, "daily limit of 1 image reached", 2000.0)),
    (200, 3000, Used(10, 2998), 0, Allowance(2)),
    (200, 3000, Used(10, 2998), 5, Allowance(0)),
    (None, 3000, Used(10, 3000), 0, Allowance(0, "monthly limit of 3000 images reached", 9000.0)),
    # Both reached: the month's limit lifts later, so it is the reason and the wake-up time.
    (200, 3000, Used(200, 3000), 0, Allowance(0, "monthly limit of 3000 images reached", 9000.0)),
    (200, 3000, Used(200, 2000), 0, Allowance(0, "daily limit of 200 images reached", 2000.0)),
])
def test_the_allowance_counts_the_ledger_and_the_launches(daily, monthly, used, launching, expected):
    config = BudgetConfig(daily_limit=daily, monthly_limit=monthly)
    assert budget.allowance(config, used, launching, WHEN) == expected


@pytest.mark.parametrize("images, price, currency, expected, text", [
    (3, 0.02, "USD", 0.06, "0.06 USD"),
    (7, 0.1, "eur", 0.7, "0.70 EUR"),
    (1, 0.005, "USD", 0.01, "0.01 USD"),  # half a cent rounds up, as an invoice does
    (3, 2.5, "JPY", 8.0, "8 JPY"),  # no minor unit
    (3, 0.0125, "KWD", 0.038, "0.038 KWD"),  # three
    (0, 0.02, "USD", 0.0, "0.00 USD"),
    (3, None, "USD", None, None),
])
def test_money_is_rounded_to_the_currencys_smallest_unit(images, price, currency, expected, text):
    amount = budget.money(images, price, currency)
    assert amount == expected
    if text is not None:
        assert budget.money_text(amount, currency) == text


def test_the_summary_shows_used_limit_remaining_money_and_the_queue():
    config = BudgetConfig(price_per_image=0.02, currency="USD", daily_limit=3, timezone="UTC")
    shown = budget.summary(config, Used(3, 40), queued=2, when=WHEN, now=1500.0)
    assert shown["day"] == {"used": 3, "limit": 3, "remaining": 0, "spent": 0.06, "resets_at": 2000.0}
    assert shown["month"] == {"used": 40, "limit": None, "remaining": None, "spent": 0.8, "resets_at": 9000.0}
    assert (shown["queued"], shown["queued_cost"], shown["currency"], shown["timezone"]) == (2, 0.04, "USD", "UTC")
    counts_only = budget.summary(BudgetConfig(), Used(1, 1), queued=5, when=WHEN, now=1500.0)
    assert counts_only["day"]["spent"] is None and counts_only["queued_cost"] is None
    assert counts_only["timezone"].startswith("local time, ")


# --------------------------------------------------------------------------- the ledger (real SQLite)


def test_the_ledger_sums_a_period_and_a_refund_cancels_its_charge(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite3")
    with journal.transaction():
        journal.record_charge(1, "r-1", 100.0, Charge.CHARGED)
        journal.record_charge(2, "r-2", 150.0, Charge.CHARGED)
        journal.record_charge(3, None, 160.0, Charge.POSSIBLY_CHARGED)
        journal.record_charge(2, "r-2", 150.0, Charge.REFUNDED)  # dated with the charge it cancels
        journal.record_charge(4, "r-4", 200.0, Charge.CHARGED)  # the next period: [200, ...)
    assert journal.charged_between(100.0, 200.0) == 2
    assert journal.charged_between(200.0, 300.0) == 1
    assert journal.charged_between(0.0, 100.0) == 0
    journal.record_charge(9, "r-0", 250.0, Charge.REFUNDED)  # a refund without its charge counts nothing
    assert journal.charged_between(250.0, 300.0) == 0
    assert journal.last_charge_id() == 6
    journal.close()


def test_a_charge_commits_with_its_transition_or_not_at_all(tmp_path):
    """Two paths failing one job as ambiguous (the loop and a stage error): one line in the ledger."""
    journal = Journal(tmp_path / "journal.sqlite3")
    job = journal.add_job("a.jpg", 1, 1, {"upscale": 2})
    job = journal.transition(journal.transition(job, JobState.PUBLISHING), JobState.SUBMITTING)
    journal.transition(job, JobState.FAILING, "the other path won")
    ctx = SimpleNamespace(journal=journal, wall=lambda: 500.0)
    fail(ctx, job, "submit_ambiguous", "lost answer", charge=Charge.POSSIBLY_CHARGED)  # stale: nothing happens
    assert journal.read("SELECT count(*) FROM charges")[0][0] == 0
    journal.close()


# --------------------------------------------------------------------------- the daemon


def budget_config(tmp_path, folders, emulator, budget_section: dict, **sections):
    """The configuration file and its Config, so that `status` and a reload read what the daemon runs with."""
    mapping = config_mapping(folders, emulator, budget=budget_section, **sections)
    path = write_config(tmp_path / "config.yaml", mapping)
    return path, config_from_mapping(mapping, folders["inbox"].parent)


def status_json(config_path, capsys) -> dict:
    """What `codeformer-daemon status --json` prints."""
    capsys.readouterr()
    assert cli.main(["status", "--config", str(config_path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def status_text(config_path, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["status", "--config", str(config_path)]) == 0
    return capsys.readouterr().out


def drop(folders, *names: str, first_seed: int = 1) -> None:
    for seed, name in enumerate(names, first_seed):  # distinct content: no file reuses another's result
        drop_scan(folders, name, seed=seed)


def paused_events(logs, reason: str) -> list[dict]:
    return [e for e in logs if e["event"] == "submits.paused" and e.get("reason") == reason]


def next_utc_midnight_in(seconds_after: float = 60.0) -> float:
    """How far the clock must move for a new day in UTC to have begun `seconds_after` ago."""
    now = time.time()
    return budget.periods(now, "UTC").day_end - now + seconds_after


def test_a_daily_limit_holds_files_in_the_inbox_across_a_restart_until_the_next_day(
        tmp_path, folders, emulator, run_daemon, captured_logs, capsys):
    reason = "daily limit of 3 images reached"
    config_path, config = budget_config(tmp_path, folders, emulator, {"daily_limit": 3, "timezone": "UTC"})
    daemon = run_daemon(config)
    journal = daemon.service.journal
    drop(folders, *(f"scan{i}.jpg" for i in range(5)))

    # Three go through the whole way (jobs at the provider finish); two wait, unfailed, in the inbox.
    wait_for(lambda: journal.count_in(JobState.DONE) == 3 and journal.count_in(JobState.PENDING) == 2, 30,
             what="three restored, two waiting")
    wait_for(lambda: journal.get_meta("paused") == reason, 10, what="the limit recorded for status")
    daemon.wait_for_passes(1.0)
    assert emulator.stats()["submits_accepted"] == 3
    assert len(visible_files(folders["inbox"])) == 2 and not visible_files(folders["failed"])
    status = status_json(config_path, capsys)
    assert status["paused"] == reason and status["counts"]["pending"] == 2
    assert status["budget"]["day"] == {"used": 3, "limit": 3, "remaining": 0, "spent": None,
                                       "resets_at": budget.periods(time.time(), "UTC").day_end}
    assert len(paused_events(captured_logs, reason)) == 1, "said once"

    # A restart changes nothing: the count is the ledger's, in the journal.
    daemon.stop()
    again = run_daemon(config)
    wait_for(lambda: len(paused_events(captured_logs, reason)) == 2, 10, what="the restarted daemon's pause")
    again.wait_for_passes(1.0)
    assert emulator.stats()["submits_accepted"] == 3
    assert status_json(config_path, capsys)["paused"] == reason

    # The next day in UTC: the two go on by themselves.
    scheduler = again.service.scheduler
    offset = next_utc_midnight_in()
    scheduler.ctx.wall = lambda: time.time() + offset
    scheduler.wake.set()
    wait_for(lambda: again.service.journal.count_in(JobState.DONE) == 5, 30, what="the two restored the next day")
    assert emulator.stats()["submits_accepted"] == 5
    assert any(e["event"] == "submits.resumed" and e.get("lifted") == reason for e in captured_logs)
    assert again.service.journal.get_meta("paused") is None


def test_status_the_dashboard_and_metrics_show_the_budget(tmp_path, folders, emulator, run_daemon, capsys):
    reason = "daily limit of 2 images reached"
    config_path, config = budget_config(tmp_path, folders, emulator, {
        "daily_limit": 2, "price_per_image": 0.02, "currency": "EUR", "timezone": "Europe/Berlin"},
        dashboard={"listen": "127.0.0.1:0"})
    daemon = run_daemon(config)
    journal = daemon.service.journal
    drop(folders, "a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg")
    wait_for(lambda: journal.count_in(JobState.DONE) == 2 and journal.get_meta("paused") == reason, 30,
             what="two restored, the limit reached")

    text = status_text(config_path, capsys)
    assert "paused: daily limit of 2 images reached" in text
    assert "budget (Europe/Berlin): today 2 of 2 images (0 left), this month 2 (no limit); 3 queued" in text
    assert "spent: today 0.04 EUR, this month 0.04 EUR; the queued files will cost 0.06 EUR" in text
    status = status_json(config_path, capsys)
    assert status["budget"]["queued_cost"] == 0.06 and status["budget"]["month"]["spent"] == 0.04

    page = requests.get(daemon.service.dashboard.url + "/", timeout=10).text
    assert "Submits paused: daily limit of 2 images reached" in page
    shown = " ".join(page[page.index('id="budget"'):].split("</p>")[0].split())
    assert 'Paid submits (Europe/Berlin): today <strong id="budget-day-used">2</strong> of 2 images (0 left), 0.04 EUR;' in shown
    assert "Queued: 3, 0.06 EUR when submitted." in shown

    samples = scrape(daemon.service.metrics)
    assert value(samples, "codeformer_submits_paused", reason=reason) == 1
    assert value(samples, "codeformer_budget_used_images", period="day") == 2
    assert value(samples, "codeformer_budget_limit_images", period="day") == 2
    assert value(samples, "codeformer_budget_used_images", period="month") == 2
    assert value(samples, "codeformer_budget_limit_images", period="month") is None, "no monthly limit set"


def test_an_error_outcome_is_refunded_and_does_not_count_against_the_limit(
        tmp_path, folders, emulator, run_daemon, capsys):
    config_path, config = budget_config(tmp_path, folders, emulator, {"daily_limit": 2})
    emulator.inject("outcome_error")  # "system error - not charged": the file is sent again
    daemon = run_daemon(config)
    journal = daemon.service.journal
    drop(folders, "a.jpg", "b.jpg")
    wait_for(lambda: journal.count_in(JobState.DONE) == 2, 30, what="both restored within a limit of two")
    assert emulator.stats()["submits_accepted"] == 3
    kinds = sorted(r["kind"] for r in journal.read("SELECT kind FROM charges"))
    assert kinds == ["charged", "charged", "charged", "refunded"]
    assert status_json(config_path, capsys)["budget"]["day"]["used"] == 2


def test_a_refund_after_midnight_frees_a_place_in_the_day_of_its_charge(tmp_path, folders, emulator, run_daemon,
                                                                        captured_logs):
    """Charged at 23:59, ended with ERROR at 00:01: the next day still gets only its own limit."""
    config_path, config = budget_config(tmp_path, folders, emulator, {"daily_limit": 1, "timezone": "UTC"})
    emulator.latency = 1.5
    emulator.inject("outcome_error")
    daemon = run_daemon(config)
    journal, scheduler = daemon.service.journal, daemon.service.scheduler
    drop(folders, "a.jpg")
    wait_for(lambda: journal.count_in(JobState.SUBMITTED) == 1, 20, what="the submit, today")
    offset = next_utc_midnight_in()
    scheduler.ctx.wall = lambda: time.time() + offset  # the ERROR comes after midnight
    wait_for(lambda: journal.count_in(JobState.DONE) == 1, 30, what="sent again after the ERROR, and restored")
    drop(folders, "b.jpg", first_seed=2)
    wait_for(lambda: len(journal.jobs_in(*JobState)) == 2, 10, what="the second file taken")
    daemon.wait_for_passes(1.5)
    assert emulator.stats()["submits_accepted"] == 2, "the new day's one image went to the file sent again"
    assert journal.get_meta("paused") == "daily limit of 1 image reached"
    assert [j.rel_path for j in journal.jobs_in(JobState.PENDING)] == ["b.jpg"]


def test_an_ambiguous_submit_counts_against_the_limit(tmp_path, folders, emulator, run_daemon, capsys):
    reason = "daily limit of 2 images reached"
    api = {**config_mapping(folders, emulator)["api"], "read_timeout": 0.5}
    config_path, config = budget_config(tmp_path, folders, emulator, {"daily_limit": 2}, api=api)
    emulator.hang_seconds = 3.0
    emulator.inject("submit_timeout")  # accepted (and paid) at the provider, the answer lost
    daemon = run_daemon(config)
    journal = daemon.service.journal
    drop(folders, "lost.jpg")
    wait_for(lambda: (folders["failed"] / "lost.jpg.error.json").exists(), 20, what="the ambiguous submit failed")
    drop(folders, "b.jpg", "c.jpg", first_seed=2)
    wait_for(lambda: journal.count_in(JobState.DONE) == 1 and journal.get_meta("paused") == reason, 30,
             what="one more restored, then the limit")
    daemon.wait_for_passes(1.0)
    assert emulator.stats()["submits_accepted"] == 2
    assert [j.rel_path for j in journal.jobs_in(JobState.PENDING)] == ["c.jpg"]
    assert status_json(config_path, capsys)["budget"]["day"]["used"] == 2


def test_a_submit_cut_off_by_a_stop_counts_as_possibly_charged_after_the_restart(
        tmp_path, folders, emulator, make_config, run_daemon, captured_logs):
    config = make_config(budget={"daily_limit": 1})
    drop(folders, "cut off.jpg")
    scan = (folders["inbox"] / "cut off.jpg").stat()
    folders["state"].mkdir()
    journal = Journal(journal_path(config))
    job = journal.add_job("cut off.jpg", scan.st_size, scan.st_mtime_ns, config.restore.as_request())
    journal.transition(journal.transition(job, JobState.PUBLISHING), JobState.SUBMITTING)  # killed mid-POST
    journal.close()

    daemon = run_daemon(config)
    wait_for(lambda: (folders["failed"] / "cut off.jpg.error.json").exists(), 10, what="failed as ambiguous")
    drop(folders, "next.jpg", first_seed=2)
    wait_for(lambda: paused_events(captured_logs, "daily limit of 1 image reached"), 10, what="the limit")
    daemon.wait_for_passes(1.0)
    assert emulator.stats()["submits_received"] == 0
    assert daemon.service.journal.count_in(JobState.PENDING) == 1


def test_the_monthly_limit_and_a_reload_that_raises_it(tmp_path, folders, emulator, run_daemon, captured_logs,
                                                     monkeypatch):
    monkeypatch.setenv("CODEFORMER_API_KEY", API_KEY)  # a reload reads the key again, as `run` does
    config_path, config = budget_config(tmp_path, folders, emulator, {"monthly_limit": 2, "timezone": "UTC"})
    daemon = run_daemon(config)
    daemon.service.config_path = config_path.resolve()  # what `run --config` gives the service
    journal = daemon.service.journal
    drop(folders, "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    wait_for(lambda: journal.get_meta("paused") == "monthly limit of 2 images reached"
             and journal.count_in(JobState.DONE) == 2, 30, what="two restored, the month's limit reached")

    # A reload (SIGHUP) with a higher limit: one more goes at once, no restart.
    write_config(config_path, config_mapping(folders, emulator, budget={"monthly_limit": 3, "timezone": "UTC"}))
    daemon.service.request_reload()
    daemon.service.scheduler.wake.set()
    wait_for(lambda: journal.count_in(JobState.DONE) == 3
             and journal.get_meta("paused") == "monthly limit of 3 images reached", 30, what="the third restored")
    daemon.wait_for_passes(1.0)
    assert emulator.stats()["submits_accepted"] == 3
    [reloaded] = [e for e in captured_logs if e["event"] == "daemon.reloaded"]
    assert reloaded["changed"] == {"budget.monthly_limit": [2, 3]}
    assert any(e["event"] == "submits.resumed" and e.get("lifted") == "monthly limit of 2 images reached"
               for e in captured_logs)

    # The next month in UTC lifts it.
    scheduler = daemon.service.scheduler
    now = time.time()
    offset = budget.periods(now, "UTC").month_end - now + 60
    scheduler.ctx.wall = lambda: time.time() + offset
    scheduler.wake.set()
    wait_for(lambda: journal.count_in(JobState.DONE) == 4, 30, what="the fourth restored next month")
    assert emulator.stats()["submits_accepted"] == 4
    assert journal.get_meta("paused") is None
