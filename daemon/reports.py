"""What `status`, the dashboard and /metrics show: read-only reports over the journal.

One function per view, so a figure shown in two places is computed once: `status_report` is what
`status --json` prints and what the dashboard's overview starts from. Every query is an index seek
or a bounded scan, so a journal of 100,000 jobs answers in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import budget, control
from .journal import Job, Journal, JobState
from .profiles import SETTINGS_META
from .retry import POSSIBLY_PAID

PAGE_SIZE = 50
LATEST_RESTORED = 8
HOURS_CHARTED = 24


def journal_summary(journal: Journal, now: float, recent_failures: int = 10) -> dict[str, Any]:
    """The journal's part of `status`, as plain data: counts, what is in flight, recent failures,
    pauses and counters, the daemon's heartbeat, and the fleet's daemons."""
    watching = (JobState.PUBLISHING, JobState.SUBMITTING, JobState.SUBMITTED, JobState.DOWNLOADING,
                JobState.DELIVERING, JobState.FAILING)
    in_flight = [{
        "job_id": j.id, "file": j.rel_path, "state": j.state.value, "request_id": j.request_id,
        "remote_status": j.remote_status,
        "age_seconds": round(now - (j.submitted_at or j.created_at), 1),
        "profile": j.profile, "params": j.params,
    } for j in journal.read_jobs(f"SELECT * FROM jobs WHERE state IN ({', '.join('?' for _ in watching)}) "
                                 "ORDER BY id", [s.value for s in watching])]  # every daemon's
    failures = [{
        "job_id": j.id, "file": j.rel_path, "reason": j.last_error, "stage": j.error_kind,
        "request_id": j.request_id, "moved_to": j.final_path, "at": j.finished_at,
        "profile": j.profile, "params": j.params,
    } for j in journal.recent(JobState.FAILED, recent_failures)]
    # One daemon's pid and heartbeat file; a fleet's daemons are each in `fleet`, with their own.
    heartbeat = None if journal.store.shared else journal.heartbeat_age(now)
    daemons = fleet(journal) if journal.store.shared else None
    return {
        "counts": {state.value: 0 for state in JobState} | journal.counts_by_state(),
        "in_flight": in_flight,
        "recent_failures": failures,
        "paused": journal.get_meta(control.DAEMON_PAUSE_META),
        "inbox_unavailable": inbox_unavailable(journal, daemons),
        "ambiguous_at_restart": journal.counter("ambiguous_at_restart"),
        "duplicates_skipped": journal.counter("duplicates_skipped"),
        "unchanged_delivered": journal.counter("unchanged_delivered"),
        "submissions_spent": journal.submissions_spent(),
        "heartbeat_age_seconds": round(heartbeat, 1) if heartbeat is not None else None,
        "pid": None if journal.store.shared else int(journal.get_meta("pid") or 0) or None,
        "fleet": daemons,
    }


def inbox_unavailable(journal: Journal, daemons: list[dict[str, Any]] | None = None) -> str | None:
    """Why the daemon cannot read its inbox, None if it can. On SQLite that is the newest run's word
    (its lease is never renewed: the lock file, not a lease, keeps it alone). In a fleet each station
    mounts the share itself, so each running one that cannot is named with its reason; `daemons` is
    the fleet as `fleet` lists it, when the caller has it already."""
    if not journal.store.shared:
        rows = journal.read("SELECT inbox_unavailable FROM nodes ORDER BY started_at DESC LIMIT 1")
        return rows[0]["inbox_unavailable"] if rows else None
    daemons = fleet(journal) if daemons is None else daemons
    # Only a running station's word is kept in its entry: a stopped one's is stale.
    unreadable = sorted((n["node"], n["inbox_unavailable"]) for n in daemons if n["inbox_unavailable"])
    return "; ".join(f"on {name}: {reason}" for name, reason in unreadable) or None


FLEET_SHOWN_AFTER_LEAVING = 86400.0
"""A daemon that stopped (or died) stays in `status` this long after its lease ended."""


def fleet(journal: Journal) -> list[dict[str, Any]]:
    """Each daemon of the fleet, newest first: its name, host, last heartbeat (seconds ago, by the
    database's clock), whether its lease is live, its state as `status`, the dashboard and /metrics
    show it (running, silent: its lease lapsed, or stopped), and how many jobs it holds now."""
    now = journal.database_time()
    return [{
        "node": n.name, "host": n.host, "pid": n.pid, "token": n.token,
        "heartbeat_age_seconds": round(now - n.heartbeat_at, 1),
        "alive": (alive := n.lease_until > now and n.left_at is None),
        "left": n.left_at is not None, "holding": n.holding,
        "state": "running" if alive else "stopped" if n.left_at is not None else "silent",
        "inbox_unavailable": n.inbox_unavailable if alive else None,  # a stopped station's last word is stale
    } for n in journal.nodes() if n.lease_until > now - FLEET_SHOWN_AFTER_LEAVING or n.holding]


def status_report(journal: Journal, now: float) -> dict[str, Any]:
    """Everything `status` shows, as plain data: the journal's summary with a person's pause, the
    oldest waiting file, folder settings that hold files, and the budget with the day's and month's
    paid submits from the ledger. The limits shown are those the daemon applies (its loop records them
    in the journal), so every reader shows the same ones."""
    report = journal_summary(journal, now)
    person = control.paused_by_person_since(journal)
    if person is not None:
        report["paused"] = control.PAUSED_BY_PERSON
    report["paused_by_person_since"] = person
    oldest = journal.read("SELECT id, rel_path, created_at FROM jobs INDEXED BY jobs_by_state "
                          "WHERE state = 'pending' ORDER BY id LIMIT 1")
    report["oldest_pending"] = ({"job_id": oldest[0]["id"], "file": oldest[0]["rel_path"],
                                 "since": oldest[0]["created_at"],
                                 "age_seconds": round(now - oldest[0]["created_at"], 1)} if oldest else None)
    report["settings_invalid"] = json.loads(journal.get_meta(SETTINGS_META) or "{}")
    # The day's and the month's submits are the ledger's (paid images, refunds taken off), in the
    # budget's time zone: one figure for `status`, the overview and the limits.
    config = budget.decode(journal.get_meta(budget.BUDGET_META))
    when = budget.periods(now, config.timezone)
    used = ledger_used(journal, when)
    report["submits_today"], report["submits_this_month"] = used.day, used.month
    report["budget"] = budget.summary(config, used, report["counts"].get(JobState.PENDING.value, 0), when, now)
    return report


def ledger_used(journal: Journal, when: budget.Periods) -> budget.Used:
    """The images the ledger counts as paid in the day and the month of `when`."""
    return budget.Used(journal.charged_between(when.day_start, when.day_end),
                       journal.charged_between(when.month_start, when.month_end))


def restored_per_hour(journal: Journal, now: float, hours: int = HOURS_CHARTED) -> list[int]:
    """Jobs finished as done in each of the last `hours` hours, oldest hour first."""
    since = now - hours * 3600
    counts = [0] * hours
    for row in journal.read("SELECT CAST((at - ?) / 3600 AS INTEGER) AS hour, count(*) AS n FROM job_events "
                            "WHERE to_state = 'done' AND at >= ? GROUP BY hour", (since, since)):
        if 0 <= row["hour"] < hours:
            counts[row["hour"]] = row["n"]
    return counts


def latest_restored(journal: Journal, limit: int = LATEST_RESTORED) -> list[Job]:
    return journal.read_jobs("SELECT * FROM jobs INDEXED BY jobs_by_state WHERE state = 'done' "
                             "ORDER BY id DESC LIMIT ?", (limit,))


@dataclass(frozen=True)
class JobsPage:
    """One page of the jobs list, newest first; `older` is the id to continue from, if there is more."""

    jobs: list[Job]
    older: int | None
    newer: int | None


def escape_like(text: str) -> str:
    """`text` for a LIKE pattern, its own % and _ taken literally (with ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def jobs_page(journal: Journal, *, state: str | None = None, folder: str | None = None, search: str | None = None,
              before: int | None = None, after: int | None = None, size: int = PAGE_SIZE) -> JobsPage:
    """Jobs newest first, filtered, a page at a time by id (keyset: as fast on page 2,000 as on page 1).

    `folder` is a folder of the inbox (its files and everything below), `search` a part of the name.
    """
    where, args = [], []
    if state:
        where.append("state = ?")
        args.append(state)
    if folder:
        where.append("rel_path LIKE ? ESCAPE '\\'")
        args.append(escape_like(folder.strip("/")) + "/%")
    if search:
        where.append("rel_path LIKE ? ESCAPE '\\'")
        args.append("%" + escape_like(search) + "%")
    if after is not None:  # the page before, seen from the newer side: read upwards, then reverse
        found = journal.read_jobs(f"SELECT * FROM jobs WHERE {' AND '.join(where + ['id > ?'])} ORDER BY id LIMIT ?",
                                  (*args, after, size + 1))
        more_newer = len(found) > size
        jobs = list(reversed(found[:size]))
        return JobsPage(jobs, older=jobs[-1].id if jobs else None,
                        newer=jobs[0].id if jobs and more_newer else None)
    if before is not None:
        where.append("id < ?")
        args.append(before)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    found = journal.read_jobs(f"SELECT * FROM jobs {clause} ORDER BY id DESC LIMIT ?", (*args, size + 1))
    jobs = found[:size]
    return JobsPage(jobs, older=jobs[-1].id if len(found) > size else None,
                    newer=jobs[0].id if jobs and before is not None else None)


def folders(journal: Journal, limit: int = 200) -> list[str]:
    """The inbox's top-level folders that have jobs, for the jobs page's filter."""
    rows = journal.read("SELECT DISTINCT substr(rel_path, 1, instr(rel_path, '/') - 1) AS folder FROM jobs "
                        "WHERE instr(rel_path, '/') > 0 ORDER BY folder LIMIT ?", (limit,))
    return [r["folder"] for r in rows]


@dataclass(frozen=True)
class FailureGroup:
    """Failed jobs that failed for one reason (their stage), newest first."""

    stage: str
    possibly_paid: bool
    jobs: list[Job]


def failure_groups(journal: Journal, limit: int = 500) -> list[FailureGroup]:
    """The files in failed/ grouped by the stage they failed at; those that may have been paid for last."""
    failed = journal.read_jobs("SELECT * FROM jobs INDEXED BY jobs_by_state WHERE state = 'failed' "
                               "ORDER BY id DESC LIMIT ?", (limit,))
    groups: dict[str, list[Job]] = {}
    for job in failed:
        groups.setdefault(job.error_kind or "unknown", []).append(job)
    return sorted((FailureGroup(stage, stage in POSSIBLY_PAID, jobs) for stage, jobs in groups.items()),
                  key=lambda g: (g.possibly_paid, -len(g.jobs), g.stage))


def job_timeline(journal: Journal, job: Job) -> list[dict[str, Any]]:
    return journal.history(job.id)


def state_names() -> list[str]:
    return [state.value for state in JobState]
