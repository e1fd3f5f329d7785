"""Backlog: a whole box of small scans already in the inbox when the daemon starts.

10,000 small JPEGs (64x48, each with its own JPEG comment so no two share a SHA-256: identical
content would be treated as twins of one job) lie in the inbox before a real daemon process starts,
against the gateway emulator in this process (latency 0.05 s, 8 concurrent jobs, api.max_in_flight 8,
watch.settle_seconds 0.2); everything stays on 127.0.0.1. Start is the moment the daemon process is
started. It prints, from the daemon's JSON log and its journal (read-only, as `status` reads it):
the first submit (`job.submitted`), all files journalled (the last `file.detected`), files per second
overall, the daemon's CPU (its whole life: start-up is part of taking a backlog) and its peak RSS.
It is not a test. Exit 1 only if a run could not complete.

`--until journalled` (the default) ends once every file has its job and `--window` (60 s) of
delivery after that has been watched: the daemon's CPU in that window per file finished in it is the
CPU per file (an upper bound while files pile up under way; the figure per file taken up is the lower
bound). `--until delivered` waits until every file is done and gives the CPU per file over the whole
life; it was not made the default because on the 2-core development machine it took 465 s (7.75
minutes) at 10,000 files with the code of 2026-11-26, more than the few minutes a benchmark should.

    .venv/bin/python benchmarks/backlog.py [--files 10000] [--until journalled|delivered] [--json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script from a checkout, not only when installed
    sys.path.insert(0, str(PROJECT_ROOT))

# The daemon-process helpers of the throughput benchmark, beside this file.
from throughput import (LOOPBACK, BenchmarkError, cpu_seconds, epoch, free_port, log_tail,  # noqa: E402
                        peak_rss_mib, read_log, report, start_daemon, station_folders, stop_daemon)

from daemon.demo import make_photo  # noqa: E402
from daemon.emulator import GatewayEmulator  # noqa: E402
from daemon.journal import Journal, JournalError  # noqa: E402
from daemon.service import JOURNAL_NAME  # noqa: E402

SCAN_SIZE = (64, 48)
TARGET_FIRST_SUBMIT = 1.0
TARGET_ALL_JOURNALLED = 10.0
TARGET_CPU_PER_FILE = 0.005
PROGRESS_POLL = 0.1
"""Seconds between looks at the journal; the figures themselves come from the log's timestamps."""


@dataclass
class BacklogResult:
    files: int
    until: str
    reached: bool
    """The run got to `until` before the timeout."""
    ready_seconds: float | None
    """Start -> `daemon.ready`."""
    first_detected_seconds: float | None
    first_submit_seconds: float | None
    all_journalled_seconds: float | None
    all_delivered_seconds: float | None
    end_seconds: float
    """Start -> the end point (`until`), as this process saw it."""
    files_per_second: float
    """Files done (journalled or delivered, as `until` says) over start -> the last one (from the log)."""
    daemon_cpu_seconds: float
    daemon_cpu_seconds_per_file: float | None
    """Whole life, per file delivered; None with `until journalled` (see the window's figures)."""
    daemon_cpu_seconds_to_journalled: float | None
    window_seconds: float | None
    """The delivery window: from all journalled, `--window` seconds or until all were finished."""
    window_finished: int | None
    window_in_progress_at_end: int | None
    """Taken but not finished when the window ended: their work so far is in the window's CPU too."""
    window_files_per_second: float | None
    window_cpu_seconds_per_file: float | None
    """The daemon's CPU in the window per file finished in it: the steady cost of working through a
    backlog, an upper bound while more files are under way at its end than at its start."""
    window_cpu_seconds_per_file_taken: float | None
    """The same per file taken up in the window (finished, plus the growth of those under way): a lower bound."""
    daemon_peak_rss_mib: float
    done: int
    failed: int
    submits_accepted: int
    polls_per_job: float | None
    daemon_exit_code: int | None


# --------------------------------------------------------------------------- setting up


def scan_bytes(size: tuple[int, int] = SCAN_SIZE) -> bytes:
    """One small photo-like JPEG, as bytes."""
    with tempfile.TemporaryDirectory() as folder:
        return make_photo(Path(folder) / "scan.jpg", *size, seed=7, format="JPEG").read_bytes()


def with_comment(jpeg: bytes, text: str) -> bytes:
    """`jpeg` with a COM segment right after SOI: another SHA-256, the same pixels."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    comment = text.encode("ascii")
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def fill_inbox(inbox: Path, count: int) -> None:
    jpeg = scan_bytes()
    for i in range(count):
        (inbox / f"scan-{i:05d}.jpg").write_bytes(with_comment(jpeg, f"backlog scan {i}"))


def write_config(root: Path, emulator: GatewayEmulator, args: argparse.Namespace) -> Path:
    config = {
        **station_folders(root),
        "api": {"base_url": emulator.base_url, "status_url": emulator.status_url,
                "max_in_flight": args.max_in_flight, "poll_interval": args.poll_interval, "job_timeout": 600},
        "hosting": {"adapter": "builtin", "builtin": {"listen": f"{LOOPBACK}:{free_port()}"}},
        "watch": {"settle_seconds": args.settle, "rescan_seconds": args.rescan},
        "logging": {"format": "json", "level": "info"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- measuring


def journal_counts(state_dir: Path, journal: Journal | None) -> tuple[dict[str, int], Journal | None]:
    """Jobs by state, read as `status` reads them; the journal is opened once the daemon made it."""
    if journal is None:
        try:
            journal = Journal(state_dir / JOURNAL_NAME, read_only=True)
        except JournalError:
            return {}, None  # not created (or not migrated) yet
    return journal.counts_by_state(), journal


@dataclass(frozen=True)
class Sample:
    """The daemon's progress at one moment."""

    at: float
    """Seconds since start."""
    cpu: float
    finished: int
    """Jobs done or failed."""
    in_progress: int
    """Jobs taken from the queue (past pending) and not yet finished."""


def wait_for_end(daemon: Any, root: Path, log_path: Path, args: argparse.Namespace,
                 started: float) -> tuple[bool, Sample | None, Sample | None]:
    """Watch the journal until `args.until` is reached; (reached, when all were journalled, the end of
    the delivery window: `args.window` seconds after that, or when all were finished if sooner).

    With `until journalled` the run ends with the window, so it still shows the CPU per delivered file.
    """
    journal: Journal | None = None
    journalled = window_end = None
    deadline = started + args.timeout
    try:
        while True:
            counts, journal = journal_counts(root / "state", journal)
            now, finished = time.monotonic() - started, counts.get("done", 0) + counts.get("failed", 0)
            in_progress = sum(counts.values()) - counts.get("pending", 0) - finished
            if journalled is None and sum(counts.values()) >= args.files:
                journalled = Sample(now, cpu_seconds(daemon.pid), finished, in_progress)
            if journalled is not None and window_end is None and (
                    now - journalled.at >= args.window or finished >= args.files):
                window_end = Sample(now, cpu_seconds(daemon.pid), finished, in_progress)
            if window_end is not None and (args.until == "journalled" or finished >= args.files):
                return True, journalled, window_end
            if daemon.poll() is not None:
                raise BenchmarkError(f"the daemon exited with {daemon.returncode}:\n" + log_tail(log_path))
            if time.monotonic() >= deadline:
                return False, journalled, window_end
            time.sleep(PROGRESS_POLL)
    finally:
        if journal is not None:
            journal.close()


def log_figures(events: list[dict[str, Any]], start_wall: float, files: int) -> dict[str, Any]:
    """Seconds after start of the log's milestones; all journalled only when every file was logged."""
    def times(name: str) -> list[float]:
        return sorted(epoch(e["timestamp"]) - start_wall for e in events if e.get("event") == name)

    ready, detected, submitted, done = (times(name) for name in
                                        ("daemon.ready", "file.detected", "job.submitted", "job.done"))
    return {
        "ready": ready[0] if ready else None,
        "first_detected": detected[0] if detected else None,
        "all_journalled": detected[-1] if len(detected) >= files else None,
        "first_submit": submitted[0] if submitted else None,
        "last_done": done[-1] if len(done) >= files else None,
    }


def run(args: argparse.Namespace) -> BacklogResult:
    """One run with its own emulator, daemon and folders, all removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="codeformer-backlog-"))
    emulator = GatewayEmulator(f"{LOOPBACK}:0", latency=args.latency, max_concurrent=8)
    daemon = None
    try:
        emulator.start()
        config_path = write_config(root, emulator, args)
        fill_inbox(root / "inbox", args.files)
        log_path = root / "daemon.log"
        start_wall, started = time.time(), time.monotonic()
        daemon = start_daemon(config_path, log_path, emulator.api_key)
        reached, at_journalled, window_end = wait_for_end(daemon, root, log_path, args, started)
        end = time.monotonic() - started
        cpu, rss = cpu_seconds(daemon.pid), peak_rss_mib(daemon.pid)
        exit_code, _ = stop_daemon(daemon)
        counts, journal = journal_counts(root / "state", None)
        if journal is not None:
            journal.close()
        figures = log_figures(read_log(log_path), start_wall, args.files)
        stats = emulator.stats()
        journalled = figures["all_journalled"]
        if journalled is None and at_journalled is not None:
            journalled = at_journalled.at  # as this process saw it (the log did not name every file)
        window = window_figures(at_journalled, window_end)
        delivered = (figures["last_done"] or end) if args.until == "delivered" and reached else None
        handled = args.files if reached else (counts.get("done", 0) + counts.get("failed", 0)
                                              if args.until == "delivered" else sum(counts.values()))
        span = (delivered if args.until == "delivered" else journalled) if reached else None
        return BacklogResult(
            files=args.files, until=args.until, reached=reached, ready_seconds=_round(figures["ready"]),
            first_detected_seconds=_round(figures["first_detected"]),
            first_submit_seconds=_round(figures["first_submit"]), all_journalled_seconds=_round(journalled),
            all_delivered_seconds=_round(delivered), end_seconds=round(end, 3),
            files_per_second=round(handled / (span or end), 1), daemon_cpu_seconds=round(cpu, 2),
            daemon_cpu_seconds_per_file=round(cpu / args.files, 4) if delivered is not None else None,
            daemon_cpu_seconds_to_journalled=None if at_journalled is None else round(at_journalled.cpu, 2),
            **window,
            daemon_peak_rss_mib=round(rss, 1), done=counts.get("done", 0), failed=counts.get("failed", 0),
            submits_accepted=stats["submits_accepted"],
            polls_per_job=round(stats["polls"] / stats["submits_accepted"], 2) if stats["submits_accepted"] else None,
            daemon_exit_code=exit_code,
        )
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        emulator.stop()
        if args.keep:
            print(f"kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def window_figures(start: Sample | None, end: Sample | None) -> dict[str, Any]:
    """Delivery after all were journalled: seconds, files finished, files/s, daemon CPU per file."""
    if start is None or end is None or end.at <= start.at:
        return {"window_seconds": None, "window_finished": None, "window_in_progress_at_end": None,
                "window_files_per_second": None, "window_cpu_seconds_per_file": None,
                "window_cpu_seconds_per_file_taken": None}
    finished = end.finished - start.finished
    taken = finished + end.in_progress - start.in_progress
    return {"window_seconds": round(end.at - start.at, 2), "window_finished": finished,
            "window_in_progress_at_end": end.in_progress,
            "window_files_per_second": round(finished / (end.at - start.at), 1),
            "window_cpu_seconds_per_file": round((end.cpu - start.cpu) / finished, 4) if finished else None,
            "window_cpu_seconds_per_file_taken": round((end.cpu - start.cpu) / taken, 4) if taken > 0 else None}


# --------------------------------------------------------------------------- reporting


def _against(value: float | None, target: float, unit: str = "s", scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    verdict = "PASS" if value <= target else "FAIL"
    return f"{value * scale:.3f} {unit}  (target < {target * scale:g} {unit}: {verdict})"


def _cpu_target(seconds: float | None) -> str:
    if seconds is None:
        return ""
    verdict = "PASS" if seconds <= TARGET_CPU_PER_FILE else "FAIL"
    return f"; target <= {TARGET_CPU_PER_FILE * 1000:g} ms: {verdict}"


def render(result: BacklogResult) -> str:
    r = result
    whole_life = r.daemon_cpu_seconds_per_file if r.until == "delivered" else None
    window = r.window_cpu_seconds_per_file
    rows = [
        ("files", f"{r.files} x {SCAN_SIZE[0]}x{SCAN_SIZE[1]} JPEG, in the inbox at start"),
        ("measured until", r.until + ("" if r.reached else "  <-- NOT reached before --timeout")),
        ("start -> daemon ready", "n/a" if r.ready_seconds is None else f"{r.ready_seconds:.3f} s"),
        ("start -> first file journalled", "n/a" if r.first_detected_seconds is None
         else f"{r.first_detected_seconds:.3f} s"),
        ("start -> first submit", _against(r.first_submit_seconds, TARGET_FIRST_SUBMIT)),
        ("start -> all journalled", _against(r.all_journalled_seconds, TARGET_ALL_JOURNALLED)),
        ("start -> all delivered", "n/a" if r.all_delivered_seconds is None else f"{r.all_delivered_seconds:.1f} s"),
        ("files per second, overall", f"{r.files_per_second:.1f}  ({r.until} per second since start)"),
        ("daemon CPU, whole life", f"{r.daemon_cpu_seconds:.1f} s" + ("" if whole_life is None else
         f", {whole_life * 1000:.1f} ms per file{_cpu_target(whole_life)}")),
        ("daemon CPU until all journalled", "n/a" if r.daemon_cpu_seconds_to_journalled is None
         else f"{r.daemon_cpu_seconds_to_journalled:.2f} s"),
        ("delivering, after all journalled", "n/a" if r.window_seconds is None else
         f"{r.window_finished} files in {r.window_seconds:.1f} s, {r.window_files_per_second:.1f} per second "
         f"({r.window_in_progress_at_end} more under way at its end)"),
        ("  daemon CPU per file", "n/a" if window is None else
         f"{window * 1000:.1f} ms" + (f"  ({_cpu_target(window)[2:]})" if whole_life is None else "")),
        ("  per file taken up (lower bound)", "n/a" if r.window_cpu_seconds_per_file_taken is None else
         f"{r.window_cpu_seconds_per_file_taken * 1000:.1f} ms"),
        ("daemon peak RSS", f"{r.daemon_peak_rss_mib:.1f} MiB"),
        ("done / failed", f"{r.done} / {r.failed}"),
        ("submits accepted, polls per job", f"{r.submits_accepted}, "
         + ("n/a" if r.polls_per_job is None else f"{r.polls_per_job:.2f}")),
        ("daemon stop", "killed (no exit within the stop timeout)" if r.daemon_exit_code is None
         else f"exit {r.daemon_exit_code}"),
    ]
    return "\n".join(f"  {name:<36}{value}".rstrip() for name, value in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="scans in the inbox at start (default %(default)s)")
    parser.add_argument("--until", choices=("delivered", "journalled"), default="journalled",
                        help="end point (default %(default)s, then --window seconds of delivery)")
    parser.add_argument("--window", type=float, default=60.0,
                        help="seconds of delivery measured after all were journalled (default %(default)s)")
    parser.add_argument("--latency", type=float, default=0.05, help="emulated seconds per job (default %(default)s)")
    parser.add_argument("--max-in-flight", type=int, default=8, help="api.max_in_flight (default %(default)s)")
    parser.add_argument("--poll-interval", type=float, default=0.25, help="api.poll_interval (default %(default)s)")
    parser.add_argument("--settle", type=float, default=0.2, help="watch.settle_seconds (default %(default)s)")
    parser.add_argument("--rescan", type=float, default=60.0,
                        help="watch.rescan_seconds (default %(default)s, the daemon's own default)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds to wait for the end point (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the folders and the daemon's log afterwards")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.files < 1 or args.max_in_flight < 1:
        parser.error("--files and --max-in-flight must be at least 1")
    if args.latency <= 0 or args.poll_interval < 0.05 or args.timeout <= 0 or args.window <= 0:
        parser.error("--latency, --window and --timeout must be positive and --poll-interval at least 0.05")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
        error = None if result.reached else f"{args.until} not reached within --timeout {args.timeout:g} s"
    except BenchmarkError as exc:
        result, error = None, f"the run could not complete: {exc}"
    settings = {"files": args.files, "until": args.until, "latency": args.latency,
                "max_in_flight": args.max_in_flight, "provider_slots": 8,
                "poll_interval": args.poll_interval, "settle_seconds": args.settle,
                "rescan_seconds": args.rescan, "window_seconds": args.window,
                "scan_size": f"{SCAN_SIZE[0]}x{SCAN_SIZE[1]}",
                "target_first_submit_seconds": TARGET_FIRST_SUBMIT,
                "target_all_journalled_seconds": TARGET_ALL_JOURNALLED,
                "target_cpu_seconds_per_file": TARGET_CPU_PER_FILE}
    return report(args.json, settings, None if result is None else asdict(result),
                  None if result is None else render(result), error)


if __name__ == "__main__":
    sys.exit(main())
