"""An idle daemon's threads sleep: the built-in host wakes for a connection or a stop, never on a
timer, and the inotify observer wakes for writes, not for someone reading the inbox.

Each wake-up of a thread is a context switch the kernel counts in /proc/self/task/<tid>/status, so a
thread asleep leaves the count where it was. The host's window is a fixed stretch of time because
what it shows is that nothing happens; the bound is far under the 10 switches the old 0.2 s polling
made in it, so a slow machine cannot make the test fail or pass by timing.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import pytest
import requests

from daemon.hosting import BuiltinHost, new_key
from daemon.observers import QueueingHandler, start_observer, stop_quietly

from .certs import self_signed
from .conftest import wait_for

READS = 20
IDLE_SECONDS = 2.0
MAX_SWITCHES_WHILE_IDLE = 3
"""Room for a stray wake-up or two (a page fault, the kernel's own housekeeping); polling made 10."""
PROMPT_STOP_SECONDS = 2.0


def context_switches(thread: threading.Thread) -> int:
    """Voluntary + involuntary context switches of `thread` so far, as the kernel counts them."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


def stop_within(host: BuiltinHost, seconds: float) -> float:
    """Stop the host from another thread; how long it took (a stop that hangs fails the test, not the run)."""
    stopper = threading.Thread(target=host.stop, name="stopper", daemon=True)
    started = time.monotonic()
    stopper.start()
    stopper.join(seconds)
    assert not stopper.is_alive(), f"stopping the built-in host took longer than {seconds} s"
    return time.monotonic() - started


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_an_idle_host_does_not_wake_and_still_serves_and_stops_at_once(tmp_path, tls):
    scan = tmp_path / "scan.jpg"
    scan.write_bytes(b"\xff\xd8scan bytes")
    settings, verify = {}, True
    if tls:
        settings["tls_cert"], settings["tls_key"] = self_signed(tmp_path, "host")
        verify = str(settings["tls_cert"])
    host = BuiltinHost("127.0.0.1:0", **settings)
    host.start()
    accepting = host._thread
    try:
        url = host.publish(new_key(".jpg"), scan, "image/jpeg")
        # One request first: the accepting thread is then surely in its loop, with its one wake-up behind it.
        assert requests.get(url, timeout=5, verify=verify).content == scan.read_bytes()
        before = context_switches(accepting)
        time.sleep(IDLE_SECONDS)
        woke = context_switches(accepting) - before
        assert woke <= MAX_SWITCHES_WHILE_IDLE, f"the idle host's thread woke {woke} times in {IDLE_SECONDS} s"

        # Asleep is not deaf: the next connection is served at once.
        assert requests.get(url, timeout=5, verify=verify).content == scan.read_bytes()
    finally:
        took = stop_within(host, PROMPT_STOP_SECONDS)
    assert not accepting.is_alive()
    assert took < 1.0, f"stop took {took:.2f} s"


def test_reading_inbox_files_does_not_wake_the_inotify_observer(tmp_path):
    """Opens and read-only closes are never asked of inotify: a rescan, preflight or a NAS's indexer
    reading the inbox costs the observer's threads nothing, while writes are still reported."""
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    scan = inbox / "sub" / "scan.jpg"
    scan.write_bytes(b"\xff\xd8scan bytes")
    events: queue.SimpleQueue = queue.SimpleQueue()
    existing = set(threading.enumerate())
    observer = start_observer("events", inbox, QueueingHandler(events, lambda: None, reports_close=True), 1.0)
    try:
        observing = [t for t in threading.enumerate() if t not in existing]
        assert observing, "the observer runs threads of its own"
        before = sum(context_switches(t) for t in observing)
        for _ in range(READS):
            scan.read_bytes()
            sorted(os.scandir(inbox / "sub"))  # what a rescan does: opens each folder
            time.sleep(0.01)  # one read at a time, as a reader that is not in a hurry
        woke = sum(context_switches(t) for t in observing) - before
        assert woke <= MAX_SWITCHES_WHILE_IDLE, f"{READS} reads woke the observer's threads {woke} times"
        assert events.empty(), "reads are not events"

        new = inbox / "sub" / "new.jpg"
        new.write_bytes(b"new")
        seen: list[tuple[str, str]] = []

        def closed() -> bool:
            while not events.empty():
                seen.append(events.get_nowait())
            return ("closed", str(new)) in seen

        wait_for(closed, 5, what="the finished write reported")
    finally:
        stop_quietly(observer)
