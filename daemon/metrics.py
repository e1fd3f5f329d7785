"""Prometheus metrics: counters the stages bump as things happen, and the journal's figures at each scrape.

Two kinds of figure, kept apart on purpose:
- What `status` shows (jobs by state, in flight, submissions spent, paused, inbox, the oldest waiting
  job) is read from the journal when Prometheus scrapes, through `reports.status_report`, the very
  function behind `status --json`: both show one number, and it survives a restart.
- What the journal does not keep (files detected, submits by outcome, polls, downloads, bytes, the
  two durations, the in-flight limit) lives in this process. Its counters start at zero with each
  daemon; Prometheus's rate() and increase() take such a reset in their stride.

Each daemon owns its registry, not prometheus_client's global one: several run in one test process.
A hook costs a counter increment (a microsecond or so), never a journal read.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .api import PollVerdict, SubmitVerdict
from .journal import IN_FLIGHT_STATES, Journal, JobState
from .logging import mask_secrets
from .reports import status_report

# A `_created` series per counter and histogram would double the output and say only when this
# process started; the switch is process-wide and read at each scrape.
prometheus_client.disable_created_metrics()

PREFIX = "codeformer_"

DURATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0)
"""Seconds: a provider answers in a few seconds to a few minutes, and api.job_timeout is 900 s by default."""

LABEL_WORD = re.compile(r"[a-z0-9_]{1,40}")
REASON_LENGTH = 80


def label_word(text: str | None) -> str:
    """A label value from a fixed vocabulary (a verdict, an error kind): anything else becomes 'other',
    so no file name or provider text can ever reach a label (nor grow the number of series)."""
    return text if text is not None and LABEL_WORD.fullmatch(text) else "other"


def pause_reason(text: str) -> str:
    """The pause reason as a label: the daemon's own short words, masked and cut, just in case."""
    return mask_secrets(text)[:REASON_LENGTH]


def provider_time(provider_seconds: float | None, submitted_at: float | None, now: float) -> float | None:
    """The provider's own processing time when its answer gives it, else submit-to-completion as the
    daemon saw it (wall clock); None when neither is known."""
    if provider_seconds is not None and provider_seconds >= 0:
        return provider_seconds
    if submitted_at is not None and now >= submitted_at:
        return now - submitted_at
    return None


def figure_families(report: dict[str, Any] | None) -> list[Metric]:
    """The gauges and counters of a `status_report`, as metric families (empty ones for None: their names).

    Every state is present, at 0 too; the oldest pending timestamp has no sample while nothing waits
    (a 0 would read as "waiting since 1970" to an alert).
    """
    jobs = GaugeMetricFamily(PREFIX + "jobs", "Jobs in the journal by state.", labels=["state"])
    in_flight = GaugeMetricFamily(PREFIX + "jobs_in_flight",
                                  "Jobs holding an in-flight slot (publishing, submitting, submitted).")
    oldest = GaugeMetricFamily(PREFIX + "oldest_pending_job_timestamp_seconds",
                               "When the longest-waiting pending job was detected (Unix time); absent when none waits.")
    paused = GaugeMetricFamily(PREFIX + "submits_paused", "1 while new submits are paused, with the reason.",
                               labels=["reason"])
    inbox = GaugeMetricFamily(PREFIX + "inbox_available", "1 while the inbox folder can be read, 0 while it is "
                              "away (in a fleet: from any running station).")
    spent = CounterMetricFamily(PREFIX + "submissions_spent", "Submits the provider accepted (each is paid), ever.")
    duplicates = CounterMetricFamily(PREFIX + "duplicates_skipped",
                                     "Jobs given an identical job's result instead of a submit of their own, ever.")
    unchanged = CounterMetricFamily(PREFIX + "unchanged_deliveries",
                                    "Results delivered though only resized (no face found or restored), ever.")
    ambiguous = CounterMetricFamily(PREFIX + "ambiguous_submits_at_restart",
                                    "Submits found cut off by a crash or stop (possibly paid, not resent), ever.")
    used = GaugeMetricFamily(PREFIX + "budget_used_images",
                             "Images the ledger counts as paid this day or month (budget.timezone).", labels=["period"])
    limit = GaugeMetricFamily(PREFIX + "budget_limit_images",
                              "The budget's limit of images per day or month; absent when none is set.",
                              labels=["period"])
    daemons = GaugeMetricFamily(PREFIX + "fleet_daemons",
                                "Daemons sharing the PostgreSQL journal, by state (running, silent, stopped); "
                                "absent on SQLite.", labels=["state"])
    families = [jobs, in_flight, oldest, paused, inbox, spent, duplicates, unchanged, ambiguous, used, limit,
                daemons]
    if report is None:
        return families
    if report.get("fleet") is not None:
        for state in ("running", "silent", "stopped"):
            daemons.add_metric([state], sum(node["state"] == state for node in report["fleet"]))
    for period in ("day", "month"):
        figures = report["budget"][period]
        used.add_metric([period], figures["used"])
        if figures["limit"] is not None:
            limit.add_metric([period], figures["limit"])
    counts = report["counts"]
    for state in JobState:
        jobs.add_metric([state.value], counts.get(state.value, 0))
    in_flight.add_metric([], sum(counts.get(state.value, 0) for state in IN_FLIGHT_STATES))
    if report.get("oldest_pending"):
        oldest.add_metric([], report["oldest_pending"]["since"])
    reason = report.get("paused")
    paused.add_metric([pause_reason(reason) if reason else ""], 1 if reason else 0)
    inbox.add_metric([], 0 if report.get("inbox_unavailable") else 1)
    spent.add_metric([], report["submissions_spent"])
    duplicates.add_metric([], report.get("duplicates_skipped", 0))
    unchanged.add_metric([], report.get("unchanged_delivered", 0))
    ambiguous.add_metric([], report.get("ambiguous_at_restart", 0))
    return families


class JournalFigures:
    """A collector: at each scrape, the figures `status --json` shows, read through the same function."""

    def __init__(self, journal: Journal, wall: Callable[[], float] = time.time) -> None:
        self.journal = journal
        self.wall = wall

    def describe(self) -> list[Metric]:
        return figure_families(None)

    def collect(self) -> Iterable[Metric]:
        return figure_families(status_report(self.journal, self.wall()))


class Metrics:
    """One daemon's metrics: its process counters and, given a journal, the journal's figures."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.files_detected = Counter(PREFIX + "files_detected", "Settled scans taken from the inbox as new jobs.",
                                      registry=registry)
        self.submits = Counter(PREFIX + "submits", "Submit answers, by outcome.", ["outcome"], registry=registry)
        self.polls = Counter(PREFIX + "polls", "Status polls answered (or not), by verdict.", ["verdict"],
                             registry=registry)
        self.downloads = Counter(PREFIX + "downloads", "Results fetched from the provider in full.", registry=registry)
        self.downloaded_bytes = Counter(PREFIX + "downloaded_bytes", "Bytes of the results fetched.", registry=registry)
        self.uploaded_bytes = Counter(PREFIX + "uploaded_bytes", "Bytes of the copies published for the provider.",
                                      registry=registry)
        self.jobs_done = Counter(PREFIX + "jobs_done", "Jobs restored: output in the outbox, original archived.",
                                 registry=registry)
        self.jobs_failed = Counter(PREFIX + "jobs_failed", "Jobs failed, by the stage (error kind) they failed at.",
                                   ["stage"], registry=registry)
        self.in_flight_limit = Gauge(PREFIX + "in_flight_limit",
                                     "Jobs allowed in flight now (api.max_in_flight, lowered after 429s).",
                                     registry=registry)
        self.provider_seconds = Histogram(PREFIX + "provider_processing_seconds",
                                          "The provider's processing time per completed job.",
                                          buckets=DURATION_BUCKETS, registry=registry)
        self.detection_to_done_seconds = Histogram(PREFIX + "detection_to_done_seconds",
                                                   "From a scan's detection to its job done.",
                                                   buckets=DURATION_BUCKETS, registry=registry)
        for verdict in SubmitVerdict:  # every outcome present at 0: rate() needs a series before the first one
            self.submits.labels(verdict.value)
        for poll_verdict in PollVerdict:
            self.polls.labels(poll_verdict.value)
        if journal is not None:
            registry.register(JournalFigures(journal))

    # ------------------------------------------------------------------ hooks (one call each, no I/O)

    def detected(self, files: int) -> None:
        self.files_detected.inc(files)

    def submit_answered(self, verdict: SubmitVerdict) -> None:
        self.submits.labels(label_word(verdict.value.lower())).inc()

    def poll_answered(self, verdict: PollVerdict) -> None:
        self.polls.labels(label_word(verdict.value.lower())).inc()

    def published(self, size: int | None) -> None:
        self.uploaded_bytes.inc(size or 0)

    def downloaded(self, size: int) -> int:
        """A result fetched in full; returns `size`, so it can wrap the download call."""
        self.downloads.inc()
        self.downloaded_bytes.inc(size)
        return size

    def completed_at_provider(self, provider_seconds: float | None, submitted_at: float | None, now: float) -> None:
        seconds = provider_time(provider_seconds, submitted_at, now)
        if seconds is not None:
            self.provider_seconds.observe(seconds)

    def job_done(self, created_at: float, finished_at: float | None) -> None:
        self.jobs_done.inc()
        if finished_at is not None and finished_at >= created_at:
            self.detection_to_done_seconds.observe(finished_at - created_at)

    def job_failed(self, kind: str | None) -> None:
        self.jobs_failed.labels(label_word(kind)).inc()

    def follow_in_flight_limit(self, limit: Callable[[], float]) -> None:
        """Read the scheduler's limit at each scrape (it changes inside the gate, after 429s and accepts)."""
        self.in_flight_limit.set_function(limit)

    # ------------------------------------------------------------------ exposition

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type, for the dashboard's /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
