"""Throughput: how close the daemon comes to keeping every provider slot busy.

A real daemon process (so its CPU and memory are its own) watches an inbox, against the gateway
emulator running in this process; everything stays on 127.0.0.1. A burst of scans is renamed into the
inbox at once, and the wall time from the first drop to the last output is compared with the ideal,
ceil(files / slots) x latency, where slots is the smaller of api.max_in_flight and the provider's 8.
It prints figures; it is not a test. Exit 1 only if a run could not complete.

The emulator renders each output within its latency, but it shares this machine's CPU with the
daemon, so under load the provider's own time can still exceed `latency`. "Provider time over
latency" and "slot utilisation" tell that part apart from the time the daemon leaves a slot idle.

    .venv/bin/python benchmarks/throughput.py [--files 64] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script from a checkout, not only when installed
    sys.path.insert(0, str(PROJECT_ROOT))

from daemon.demo import make_photo  # noqa: E402
from daemon.emulator import GatewayEmulator  # noqa: E402

PROVIDER_SLOTS = 8
"""Jobs the emulated provider processes at once; the rest wait QUEUED on its side."""
TARGET_RATIO = 0.90
SCAN_SIZE = (640, 480)
READY_TIMEOUT = 30.0
COMPLETION_TIMEOUT = 120.0
STOP_TIMEOUT = 25.0
OUTBOX_POLL = 0.02
LOOPBACK = "127.0.0.1"


class BenchmarkError(Exception):
    """A run could not complete; the message says where it stopped."""


@dataclass
class RunResult:
    files: int
    wall_seconds: float
    ideal_seconds: float
    ratio: float
    polls_per_job: float
    submits_accepted: int
    daemon_cpu_seconds_per_file: float
    daemon_peak_rss_mib: float
    daemon_exit_code: int | None
    daemon_stop_seconds: float
    drop_seconds: float
    breakdown: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.ratio >= TARGET_RATIO


# --------------------------------------------------------------------------- setting up


def free_port() -> int:
    """A port nothing listens on now; the daemon binds it a moment later (a race we accept)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def write_config(root: Path, emulator: GatewayEmulator, args: argparse.Namespace) -> Path:
    folders = {name: root / name for name in ("inbox", "outbox", "archive", "failed", "state")}
    for folder in folders.values():
        folder.mkdir()
    config = {
        "folders": {name: str(folders[name]) for name in ("inbox", "outbox", "archive", "failed")},
        "state_dir": str(folders["state"]),
        "api": {"base_url": emulator.base_url, "status_url": emulator.status_url,
                "max_in_flight": args.max_in_flight, "poll_interval": args.poll_interval,
                "job_timeout": 120},
        "hosting": {"adapter": "builtin", "builtin": {"listen": f"{LOOPBACK}:{free_port()}"}},
        "watch": {"settle_seconds": 0.2, "rescan_seconds": 30},
        "logging": {"format": "json", "level": "info"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def loopback_only_env(api_key: str) -> dict[str, str]:
    """The child's environment without proxies, so no request can leave the machine."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = f"{LOOPBACK},localhost"
    env["CODEFORMER_API_KEY"] = api_key
    return env


def start_daemon(config_path: Path, log_path: Path, api_key: str) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(config_path)],
            cwd=PROJECT_ROOT, env=loopback_only_env(api_key),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
        )


def read_log(log_path: Path) -> list[dict[str, Any]]:
    """The daemon's JSON log lines; anything else (a traceback) is skipped."""
    events = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def log_tail(log_path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_ready(daemon: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if any(e.get("event") == "daemon.ready" for e in read_log(log_path)):
            return
        if daemon.poll() is not None:
            raise BenchmarkError(f"the daemon exited with {daemon.returncode} before it was ready:\n"
                                 + log_tail(log_path))
        time.sleep(0.05)
    raise BenchmarkError(f"the daemon was not ready after {READY_TIMEOUT:g} s:\n" + log_tail(log_path))


def make_scans(folder: Path, count: int) -> list[Path]:
    """Photo-like JPEGs outside the inbox but on its file system, so a drop is a plain rename."""
    width, height = SCAN_SIZE
    return [make_photo(folder / f"scan-{i:03d}.jpg", width, height, seed=i, format="JPEG")
            for i in range(count)]


# --------------------------------------------------------------------------- measuring


def drop_all(scans: list[Path], inbox: Path) -> tuple[float, float, float]:
    """Rename every scan into the inbox in a tight loop; (t0 monotonic, t0 wall, seconds taken)."""
    t0, t0_wall = time.monotonic(), time.time()
    for scan in scans:
        os.rename(scan, inbox / scan.name)
    return t0, t0_wall, time.monotonic() - t0


def count_outputs(outbox: Path) -> int:
    """Finished outputs (any format; sidecars left out); hidden names are the daemon's temporaries."""
    with os.scandir(outbox) as entries:
        return sum(1 for e in entries if e.is_file() and not e.name.startswith(".") and not e.name.endswith(".json"))


def wait_for_outputs(daemon: subprocess.Popen, folders: dict[str, Path], count: int, log_path: Path) -> float:
    """Poll the outbox until `count` PNGs are there; the monotonic time the last one was seen."""
    deadline = time.monotonic() + COMPLETION_TIMEOUT
    while True:
        now = time.monotonic()
        done = count_outputs(folders["outbox"])
        if done >= count:
            return now
        if now >= deadline:
            raise BenchmarkError(f"only {done} of {count} outputs after {COMPLETION_TIMEOUT:g} s:\n"
                                 + log_tail(log_path))
        if daemon.poll() is not None:
            raise BenchmarkError(f"the daemon exited with {daemon.returncode} after {done} of {count} outputs:\n"
                                 + log_tail(log_path))
        failures = sorted(folders["failed"].glob("*.error.json"))
        if failures:
            raise BenchmarkError(f"{len(failures)} file(s) failed, e.g. {failures[0].name}: "
                                 + failures[0].read_text(encoding="utf-8")[:500])
        time.sleep(OUTBOX_POLL)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time from /proc/PID/stat (fields 14 and 15; the name may hold spaces)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise BenchmarkError("no VmHWM in /proc status")


def stop_daemon(daemon: subprocess.Popen) -> tuple[int | None, float]:
    """SIGTERM, then wait; (exit code or None if it did not exit in time, seconds taken)."""
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    try:
        code = daemon.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
        code = None
    return code, time.monotonic() - started


# --------------------------------------------------------------------------- where the time went


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def breakdown(events: list[dict[str, Any]], provider_jobs: list[dict[str, Any]], t0_wall: float,
              t1_wall: float, slots: int, latency: float) -> dict[str, Any]:
    """Split the wall time into its parts from the daemon's log and the emulator's job records.

    Both clocks are this machine's wall clock. The refill gap pairs the k-th completion with the
    (slots + k)-th submit: the submit that completion's freed slot should have let through at once.
    """
    def times(name: str) -> list[float]:
        return sorted(_epoch(e["timestamp"]) for e in events if e.get("event") == name)

    detected, submitted, completed = times("file.detected"), times("job.submitted"), times("job.completed")
    finished = {j["request_id"]: j["finished_at"] for j in provider_jobs if j["finished_at"]}
    poll_lag = [_epoch(e["timestamp"]) - finished[e["request_id"]] for e in events
                if e.get("event") == "job.completed" and e.get("request_id") in finished]
    over_latency = [j["finished_at"] - j["started_at"] - latency for j in provider_jobs
                    if j["finished_at"] and j["started_at"]]
    provider_queue = [j["started_at"] - j["submitted_at"] for j in provider_jobs if j["started_at"]]
    refill = [submitted[slots + k] - done for k, done in enumerate(completed) if slots + k < len(submitted)]
    busy = sum(j["finished_at"] - j["started_at"] for j in provider_jobs if j["finished_at"] and j["started_at"])
    return {
        "settle_wait": _spread([e["settle_wait"] for e in events if e.get("event") == "file.detected"]),
        "first_detected_after_drop": round(detected[0] - t0_wall, 3) if detected else None,
        "last_detected_after_drop": round(detected[-1] - t0_wall, 3) if detected else None,
        "first_submit_after_drop": round(submitted[0] - t0_wall, 3) if submitted else None,
        "provider_queue_wait": _spread(provider_queue),
        "provider_time_over_latency": _spread(over_latency),
        "poll_lag": _spread(poll_lag),
        "slot_refill_gap": _spread(refill),
        "last_provider_finish_to_last_output": round(t1_wall - max(finished.values()), 3) if finished else None,
        "provider_slot_utilisation": round(busy / (slots * (t1_wall - t0_wall)), 3),
    }


# --------------------------------------------------------------------------- one run


def run_once(args: argparse.Namespace) -> RunResult:
    """One measurement with its own emulator, daemon and folders, all removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="codeformer-throughput-"))
    emulator = GatewayEmulator(f"{LOOPBACK}:0", latency=args.latency, max_concurrent=PROVIDER_SLOTS)
    daemon: subprocess.Popen | None = None
    try:
        emulator.start()
        config_path = write_config(root, emulator, args)
        folders = {name: root / name for name in ("inbox", "outbox", "failed")}
        log_path = root / "daemon.log"
        scans = make_scans(root / "to-drop", args.files)
        daemon = start_daemon(config_path, log_path, emulator.api_key)
        wait_for_ready(daemon, log_path)

        t0, t0_wall, drop_seconds = drop_all(scans, folders["inbox"])
        t1 = wait_for_outputs(daemon, folders, args.files, log_path)
        wall = t1 - t0
        cpu, rss = cpu_seconds(daemon.pid), peak_rss_mib(daemon.pid)
        exit_code, stop_seconds = stop_daemon(daemon)

        stats = emulator.stats()
        slots = min(args.max_in_flight, PROVIDER_SLOTS)
        ideal = math.ceil(args.files / slots) * args.latency
        return RunResult(
            files=args.files, wall_seconds=round(wall, 3), ideal_seconds=round(ideal, 3),
            ratio=round(ideal / wall, 3), polls_per_job=round(stats["polls"] / args.files, 2),
            submits_accepted=stats["submits_accepted"],
            daemon_cpu_seconds_per_file=round(cpu / args.files, 4), daemon_peak_rss_mib=round(rss, 1),
            daemon_exit_code=exit_code, daemon_stop_seconds=round(stop_seconds, 3),
            drop_seconds=round(drop_seconds, 4),
            breakdown=breakdown(read_log(log_path), stats["jobs"], t0_wall, t0_wall + wall, slots, args.latency),
        )
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        emulator.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- reporting


def _spread_text(spread: dict[str, float] | None) -> str:
    return "n/a" if spread is None else f"median {spread['median']:.3f} s, max {spread['max']:.3f} s"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def render(result: RunResult, label: str) -> str:
    b = result.breakdown
    verdict = "PASS" if result.passed else "FAIL"
    if result.daemon_exit_code is None:
        stopped = f"did NOT exit within {STOP_TIMEOUT:g} s of SIGTERM (killed)"
    else:
        stopped = f"exit {result.daemon_exit_code} after SIGTERM in {result.daemon_stop_seconds:.2f} s"
        if result.daemon_exit_code != 0:
            stopped += "  <-- expected exit 0"
    rows = [
        ("files", str(result.files)),
        ("wall, first drop -> last output", f"{result.wall_seconds:.3f} s"),
        ("ideal, ceil(files/slots) x latency", f"{result.ideal_seconds:.3f} s"),
        ("ratio, ideal / wall", f"{result.ratio:.3f}  (target >= {TARGET_RATIO:.2f}: {verdict})"),
        ("polls per job", f"{result.polls_per_job:.2f}"),
        ("submits accepted", str(result.submits_accepted)),
        ("daemon CPU per file", f"{result.daemon_cpu_seconds_per_file * 1000:.1f} ms"),
        ("daemon peak RSS", f"{result.daemon_peak_rss_mib:.1f} MiB"),
        ("daemon stop", stopped),
        ("where the time went:", ""),
        ("  all renames (the drop)", f"{result.drop_seconds * 1000:.1f} ms"),
        ("  settle wait per file", _spread_text(b["settle_wait"])),
        ("  first file detected", _seconds(b["first_detected_after_drop"]) + " after the drop"),
        ("  last file detected", _seconds(b["last_detected_after_drop"]) + " after the drop"),
        ("  first submit", _seconds(b["first_submit_after_drop"]) + " after the drop"),
        ("  provider queue wait", _spread_text(b["provider_queue_wait"])),
        ("  provider time over latency", _spread_text(b["provider_time_over_latency"])),
        ("  poll lag, finished -> noticed", _spread_text(b["poll_lag"])),
        ("  slot refill gap", _spread_text(b["slot_refill_gap"])),
        ("  last finish -> last output", _seconds(b["last_provider_finish_to_last_output"])),
        ("  provider slot utilisation", f"{b['provider_slot_utilisation']:.0%}"),
    ]
    return "\n".join([label] + [f"  {name:<36}{value}".rstrip() for name, value in rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=64, help="scans dropped at once (default %(default)s)")
    parser.add_argument("--latency", type=float, default=1.0, help="emulated seconds per job (default %(default)s)")
    parser.add_argument("--max-in-flight", type=int, default=8, help="api.max_in_flight (default %(default)s)")
    parser.add_argument("--poll-interval", type=float, default=0.25, help="api.poll_interval (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each with a fresh daemon (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    for name in ("files", "max_in_flight", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.latency <= 0 or args.poll_interval < 0.05:
        parser.error("--latency must be positive and --poll-interval at least 0.05")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: list[RunResult] = []
    error: str | None = None
    for n in range(1, args.repeat + 1):
        try:
            results.append(run_once(args))
        except BenchmarkError as exc:
            error = f"run {n} of {args.repeat} could not complete: {exc}"
            break
        if not args.json:
            print(render(results[-1], f"run {n} of {args.repeat}"), flush=True)
    median_ratio = round(statistics.median(r.ratio for r in results), 3) if results else None
    if args.json:
        print(json.dumps({
            "settings": {"files": args.files, "latency": args.latency, "max_in_flight": args.max_in_flight,
                         "poll_interval": args.poll_interval, "provider_slots": PROVIDER_SLOTS,
                         "target_ratio": TARGET_RATIO},
            "runs": [{**asdict(r), "passed": r.passed} for r in results],
            "median_ratio": median_ratio,
            "passed": median_ratio is not None and median_ratio >= TARGET_RATIO,
            "error": error,
        }, indent=2))
    else:
        if error:
            print(f"FAILED: {error}", file=sys.stderr)
        if len(results) > 1:
            verdict = "PASS" if median_ratio >= TARGET_RATIO else "FAIL"
            print(f"median ratio over {len(results)} runs: {median_ratio:.3f} "
                  f"(target >= {TARGET_RATIO:.2f}: {verdict})")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
