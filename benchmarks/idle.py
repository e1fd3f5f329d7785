"""Idle: what the daemon costs a station while nothing happens.

A real daemon process (built-in host, the default watch settings) watches an empty inbox, against
the gateway emulator running in this process; everything stays on 127.0.0.1. After a warm-up that
leaves start-up work out, the daemon is left alone for `--seconds` and watched from outside only:

- CPU % of one core: the run time of every thread (/proc/PID/task/*/schedstat, in nanoseconds);
- wake-ups per second: voluntary + involuntary context switches of every thread (/proc/PID/task/*/status);
- bytes written and write calls (/proc/PID/io: write_bytes reach the disk, wchar/syscw every write);
- fsync-type calls (fsync, fdatasync, sync_file_range): counted by `perf stat` on syscall
  tracepoints, which does not disturb the daemon; without perf, by `strace -f -c` in a window of its
  own after the main one (ptrace stops the daemon at every system call, so it would spoil the
  wake-up count); without either, not counted (write_bytes and syscw still say whether it writes).

Python 3.11 leaves every thread named after the process, so the daemon is started through a short
launcher that copies each Python thread's name into its kernel name (prctl), and nothing else: the
per-thread breakdown then says which thread wakes. Set TMPDIR to measure on another disk (an SD card).
With `--systemd` the benchmark plays systemd's side as the unit sets it up (a notification socket,
WatchdogSec=60), so the watchdog pings and status updates are counted in.
It prints figures; it is not a test. Exit 1 only if a run could not complete.

    .venv/bin/python benchmarks/idle.py [--seconds 60] [--systemd] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

BENCHMARKS = Path(__file__).resolve().parent
PROJECT_ROOT = BENCHMARKS.parent
for entry in (str(PROJECT_ROOT), str(BENCHMARKS)):  # run as a script from a checkout
    if entry not in sys.path:
        sys.path.insert(0, entry)

from daemon.emulator import GatewayEmulator  # noqa: E402
from throughput import (LOOPBACK, BenchmarkError, free_port, log_tail, loopback_only_env,  # noqa: E402
                        station_folders, stop_daemon, wait_for_ready)

TARGET_CPU_PERCENT = 0.05
TARGET_WAKEUPS_PER_SECOND = 2.0
TARGET_SYNCS = 0
SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range")
UNIT_WATCHDOG_USEC = 60_000_000
"""WatchdogSec=60, as systemd/codeformer-daemon.service sets it: a ping every 30 s."""

LAUNCHER = """
import ctypes, runpy, threading
libc = ctypes.CDLL(None, use_errno=True)
def kernel_name(name):
    libc.prctl(15, name.encode("utf-8", "replace")[:15], 0, 0, 0)  # PR_SET_NAME, for the calling thread
original = getattr(threading.Thread, "_set_native_id", None)
if original is not None:
    def named(self):
        original(self)
        kernel_name(type(self).__name__ if self.name.startswith("Thread-") else self.name)
    threading.Thread._set_native_id = named
kernel_name("main-loop")
runpy.run_module("daemon.cli", run_name="__main__", alter_sys=True)
"""
"""Names each thread in the kernel (watchdog's unnamed ones after their class), then runs the CLI."""


@dataclass
class ThreadFigures:
    name: str
    tid: int
    wakeups: int
    voluntary: int
    involuntary: int
    cpu_ms: float
    note: str = ""


@dataclass
class IdleResult:
    seconds: float
    cpu_percent: float
    wakeups_per_second: float
    write_bytes: int
    wchar: int
    syscw: int
    syncs: dict[str, int] | None
    sync_method: str
    sync_window_seconds: float
    log_lines: int
    notify_messages: dict[str, int] | None
    stop_seconds: float
    exit_code: int | None
    threads: list[ThreadFigures] = field(default_factory=list)

    @property
    def sync_total(self) -> int | None:
        return None if self.syncs is None else sum(self.syncs.values())


# --------------------------------------------------------------------------- setting up


def write_config(root: Path, emulator: GatewayEmulator) -> Path:
    """A station's configuration: the built-in host, the watch section's defaults, info logging."""
    config = {
        **station_folders(root),
        "api": {"base_url": emulator.base_url, "status_url": emulator.status_url},
        "hosting": {"adapter": "builtin", "builtin": {"listen": f"{LOOPBACK}:{free_port()}"}},
        "logging": {"format": "json", "level": "info"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def start_daemon(config_path: Path, log_path: Path, api_key: str,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, "run", "--config", str(config_path)],
            cwd=PROJECT_ROOT, env={**loopback_only_env(api_key), **(extra_env or {})},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
        )


class NotifyListener:
    """systemd's end of sd_notify for `--systemd`: a datagram socket whose messages are counted by key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: dict[str, int] = {}
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._thread = threading.Thread(target=self._listen, name="notify-listener", daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(UNIT_WATCHDOG_USEC)}

    def _listen(self) -> None:
        while True:
            try:
                message = self._socket.recv(4096).decode("utf-8", "replace")
            except OSError:
                return
            for line in message.splitlines():
                key = line.partition("=")[0]
                self.counts[key] = self.counts.get(key, 0) + 1

    def close(self) -> None:
        self._socket.close()


# --------------------------------------------------------------------------- reading /proc


def read_threads(pid: int) -> dict[int, tuple[str, int, int, int]]:
    """tid -> (name, voluntary, involuntary context switches, run time in ns) for every live thread."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
            run_ns = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended while we looked
        threads[int(task.name)] = (name, int(status["voluntary_ctxt_switches"]),
                                   int(status["nonvoluntary_ctxt_switches"]), run_ns)
    return threads


def read_io(pid: int) -> dict[str, int]:
    """/proc/PID/io: the whole process, threads that ended included."""
    return {key: int(value) for key, _, value in
            (line.partition(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())}


def thread_figures(before: dict, after: dict) -> list[ThreadFigures]:
    figures = []
    for tid in sorted(before.keys() | after.keys()):
        name, vol0, invol0, ns0 = before.get(tid, (None, 0, 0, 0))
        later = after.get(tid)
        if later is None:  # ended in the window: what it did after the first look is not known
            figures.append(ThreadFigures(name, tid, 0, 0, 0, 0.0, "ended during the window"))
            continue
        name, vol1, invol1, ns1 = later
        vol, invol = vol1 - vol0, invol1 - invol0
        figures.append(ThreadFigures(name, tid, vol + invol, vol, invol, round((ns1 - ns0) / 1e6, 2),
                                     "" if tid in before else "started during the window"))
    return sorted(figures, key=lambda t: (-t.wakeups, t.tid))


# --------------------------------------------------------------------------- counting fsyncs


class PerfCounter:
    """`perf stat` on the sync calls' syscall tracepoints, for one window, beside the daemon."""

    def __init__(self, pid: int, seconds: float, output: Path, calls: tuple[str, ...]) -> None:
        self.output, self.calls = output, calls
        events = ",".join(f"syscalls:sys_enter_{call}" for call in calls)
        self.proc = subprocess.Popen(["perf", "stat", "-x", ",", "-o", str(output), "-e", events, "-p", str(pid),
                                      "--", "sleep", f"{seconds:g}"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def result(self) -> dict[str, int] | None:
        try:
            _, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        if self.proc.returncode != 0 or not self.output.exists():
            return None
        counts = {}
        for line in self.output.read_text().splitlines():
            fields = line.split(",")
            if len(fields) < 3 or not fields[2].startswith("syscalls:sys_enter_"):
                continue
            # "<not counted>": no thread of the daemon ran in the window, so it made no call either
            if fields[0].isdigit() or fields[0] == "<not counted>":
                counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0]) if fields[0].isdigit() else 0
        return counts if set(counts) == set(self.calls) else None


def perf_calls(pid: int, scratch: Path) -> tuple[str, ...] | None:
    """The sync calls perf can count on this kernel for `pid` (a tenth of a second to find out), or None."""
    if shutil.which("perf") is None:
        return None
    for calls in (SYNC_CALLS, SYNC_CALLS[:2]):
        if PerfCounter(pid, 0.1, scratch / "perf-probe.txt", calls).result() is not None:
            return calls
    return None


def strace_syncs(pid: int, seconds: float, output: Path) -> dict[str, int] | None:
    """`strace -f -c` on the sync calls for `seconds`; None if strace could not attach."""
    if shutil.which("strace") is None:
        return None
    proc = subprocess.Popen(["strace", "-f", "-c", "-o", str(output), "-e", "trace=" + ",".join(SYNC_CALLS),
                             "-p", str(pid)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)  # detaches and writes the summary
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    if not output.exists():
        return None
    counts = dict.fromkeys(SYNC_CALLS, 0)
    for line in output.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in counts and len(fields) >= 5:
            counts[fields[-1]] = int(fields[3])  # % time, seconds, usecs/call, calls, [errors,] syscall
    return counts


# --------------------------------------------------------------------------- one run


def run_once(args: argparse.Namespace) -> IdleResult:
    """Start a daemon, let it settle, watch it idle for `args.seconds`, stop it; everything removed after."""
    root = Path(tempfile.mkdtemp(prefix="codeformer-idle-"))
    emulator = GatewayEmulator(f"{LOOPBACK}:0")
    daemon: subprocess.Popen | None = None
    systemd = NotifyListener(root / "notify.sock") if args.systemd else None
    try:
        emulator.start()
        config_path = write_config(root, emulator)
        log_path = root / "daemon.log"
        daemon = start_daemon(config_path, log_path, emulator.api_key, systemd.env() if systemd else None)
        wait_for_ready(daemon, log_path)
        pid = daemon.pid
        calls = perf_calls(pid, root)
        time.sleep(args.warmup)  # the start-up rescan, recovery and first heartbeat are not idling

        lines_before = len(log_path.read_bytes().splitlines())
        notified_before = dict(systemd.counts) if systemd else {}
        perf = PerfCounter(pid, args.seconds, root / "perf.txt", calls) if calls else None
        threads_before, io_before, t0 = read_threads(pid), read_io(pid), time.monotonic()
        time.sleep(args.seconds)
        threads_after, io_after, elapsed = read_threads(pid), read_io(pid), time.monotonic() - t0
        if daemon.poll() is not None:
            raise BenchmarkError(f"the daemon exited with {daemon.returncode} while idle:\n" + log_tail(log_path))
        log_lines = len(log_path.read_bytes().splitlines()) - lines_before
        notified = ({key: n - notified_before.get(key, 0) for key, n in systemd.counts.items()
                     if n > notified_before.get(key, 0)} if systemd else None)

        syncs, method, sync_window = (perf.result() if perf else None), "perf stat (same window)", elapsed
        if syncs is None:
            sync_window = min(args.seconds, 30.0)
            syncs, method = strace_syncs(pid, sync_window, root / "strace.txt"), "strace -f -c (a window after)"
        if syncs is None:
            method, sync_window = "not counted (neither perf nor strace could attach)", 0.0

        exit_code, stop_seconds = stop_daemon(daemon)
        threads = thread_figures(threads_before, threads_after)
        cpu_ns = sum(t.cpu_ms for t in threads) * 1e6
        return IdleResult(
            seconds=round(elapsed, 2), cpu_percent=round(100 * cpu_ns / 1e9 / elapsed, 4),
            wakeups_per_second=round(sum(t.wakeups for t in threads) / elapsed, 2),
            write_bytes=io_after["write_bytes"] - io_before["write_bytes"],
            wchar=io_after["wchar"] - io_before["wchar"], syscw=io_after["syscw"] - io_before["syscw"],
            syncs=syncs, sync_method=method, sync_window_seconds=round(sync_window, 1), log_lines=log_lines,
            notify_messages=notified,
            stop_seconds=round(stop_seconds, 3), exit_code=exit_code, threads=threads,
        )
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        emulator.stop()
        if systemd is not None:
            systemd.close()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- reporting


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render(result: IdleResult) -> str:
    per_minute = 60 / result.seconds
    if result.syncs is None:
        syncs = f"not counted: {result.sync_method}"
    else:
        detail = ", ".join(f"{name} {count}" for name, count in result.syncs.items())
        syncs = (f"{result.sync_total} in {result.sync_window_seconds:g} s ({detail}; {result.sync_method})"
                 f"  (target {TARGET_SYNCS}: {_verdict(result.sync_total <= TARGET_SYNCS)})")
    stopped = ("did NOT exit within the stop timeout (killed)" if result.exit_code is None
               else f"exit {result.exit_code} after SIGTERM in {result.stop_seconds:.2f} s")
    rows = [
        ("idle window", f"{result.seconds:g} s, empty inbox"),
        ("CPU, % of one core", f"{result.cpu_percent:.3f} %  (target < {TARGET_CPU_PERCENT}: "
                               f"{_verdict(result.cpu_percent < TARGET_CPU_PERCENT)})"),
        ("wake-ups per second", f"{result.wakeups_per_second:.2f}  (target <= {TARGET_WAKEUPS_PER_SECOND:g}: "
                                f"{_verdict(result.wakeups_per_second <= TARGET_WAKEUPS_PER_SECOND)})"),
        ("synced writes", syncs),
        ("bytes written to disk (write_bytes)",
         f"{result.write_bytes} ({result.write_bytes * per_minute * 1440 / 1e6:.1f} MB a day)"),
        ("bytes through write calls (wchar)", f"{result.wchar} in {result.syscw} write calls"),
        ("log lines written", str(result.log_lines)),
        ("sd_notify lines (--systemd)", "not under systemd" if result.notify_messages is None else
         ", ".join(f"{key} x{n}" for key, n in sorted(result.notify_messages.items())) or "none"),
        ("daemon stop", stopped),
        ("wake-ups by thread (per second, voluntary/involuntary, CPU):", ""),
    ]
    for t in result.threads:
        rate = t.wakeups / result.seconds
        figures = f"{rate:6.2f}/s  ({t.voluntary}/{t.involuntary}, {t.cpu_ms:.1f} ms)"
        rows.append((f"  {t.name} [{t.tid}]", figures + (f"  {t.note}" if t.note else "")))
    return "\n".join(f"  {name:<40}{value}".rstrip() for name, value in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the idle window (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds after daemon.ready before measuring (default %(default)s)")
    parser.add_argument("--systemd", action="store_true",
                        help="run as the unit does: a notification socket and WatchdogSec=60")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.warmup < 0:
        parser.error("--seconds must be at least 1 and --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_once(args)
    except BenchmarkError as exc:
        print(f"FAILED: the run could not complete: {exc}", file=sys.stderr)
        return 1
    if args.json:
        targets = {"cpu_percent": TARGET_CPU_PERCENT, "wakeups_per_second": TARGET_WAKEUPS_PER_SECOND,
                   "syncs": TARGET_SYNCS}
        print(json.dumps({**asdict(result), "sync_total": result.sync_total, "targets": targets}, indent=2))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
