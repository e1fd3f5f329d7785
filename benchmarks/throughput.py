"""Throughput: how close the daemon comes to keeping every provider slot busy, and its CPU per file.

A real daemon process (so its CPU and memory are its own) watches an inbox, against the gateway
emulator running in this process; everything stays on 127.0.0.1. A burst of scans is renamed into the
inbox at once, and the wall time from the first drop to the last output is compared with the ideal,
ceil(files / slots) x latency, where slots is the smaller of api.max_in_flight and the provider's 8.
It prints figures; it is not a test. Exit 1 only if a run could not complete.

The emulator renders each output within its latency, but it shares this machine's CPU with the
daemon, so under load the provider's own time can still exceed `latency`. "Provider time over
latency" and "slot utilisation" tell that part apart from the time the daemon leaves a slot idle.

The daemon's CPU is read from /proc/PID/stat at the first drop and again when the last output is
there, so start-up is left out (the archiving of the last few originals may fall after). Before the
daemon starts, this process runs the daemon's own output pipeline (`daemon.output.pipeline.rendered`,
default `OutputConfig`) on one scan and the emulator's result for it a few times: its CPU per file is
the image work, shown next to the daemon's CPU per file, and the rest is the daemon's own work
(journal, HTTP, watching, logging). Webhooks are on (the built-in host's default), so a job should be
polled about once.

    .venv/bin/python benchmarks/throughput.py [--files 64] [--size 320x240] [--repeat 3] [--json]
    .venv/bin/python benchmarks/throughput.py --compare-sizes    # 320x240 and 640x480, side by side
    .venv/bin/python benchmarks/throughput.py --postgresql "host=127.0.0.1 port=5432 user=codeformer dbname=postgres"

With --postgresql, the daemon keeps its journal in PostgreSQL (the fleet mode, one station) instead of
SQLite: each run creates a database of its own through the DSN given (whose user may create databases;
no password in it: PGPASSFILE), and drops it afterwards. The database server's CPU is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
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
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script from a checkout, not only when installed
    sys.path.insert(0, str(PROJECT_ROOT))

from daemon.config import OutputConfig, PreflightConfig, RestoreConfig  # noqa: E402
from daemon.demo import make_photo  # noqa: E402
from daemon.emulator import GatewayEmulator, render_output  # noqa: E402
from daemon.output.pipeline import Origin, pixel_cap, rendered  # noqa: E402

PROVIDER_SLOTS = 8
"""Jobs the emulated provider processes at once; the rest wait QUEUED on its side."""
TARGET_RATIO = 0.95
TARGET_POLLS_PER_JOB = 1.5
"""With webhooks on, a job is polled when its webhook arrives, plus a safety poll at most."""
TARGET_CPU_PER_FILE = 0.010
"""Daemon CPU seconds per file from the first drop, for SCAN_SIZE scans (the README's benchmark table)."""
SCAN_SIZE = (320, 240)
COMPARE_SIZES = ((320, 240), (640, 480))
IMAGE_WORK_RUNS = 5
"""Timed runs of the output pipeline per size (after one untimed run that loads Pillow's plugins)."""
READY_TIMEOUT = 30.0
COMPLETION_TIMEOUT = 120.0
STOP_TIMEOUT = 25.0
OUTBOX_POLL = 0.02
LOOPBACK = "127.0.0.1"


class BenchmarkError(Exception):
    """A run could not complete; the message says where it stopped."""


@dataclass
class RunResult:
    size: str
    files: int
    wall_seconds: float
    ideal_seconds: float
    ratio: float
    polls_per_job: float
    submits_accepted: int
    daemon_cpu_seconds_per_file: float
    """From the first drop to the last output."""
    daemon_startup_cpu_seconds: float
    """The daemon's CPU before the drop (interpreter, imports, start-up), left out of the per-file figure."""
    image_work_cpu_seconds_per_file: float
    """The output pipeline's CPU for one such scan, measured in this process (see `measure_image_work`)."""
    daemon_other_cpu_seconds_per_file: float
    """The daemon's CPU per file less the image work: journal, HTTP, watching, logging."""
    daemon_peak_rss_mib: float
    daemon_exit_code: int | None
    daemon_stop_seconds: float
    journal: str
    """Where the daemon said it keeps its journal (a file, or a PostgreSQL DSN)."""
    drop_seconds: float
    breakdown: dict[str, Any]

    @property
    def ratio_passed(self) -> bool:
        return self.ratio >= TARGET_RATIO

    @property
    def polls_passed(self) -> bool:
        return self.polls_per_job <= TARGET_POLLS_PER_JOB

    @property
    def passed(self) -> bool:
        return self.ratio_passed and self.polls_passed


# --------------------------------------------------------------------------- setting up


def free_port() -> int:
    """A port nothing listens on now; the daemon binds it a moment later (a race we accept)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def report(as_json: bool, settings: dict[str, Any], result: dict[str, Any] | None, text: str | None,
           error: str | None) -> int:
    """Print one run's outcome (one JSON object, or its text and any error on stderr); the exit status."""
    if as_json:
        print(json.dumps({"settings": settings, "result": result, "error": error}, indent=2))
    else:
        if text is not None:
            print(text)
        if error:
            print(f"FAILED: {error}", file=sys.stderr)
    return 1 if error else 0


def station_folders(root: Path) -> dict[str, Any]:
    """The `folders` and `state_dir` sections of a benchmark station, each folder made under `root`."""
    folders = {name: root / name for name in ("inbox", "outbox", "archive", "failed", "state")}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    return {"folders": {name: str(folders[name]) for name in ("inbox", "outbox", "archive", "failed")},
            "state_dir": str(folders["state"])}


def write_config(root: Path, emulator: GatewayEmulator, args: argparse.Namespace, journal_dsn: str | None) -> Path:
    config = {
        **station_folders(root),
        "api": {"base_url": emulator.base_url, "status_url": emulator.status_url,
                "max_in_flight": args.max_in_flight, "poll_interval": args.poll_interval,
                "job_timeout": 120},
        "hosting": {"adapter": "builtin", "builtin": {"listen": f"{LOOPBACK}:{free_port()}"}},
        "watch": {"settle_seconds": 0.2, "rescan_seconds": 30},
        "logging": {"format": "json", "level": "info"},
    }
    if journal_dsn is not None:
        config["state"] = {"backend": "postgresql", "postgresql": {"dsn": journal_dsn}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@contextlib.contextmanager
def run_database(server_dsn: str | None) -> Iterator[str | None]:
    """A new, empty PostgreSQL database on the server `server_dsn` reaches, for one run; its DSN. Dropped
    afterwards. None (SQLite) without a server."""
    if server_dsn is None:
        yield None
        return
    import psycopg
    from psycopg import conninfo, sql

    name = f"codeformer_throughput_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield conninfo.make_conninfo(server_dsn, dbname=name)
    finally:  # WITH (FORCE): PostgreSQL 13 or later; a run's own failure is not hidden by this one's
        with contextlib.suppress(psycopg.Error), \
                psycopg.connect(server_dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


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


def wait_for_ready(daemon: subprocess.Popen, log_path: Path) -> dict[str, Any]:
    """The daemon's `daemon.ready` line, once it is logged."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        ready = [e for e in read_log(log_path) if e.get("event") == "daemon.ready"]
        if ready:
            return ready[0]
        if daemon.poll() is not None:
            raise BenchmarkError(f"the daemon exited with {daemon.returncode} before it was ready:\n"
                                 + log_tail(log_path))
        time.sleep(0.05)
    raise BenchmarkError(f"the daemon was not ready after {READY_TIMEOUT:g} s:\n" + log_tail(log_path))


def make_scans(folder: Path, count: int, size: tuple[int, int] = SCAN_SIZE) -> list[Path]:
    """Photo-like JPEGs outside the inbox but on its file system, so a drop is a plain rename."""
    width, height = size
    return [make_photo(folder / f"scan-{i:03d}.jpg", width, height, seed=i, format="JPEG")
            for i in range(count)]


def size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# --------------------------------------------------------------------------- image work


def measure_image_work(size: tuple[int, int], runs: int = IMAGE_WORK_RUNS) -> dict[str, Any]:
    """CPU seconds the daemon's output pipeline takes for one scan of `size`: the image work per file.

    Run here, in this process, before any daemon or emulator thread: one scan, the emulator's
    result for it (`render_output`, upscale as the restore defaults ask), and `rendered` with the
    default OutputConfig into a temporary folder, as a delivery runs it (the download and the final
    link into the outbox are I/O, not image work, and are left out). The median of `runs`.
    """
    root = Path(tempfile.mkdtemp(prefix="codeformer-imagework-"))
    try:
        scan = make_photo(root / "scan.jpg", *size, seed=1, format="JPEG")
        params = RestoreConfig().as_request()
        with Image.open(scan) as image:
            (root / "result.png").write_bytes(render_output(image, params["upscale"]))
        origin = Origin(scan=scan, scan_sha256="0" * 64, request_id="benchmark", params=params)
        cap = pixel_cap(PreflightConfig().max_pixels, params)
        samples = []
        for n in range(runs + 1):
            started = time.process_time()
            with rendered(root / "result.png", root, origin, OutputConfig(), cap) as (_output, facts):
                pass
            if n:  # the first run loads Pillow's plugins and the pipeline's modules
                samples.append(time.process_time() - started)
        return {"cpu_seconds_per_file": round(statistics.median(samples), 4),
                "cpu_seconds_min": round(min(samples), 4), "runs": runs, "output_format": facts.format,
                "result_size": size_text((size[0] * params["upscale"], size[1] * params["upscale"]))}
    finally:
        shutil.rmtree(root, ignore_errors=True)


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


def epoch(timestamp: str) -> float:
    """Seconds since the epoch of a log line's ISO timestamp."""
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
        return sorted(epoch(e["timestamp"]) for e in events if e.get("event") == name)

    detected, submitted, completed = times("file.detected"), times("job.submitted"), times("job.completed")
    finished = {j["request_id"]: j["finished_at"] for j in provider_jobs if j["finished_at"]}
    poll_lag = [epoch(e["timestamp"]) - finished[e["request_id"]] for e in events
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


def run_once(args: argparse.Namespace, size: tuple[int, int], image_work: float) -> RunResult:
    """One measurement with its own emulator, daemon and folders, all removed afterwards.

    `image_work` is the output pipeline's CPU seconds per file for this size (`measure_image_work`).
    """
    with run_database(args.postgresql) as journal_dsn:  # dropped once the daemon is gone
        root = Path(tempfile.mkdtemp(prefix="codeformer-throughput-"))
        emulator = GatewayEmulator(f"{LOOPBACK}:0", latency=args.latency, max_concurrent=PROVIDER_SLOTS)
        daemon: subprocess.Popen | None = None
        try:
            emulator.start()
            config_path = write_config(root, emulator, args, journal_dsn)
            folders = {name: root / name for name in ("inbox", "outbox", "failed")}
            log_path = root / "daemon.log"
            scans = make_scans(root / "to-drop", args.files, size)
            daemon = start_daemon(config_path, log_path, emulator.api_key)
            journal = wait_for_ready(daemon, log_path)["journal"]

            cpu_at_drop = cpu_seconds(daemon.pid)  # start-up is not the files' work
            t0, t0_wall, drop_seconds = drop_all(scans, folders["inbox"])
            t1 = wait_for_outputs(daemon, folders, args.files, log_path)
            wall = t1 - t0
            cpu, rss = cpu_seconds(daemon.pid) - cpu_at_drop, peak_rss_mib(daemon.pid)
            exit_code, stop_seconds = stop_daemon(daemon)

            stats = emulator.stats()
            slots = min(args.max_in_flight, PROVIDER_SLOTS)
            ideal = math.ceil(args.files / slots) * args.latency
            return RunResult(
                size=size_text(size), files=args.files, wall_seconds=round(wall, 3), ideal_seconds=round(ideal, 3),
                ratio=round(ideal / wall, 3), polls_per_job=round(stats["polls"] / args.files, 2),
                submits_accepted=stats["submits_accepted"],
                daemon_cpu_seconds_per_file=round(cpu / args.files, 4), daemon_startup_cpu_seconds=round(cpu_at_drop, 3),
                image_work_cpu_seconds_per_file=image_work,
                daemon_other_cpu_seconds_per_file=round(round(cpu / args.files, 4) - image_work, 4),  # the figures shown
                daemon_peak_rss_mib=round(rss, 1),
                daemon_exit_code=exit_code, daemon_stop_seconds=round(stop_seconds, 3),
                drop_seconds=round(drop_seconds, 4), journal=journal,
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


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _cpu_target(size: str, cpu: float) -> str:
    """The CPU target applies to SCAN_SIZE scans only."""
    if size != size_text(SCAN_SIZE):
        return ""
    return f"  (target <= {TARGET_CPU_PER_FILE * 1000:.0f} ms: {_verdict(cpu <= TARGET_CPU_PER_FILE)})"


def render(result: RunResult, label: str) -> str:
    b = result.breakdown
    if result.daemon_exit_code is None:
        stopped = f"did NOT exit within {STOP_TIMEOUT:g} s of SIGTERM (killed)"
    else:
        stopped = f"exit {result.daemon_exit_code} after SIGTERM in {result.daemon_stop_seconds:.2f} s"
        if result.daemon_exit_code != 0:
            stopped += "  <-- expected exit 0"
    cpu = result.daemon_cpu_seconds_per_file
    rows = [
        ("files", f"{result.files}, {result.size} JPEG"),
        ("journal", result.journal),
        ("wall, first drop -> last output", f"{result.wall_seconds:.3f} s"),
        ("ideal, ceil(files/slots) x latency", f"{result.ideal_seconds:.3f} s"),
        ("ratio, ideal / wall", f"{result.ratio:.3f}  (target >= {TARGET_RATIO:.2f}: "
                                f"{_verdict(result.ratio_passed)})"),
        ("polls per job", f"{result.polls_per_job:.2f}  (target <= {TARGET_POLLS_PER_JOB:.1f}: "
                          f"{_verdict(result.polls_passed)})"),
        ("submits accepted", str(result.submits_accepted)),
        ("daemon CPU per file, from the drop", f"{cpu * 1000:.1f} ms" + _cpu_target(result.size, cpu)),
        ("  image work (output pipeline)", f"{result.image_work_cpu_seconds_per_file * 1000:.1f} ms"),
        ("  the rest (journal, HTTP, watch)", f"{result.daemon_other_cpu_seconds_per_file * 1000:.1f} ms"),
        ("daemon CPU before the drop", f"{result.daemon_startup_cpu_seconds:.2f} s (start-up, left out)"),
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
    parser.add_argument("--size", type=parse_size, default=SCAN_SIZE, metavar="WxH",
                        help=f"scan size (default {size_text(SCAN_SIZE)})")
    parser.add_argument("--compare-sizes", action="store_true",
                        help="run at " + " and ".join(size_text(s) for s in COMPARE_SIZES)
                             + " (--repeat each) and show them side by side; --size is ignored")
    parser.add_argument("--postgresql", metavar="DSN",
                        help="keep the journal in PostgreSQL: a database per run is made on the server this "
                             "DSN reaches (default: SQLite)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    for name in ("files", "max_in_flight", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.latency <= 0 or args.poll_interval < 0.05:
        parser.error("--latency must be positive and --poll-interval at least 0.05")
    return args


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 320x240, got {text!r}") from None
    if not (16 <= width <= 10_000 and 16 <= height <= 10_000):
        raise argparse.ArgumentTypeError(f"{text}: each side must be 16 to 10000 pixels")
    return width, height


def summarise(results: list[RunResult], image_work: dict[str, Any]) -> dict[str, Any]:
    """Medians over the runs of one size."""
    def median(name: str, digits: int) -> float | None:
        return round(statistics.median(getattr(r, name) for r in results), digits) if results else None

    ratio, polls = median("ratio", 3), median("polls_per_job", 2)
    return {"image_work": image_work, "runs": len(results), "median_ratio": ratio, "median_polls_per_job": polls,
            "median_daemon_cpu_seconds_per_file": median("daemon_cpu_seconds_per_file", 4),
            "median_daemon_other_cpu_seconds_per_file": median("daemon_other_cpu_seconds_per_file", 4),
            "median_wall_seconds": median("wall_seconds", 3),
            "passed": bool(results) and ratio >= TARGET_RATIO and polls <= TARGET_POLLS_PER_JOB}


def render_summary(by_size: dict[str, dict[str, Any]]) -> str:
    """The sizes side by side (medians over their runs)."""
    sizes = list(by_size)
    rows = [
        ("runs", [str(by_size[s]["runs"]) for s in sizes]),
        ("median ratio", [f"{by_size[s]['median_ratio']:.3f}" for s in sizes]),
        ("median polls per job", [f"{by_size[s]['median_polls_per_job']:.2f}" for s in sizes]),
        ("daemon CPU per file", [f"{by_size[s]['median_daemon_cpu_seconds_per_file'] * 1000:.1f} ms" for s in sizes]),
        ("  image work", [f"{by_size[s]['image_work']['cpu_seconds_per_file'] * 1000:.1f} ms" for s in sizes]),
        ("  the rest", [f"{by_size[s]['median_daemon_other_cpu_seconds_per_file'] * 1000:.1f} ms" for s in sizes]),
    ]
    lines = [f"  {'medians':<28}" + "".join(f"{s:>14}" for s in sizes)]
    lines += [f"  {name:<28}" + "".join(f"{v:>14}" for v in values) for name, values in rows]
    lines.append(f"  targets: ratio >= {TARGET_RATIO:.2f}, polls per job <= {TARGET_POLLS_PER_JOB:.1f}, "
                 f"CPU per file <= {TARGET_CPU_PER_FILE * 1000:.0f} ms at {size_text(SCAN_SIZE)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = list(COMPARE_SIZES) if args.compare_sizes else [args.size]
    results: list[RunResult] = []
    by_size: dict[str, dict[str, Any]] = {}
    error: str | None = None
    for size in sizes:
        label = size_text(size)
        image_work = measure_image_work(size)  # before this size's daemons and emulators run
        if not args.json:
            print(f"{label}: output pipeline CPU per file (this process, median of {image_work['runs']}): "
                  f"{image_work['cpu_seconds_per_file'] * 1000:.1f} ms", flush=True)
        runs: list[RunResult] = []
        for n in range(1, args.repeat + 1):
            try:
                runs.append(run_once(args, size, image_work["cpu_seconds_per_file"]))
            except BenchmarkError as exc:
                error = f"{label} run {n} of {args.repeat} could not complete: {exc}"
                break
            if not args.json:
                print(render(runs[-1], f"{label}, run {n} of {args.repeat}"), flush=True)
        results += runs
        by_size[label] = summarise(runs, image_work)
        if error:
            break
    headline = [r for r in results if r.size == size_text(sizes[0])]  # the size the targets are for
    median_ratio = round(statistics.median(r.ratio for r in headline), 3) if headline else None
    median_polls = round(statistics.median(r.polls_per_job for r in headline), 2) if headline else None
    passed = median_ratio is not None and median_ratio >= TARGET_RATIO and median_polls <= TARGET_POLLS_PER_JOB
    if args.json:
        print(json.dumps({
            "settings": {"files": args.files, "latency": args.latency, "max_in_flight": args.max_in_flight,
                         "journal": "postgresql" if args.postgresql else "sqlite",
                         "poll_interval": args.poll_interval, "provider_slots": PROVIDER_SLOTS,
                         "sizes": [size_text(s) for s in sizes], "headline_size": size_text(sizes[0]),
                         "target_ratio": TARGET_RATIO,
                         "target_polls_per_job": TARGET_POLLS_PER_JOB,
                         "target_cpu_seconds_per_file": TARGET_CPU_PER_FILE},
            "runs": [{**asdict(r), "ratio_passed": r.ratio_passed, "polls_passed": r.polls_passed,
                      "passed": r.passed} for r in results],
            "by_size": by_size,
            "median_ratio": median_ratio,
            "median_polls_per_job": median_polls,
            "passed": passed,
            "error": error,
        }, indent=2))
    else:
        if error:
            print(f"FAILED: {error}", file=sys.stderr)
        if len(headline) > 1 and len(by_size) == 1:
            print(f"over {len(headline)} runs: median ratio {median_ratio:.3f} (target >= {TARGET_RATIO:.2f}: "
                  f"{_verdict(median_ratio >= TARGET_RATIO)}), median polls per job {median_polls:.2f} "
                  f"(target <= {TARGET_POLLS_PER_JOB:.1f}: {_verdict(median_polls <= TARGET_POLLS_PER_JOB)})")
        if len(by_size) > 1 and all(v["runs"] for v in by_size.values()):
            print(render_summary(by_size))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
