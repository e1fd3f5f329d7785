"""What each dashboard page shows, read from the journal through `daemon.reports` (as `status` is).

Functions here build plain template contexts; they decide nothing about HTTP. Times are shown in
the station's local time, ages in words ("3 min").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .. import reports
from ..journal import Job, Journal, JobState
from ..retry import POSSIBLY_PAID

CHART_HEIGHT = 60
CHART_BAR_WIDTH = 10


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def clock_text(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


@dataclass(frozen=True)
class Bar:
    x: int
    y: int
    height: int
    count: int
    label: str


def chart(counts: list[int], now: float) -> list[Bar]:
    """Bars of an SVG chart (attributes only: the page's CSP allows no inline style)."""
    tallest = max(counts) if any(counts) else 1
    bars = []
    for i, count in enumerate(counts):
        height = round(CHART_HEIGHT * count / tallest) if count else 0
        hour_start = now - (len(counts) - i) * 3600
        bars.append(Bar(i * (CHART_BAR_WIDTH + 2), CHART_HEIGHT - height, height, count,
                        time.strftime("%H:00", time.localtime(hour_start))))
    return bars


def overview(journal: Journal, now: float) -> dict[str, Any]:
    report = reports.status_report(journal, now)
    beat = report["heartbeat_age_seconds"]
    counts = report["counts"]
    return {
        "report": report,
        "running": any(n["alive"] for n in report["fleet"]) if report["fleet"] is not None
        else beat is not None and beat < 10,
        "counts": [(state, counts.get(state, 0)) for state in reports.state_names()],
        "in_flight": report["in_flight"],
        "bars": chart(reports.restored_per_hour(journal, now), now),
        "latest": reports.latest_restored(journal),
        "paused_by_person": report["paused_by_person_since"] is not None,
    }


def jobs(journal: Journal, query: dict[str, str], folders: list[str]) -> dict[str, Any]:
    state = query.get("state") or None
    if state not in reports.state_names():
        state = None
    folder = (query.get("folder") or "").strip() or None
    search = (query.get("q") or "").strip()[:200] or None
    page = reports.jobs_page(journal, state=state, folder=folder, search=search,
                             before=_int(query.get("before")), after=_int(query.get("after")))
    filters = {k: v for k, v in (("state", state), ("folder", folder), ("q", search)) if v}
    return {"page": page, "state": state, "folder": folder, "search": search, "filters": filters,
            "states": reports.state_names(), "folders": folders}


def job(journal: Journal, job: Job) -> dict[str, Any]:
    timeline = reports.job_timeline(journal, job)
    return {
        "job": job,
        "timeline": timeline,
        "params": json.dumps(job.params, indent=1, sort_keys=True),
        "failed": job.state is JobState.FAILED,
        "retryable": job.state is JobState.FAILED and bool(job.final_path),
        "possibly_paid": job.error_kind in POSSIBLY_PAID,
        "waited": (job.submitted_at - job.created_at) if job.submitted_at else None,
        "took": ((job.finished_at - job.created_at) if job.finished_at else None),
    }


def failed(journal: Journal) -> dict[str, Any]:
    groups = reports.failure_groups(journal)
    return {"groups": groups, "safe": sum(len(g.jobs) for g in groups if not g.possibly_paid)}


def retry_notice(query: dict[str, str]) -> str:
    """What the failed page says after a retry, from the counts its redirect carries (never free text)."""
    if query.get("refused"):
        return "Not sent again: that file is no longer in failed/."
    retried, left_out = _int(query.get("retried")), _int(query.get("left_out"))
    if retried is None:
        return ""
    notice = f"{retried} file(s) sent back to the inbox"
    if left_out:
        notice += f"; {left_out} left out: they may already have been paid for"
    return notice + "."


def _int(text: str | None) -> int | None:
    """A job id from the query, or None for anything else (SQLite's integers end at 2**63)."""
    try:
        value = int(text) if text else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 2**63 else None
