"""The benchmark scripts run: each in a tiny configuration exits 0 and reports its figures as JSON.

No figure is held against a target here (they depend on the machine and its load); only that each
script completes against the real daemon and emulator and reports what its docstring promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: float = 180) -> dict[str, Any]:
    """Run benchmarks/<script> with --json; its report, after checking it exited 0.

    Each script gives up on its own well within `timeout` and stops the daemon it started.
    """
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}"
    report = json.loads(proc.stdout)
    assert report["error"] is None
    return report


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_throughput_reports_cpu_from_the_drop_and_the_image_work() -> None:
    report = run_benchmark("throughput.py", "--files", "8", "--latency", "0.2")
    (run,) = report["runs"]
    assert run["files"] == 8 and run["size"] == "320x240" and run["submits_accepted"] == 8
    for key in ("wall_seconds", "ratio", "polls_per_job", "daemon_cpu_seconds_per_file", "daemon_peak_rss_mib",
                "daemon_startup_cpu_seconds", "image_work_cpu_seconds_per_file", "daemon_other_cpu_seconds_per_file"):
        assert is_number(run[key]), key
    assert run["image_work_cpu_seconds_per_file"] > 0
    assert run["daemon_other_cpu_seconds_per_file"] == round(
        run["daemon_cpu_seconds_per_file"] - run["image_work_cpu_seconds_per_file"], 4)
    assert {"ratio_passed", "polls_passed", "passed"} <= run.keys()
    assert report["settings"]["target_ratio"] == 0.95 and report["settings"]["target_polls_per_job"] == 1.5
    assert report["by_size"]["320x240"]["image_work"]["cpu_seconds_per_file"] == run["image_work_cpu_seconds_per_file"]


def test_throughput_runs_with_the_journal_in_postgresql(postgres_dsn: str) -> None:
    """The same measurement with the fleet's journal: a database of its own per run, dropped afterwards."""
    import psycopg

    report = run_benchmark("throughput.py", "--files", "8", "--latency", "0.2", "--postgresql", postgres_dsn)
    (run,) = report["runs"]
    assert report["settings"]["journal"] == "postgresql"
    assert "dbname=codeformer_throughput_" in run["journal"], run["journal"]  # what the daemon said it used
    assert run["submits_accepted"] == 8 and is_number(run["daemon_cpu_seconds_per_file"])
    with psycopg.connect(postgres_dsn) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'codeformer_throughput_%'").fetchall()
    assert left == []


def test_backlog_delivers_every_file_present_at_start() -> None:
    report = run_benchmark("backlog.py", "--files", "40", "--until", "delivered", "--timeout", "120")
    result = report["result"]
    assert result["reached"] and result["until"] == "delivered"
    assert (result["done"], result["failed"], result["submits_accepted"]) == (40, 0, 40)  # no two alike
    for key in ("first_submit_seconds", "all_journalled_seconds", "all_delivered_seconds", "files_per_second",
                "daemon_cpu_seconds_per_file", "window_cpu_seconds_per_file", "daemon_peak_rss_mib"):
        assert is_number(result[key]) and result[key] > 0, key
    assert result["first_submit_seconds"] < result["all_delivered_seconds"]


def test_backlog_by_default_stops_after_a_window_of_delivery() -> None:
    report = run_benchmark("backlog.py", "--files", "40", "--window", "1", "--timeout", "120")
    result = report["result"]
    assert result["reached"] and result["until"] == "journalled" and result["all_delivered_seconds"] is None
    assert is_number(result["all_journalled_seconds"]) and 0 < result["window_seconds"] < 5  # 1 s, or all done
    assert result["daemon_cpu_seconds_per_file"] is None  # only over a whole delivered backlog


def test_sharewalk_counts_walks_and_times_a_rescan() -> None:
    report = run_benchmark("sharewalk.py", "--files", "3000", "--archived", "3000", "--settle", "0.5",
                           "--seconds", "2", "--max-seconds", "20", "--rescans", "1")
    result = report["result"]
    assert result["observer"] == "polling" and result["files"] == 3000 and result["with_jobs"] == 2700
    assert result["walks"] >= 3  # a walk every 0.25 s; the window waits for three whole ones
    for key in ("walk_cpu_seconds", "walk_wall_seconds", "walk_period_seconds", "walk_share_of_core",
                "walk_share_at_interval", "rescan_cpu_seconds", "rescan_wall_seconds", "share_of_core"):
        assert is_number(result[key]), key
    assert result["walk_cpu_seconds"] > 0 and result["rescan_cpu_seconds"] > 0
    assert result["walk_period_seconds"] >= 0.2  # walks are about a polling interval (0.25 s) apart, at least
