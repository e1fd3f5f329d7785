"""Dashboard: how fast its pages answer with a large journal behind them.

A journal of 100,000 jobs (by default) is written directly: 95% done, the rest failed, pending,
in flight, each with its events (taken, submitted, done or failed), spread over the last 60 days
and a few folders. The dashboard application is then served by waitress on 127.0.0.1, as the daemon
serves it, and each page is fetched over HTTP several times; the median and the slowest answer of
each are printed, with the target: the overview and the jobs page under 200 ms at 100,000 jobs.
It is not a test. Exit 1 only if a run could not complete.

    .venv/bin/python benchmarks/dashboard.py [--jobs 100000] [--rounds 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script from a checkout, not only when installed
    sys.path.insert(0, str(PROJECT_ROOT))

from throughput import report  # noqa: E402

from daemon.dashboard.app import DashboardApp  # noqa: E402
from daemon.dashboard.server import DashboardServer  # noqa: E402
from daemon.journal import Journal  # noqa: E402
from daemon.metrics import Metrics  # noqa: E402

TARGET_SECONDS = 0.200
TARGETED = ("/", "/jobs")
FOLDERS = ("album-1950s", "album-1960s", "portraits", "weddings", "loose")
DAY = 86400.0


def fill(journal: Journal, jobs: int, now: float, seed: int = 7) -> None:
    """`jobs` jobs with their events, in batches of one transaction each (fast, and like a long life)."""
    rng = random.Random(seed)
    params = json.dumps({"codeformer_fidelity": 0.5, "background_enhance": True, "face_upsample": True, "upscale": 2})
    batch = 5000
    with journal.transaction() as cur:
        for start in range(0, jobs, batch):
            rows, events = [], []
            for n in range(start, min(jobs, start + batch)):
                created = now - 60 * DAY * (1 - n / jobs)
                draw = rng.random()
                state = ("done" if draw < 0.95 else "failed" if draw < 0.97 else "pending" if draw < 0.995
                         else "submitted")
                finished = created + 40 if state in ("done", "failed") else None
                submitted = created + 5 if state != "pending" else None
                error = ("provider_failed" if rng.random() < 0.7 else "preflight") if state == "failed" else None
                rows.append((f"{FOLDERS[n % len(FOLDERS)]}/scan-{n:06d}.jpg", state, 1000, n, params, created,
                             finished or created, submitted, finished, error,
                             "the provider reported FAILED: no face" if error else None,
                             f"/srv/failed/scan-{n:06d}.jpg" if state == "failed" else None))
            cur.executemany("INSERT INTO jobs(rel_path, state, size, mtime_ns, params, created_at, updated_at, "
                            "submitted_at, finished_at, error_kind, last_error, final_path) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            first = cur.execute("SELECT max(id) FROM jobs").fetchone()[0] - len(rows) + 1
            for offset, row in enumerate(rows):
                job_id, state, created, submitted, finished = first + offset, row[1], row[5], row[7], row[8]
                events.append((job_id, created, None, "pending", "taken"))
                if submitted is not None:
                    events.append((job_id, submitted, "submitting", "submitted", "accepted"))
                if finished is not None:
                    events.append((job_id, finished, "delivering" if state == "done" else "failing", state, None))
            cur.executemany("INSERT INTO job_events(job_id, at, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                            events)


def time_page(session: requests.Session, url: str, rounds: int) -> dict[str, Any]:
    samples = []
    status = None
    for n in range(rounds + 1):
        started = time.perf_counter()
        answer = session.get(url)
        took = time.perf_counter() - started
        status = answer.status_code
        if n:  # the first fetch warms SQLite's page cache and the templates
            samples.append(took)
    return {"status": status, "median_ms": round(statistics.median(samples) * 1000, 1),
            "max_ms": round(max(samples) * 1000, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="codeformer-dashboard-bench-"))
    server = None
    try:
        now = time.time()
        journal = Journal(root / "journal.sqlite3")
        started = time.perf_counter()
        fill(journal, args.jobs, now)
        filled = time.perf_counter() - started
        journal.close()
        scraped = Journal(root / "journal.sqlite3", read_only=True)  # /metrics reads through a journal of its own
        app = DashboardApp(root / "journal.sqlite3", root / "failed", thumbnails=root / "thumbnails",
                           metrics=Metrics(scraped).render)
        server = DashboardServer(app, "127.0.0.1:0")
        server.start()
        session = requests.Session()
        session.trust_env = False  # loopback only, whatever proxy the environment names
        pages = {"/": "overview", "/live": "overview, its live part", "/jobs": "jobs, first page",
                 f"/jobs?before={args.jobs // 2}": "jobs, a page in the middle",
                 "/jobs?state=failed": "jobs, failed only", "/jobs?folder=portraits": "jobs, one folder",
                 "/jobs?q=scan-0999": "jobs, a name search", "/jobs?q=no-such-name": "jobs, a search matching none",
                 "/jobs/1": "one job", "/failed": "failed", "/metrics": "metrics (a Prometheus scrape)"}
        timings = {path: {"page": name, **time_page(session, server.url + path, args.rounds)}
                   for path, name in pages.items()}
        return {"jobs": args.jobs, "fill_seconds": round(filled, 1), "pages": timings,
                "target_ms": TARGET_SECONDS * 1000,
                "passed": all(timings[p]["median_ms"] < TARGET_SECONDS * 1000 for p in TARGETED)}
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def render(result: dict[str, Any]) -> str:
    lines = [f"journal of {result['jobs']:,} jobs (written in {result['fill_seconds']} s); each page fetched "
             f"over HTTP on loopback, median and slowest:"]
    for path, timing in result["pages"].items():
        mark = f"  (target < {result['target_ms']:.0f} ms)" if path in TARGETED else ""
        lines.append(f"  {timing['page']:<28} {path:<28} {timing['median_ms']:7.1f} ms  max {timing['max_ms']:7.1f} ms"
                     f"  HTTP {timing['status']}{mark}")
    lines.append(f"overview and jobs page under {result['target_ms']:.0f} ms: {'PASS' if result['passed'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in the journal (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=15, help="timed fetches of each page (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    settings = {"jobs": args.jobs, "rounds": args.rounds}
    try:
        result = run(args)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what stopped it
        return report(args.json, settings, None, None, f"{type(exc).__name__}: {exc}")
    return report(args.json, settings, result, render(result), None)


if __name__ == "__main__":
    sys.exit(main())
