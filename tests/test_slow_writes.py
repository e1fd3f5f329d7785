"""A scan written in place, slowly, through one open handle is taken once and whole.

The writer pauses longer than the settle time between chunks, so only the open write (an IN_MODIFY
with no IN_CLOSE_WRITE since, or the kernel's word for a write opened before the watch began) can
keep the daemon from taking it early. The file appears as the daemon starts (before its watch or
its start-up scan) in some runs and well after in others.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import config_from_mapping
from daemon.demo import make_photo
from daemon.settle import SettleTracker
from daemon.watcher import InboxWatcher

from .conftest import ManualClock, RunningDaemon, config_mapping, visible_files, wait_for

SETTLE = 0.2
CHUNKS = 5
RUNS = 20
START_OFFSETS = (0.0, 0.0, 0.004, 0.015, 0.04, 0.1, 0.25, 0.6)
"""Seconds after the writer thread starts, just before the daemon is started, that it creates the file."""
PAUSES = (0.4, 0.45, 0.5)
"""Between chunks: each longer than the settle time."""


class SlowWriter(threading.Thread):
    """Creates `path` after `offset` seconds and writes `data` through one handle in CHUNKS chunks."""

    def __init__(self, path: Path, data: bytes, offset: float, pause: float) -> None:
        super().__init__(name="slow-writer", daemon=True)
        self.path, self.data, self.offset, self.pause = path, data, offset, pause
        self.created_at: float | None = None
        self.closed_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            time.sleep(self.offset)
            step = -(-len(self.data) // CHUNKS)
            with open(self.path, "wb") as f:
                self.created_at = time.monotonic()
                for start in range(0, len(self.data), step):
                    if start:
                        time.sleep(self.pause)
                    f.write(self.data[start:start + step])
                    f.flush()
                    os.fsync(f.fileno())
            self.closed_at = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def one_run(run: int, base: Path, emulator, data: bytes, logs: list[dict]) -> str:
    """Start a fresh daemon on fresh folders with a slow writer racing it; return a problem or ''."""
    folders = {name: base / f"run-{run:02d}" / name for name in ("inbox", "outbox", "archive", "failed", "state")}
    folders["inbox"].mkdir(parents=True)
    config = config_from_mapping(config_mapping(folders, emulator, watch={"settle_seconds": SETTLE,
                                                                          "rescan_seconds": 5}), base)
    name = f"scan-{run:02d}.jpg"
    offset, pause = START_OFFSETS[run % len(START_OFFSETS)], PAUSES[run % len(PAUSES)]
    writer = SlowWriter(folders["inbox"] / name, data, offset, pause)
    began = time.monotonic()
    writer.start()
    daemon = RunningDaemon(config).start()
    started = time.monotonic()
    try:
        output = folders["outbox"] / Path(name).with_suffix(".png")
        wait_for(lambda: output.exists() and (folders["archive"] / name).exists()
                 or visible_files(folders["failed"]), 20, what=f"run {run}: output or failure")
        writer.join(10)
    finally:
        daemon.stop()
    assert writer.error is None, writer.error
    when = ("before the daemon had started" if writer.created_at < started else "after the daemon had started")
    label = f"run {run} (created {writer.created_at - began:.3f} s in, {when}, pauses {pause} s)"
    detected = [e for e in logs if e.get("event") == "file.detected" and e.get("rel_path") == name]
    if visible_files(folders["failed"]):
        return f"{label}: went to failed/: {[p.name for p in visible_files(folders['failed'])]}"
    if len(detected) != 1 or detected[0]["size"] != len(data):
        return f"{label}: taken {[e.get('size') for e in detected]} bytes, not once at {len(data)}"
    if (folders["archive"] / name).read_bytes() != data:
        return f"{label}: the archived original is not the bytes written"
    if visible_files(folders["inbox"]) or visible_files(folders["outbox"]) != [output]:
        return f"{label}: left {visible_files(folders['inbox'])} / made {visible_files(folders['outbox'])}"
    assert daemon.clean
    return ""


def test_a_scan_written_slowly_through_one_handle_is_taken_once_and_whole(tmp_path, emulator, captured_logs):
    data = make_photo(tmp_path / "whole.jpg", 640, 480, seed=3, format="JPEG").read_bytes()
    problems = [p for run in range(RUNS) if (p := one_run(run, tmp_path, emulator, data, captured_logs))]
    assert problems == [], f"{len(problems)} of {RUNS} runs went wrong:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the settle check, by itself


def test_a_write_event_before_the_first_stat_still_holds_the_file():
    tracker = SettleTracker(settle_seconds=0.2, open_write_limit=60)
    tracker.write_opened("a.jpg", now=0.0)  # the IN_MODIFY is drained before the file was ever stat'ed
    assert tracker.settled(1.0) == []  # nothing known about it yet: never handed back
    tracker.observe("a.jpg", 100, 1, now=1.0)
    assert tracker.settled(5.0) == []  # still open for writing
    tracker.write_closed("a.jpg", now=5.0)
    assert [(s.rel_path, s.size) for s in tracker.settled(5.2)] == [("a.jpg", 100)]


def test_a_write_event_for_a_file_first_seen_by_a_scan_holds_it():
    tracker = SettleTracker(settle_seconds=0.2, open_write_limit=60)
    tracker.observe("a.jpg", 100, 1, now=0.0)  # the start-up scan finds it
    tracker.write_opened("a.jpg", now=0.1)  # then the first IN_MODIFY of a write begun before the watch
    tracker.observe("a.jpg", 100, 1, now=0.5)  # the stat has not caught up with the write yet
    assert tracker.settled(0.5) == [] and tracker.settled(10.0) == []
    tracker.write_closed("a.jpg", now=10.0)
    assert [s.rel_path for s in tracker.settled(10.0)] == ["a.jpg"]


def test_a_write_opened_before_the_watch_holds_the_file_until_closed_or_silent_too_long():
    tracker = SettleTracker(settle_seconds=0.2, open_write_limit=10)
    tracker.observe("a.jpg", 100, 1, now=100.0)  # found by the first scan, last modified 3 s before
    tracker.open_before_watch("a.jpg", last_change=97.0)
    assert tracker.settled(100.5) == []  # settled by size and mtime, but the writer may still hold it
    assert tracker.next_deadline(100.5) == 107.0  # when its silence reaches the open-write limit
    assert [s.rel_path for s in tracker.settled(107.0)] == ["a.jpg"]

    tracker = SettleTracker(settle_seconds=0.2, open_write_limit=10)
    tracker.observe("b.jpg", 100, 1, now=100.0)
    tracker.open_before_watch("b.jpg", last_change=99.0)
    tracker.write_closed("b.jpg", now=101.0)  # its close is seen: no write is left open
    assert [s.rel_path for s in tracker.settled(101.0)] == ["b.jpg"]

    tracker = SettleTracker(settle_seconds=0.2, open_write_limit=10)
    tracker.observe("c.jpg", 100, 1, now=100.0)
    tracker.open_before_watch("c.jpg", last_change=50.0)  # silent for longer than the limit already
    assert [s.rel_path for s in tracker.settled(100.2)] == ["c.jpg"]

    tracker = SettleTracker(settle_seconds=0.2, open_write_limit=10)
    tracker.observe("d.jpg", 100, 1, now=100.0)
    tracker.write_opened("d.jpg", now=100.0)  # an IN_MODIFY came first: that open write is what counts
    tracker.open_before_watch("d.jpg", last_change=80.0)
    assert tracker.settled(105.0) == []


# --------------------------------------------------------------------------- a real watcher on a manual clock


@pytest.fixture
def watcher(tmp_path) -> Iterator[tuple[InboxWatcher, Path, ManualClock]]:
    """A real inotify InboxWatcher on tmp_path/inbox (settle 0.3 s, open-write limit 60 s), not yet started."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    clock = ManualClock()
    made = InboxWatcher(inbox, settle_seconds=0.3, rescan_seconds=1000, mode="events", clock=clock)
    yield made, inbox, clock
    made.stop()


def taken(watcher: InboxWatcher, clock: ManualClock, at: float) -> list[tuple[str, int]]:
    clock.now = at
    return [(s.rel_path, s.size) for s in watcher.take_settled()]


def taken_once_closed(watcher: InboxWatcher, clock: ManualClock, after: float) -> list[tuple[str, int]]:
    """What is taken once the last write's events have arrived: the clock moves on 0.5 s a look."""
    times = itertools.count(after, 0.5)
    return wait_for(lambda: taken(watcher, clock, next(times)), 5, what="the closed file")


def test_a_write_opened_before_the_watch_began_holds_the_file_until_it_is_closed(watcher):
    watcher, inbox, clock = watcher
    (inbox / "done.jpg").write_bytes(b"closed just before")
    with open(inbox / "scan.jpg", "wb") as f:  # the scanner opened it before the daemon started
        f.write(b"first chunk")
        f.flush()
        watcher.start()
        assert taken(watcher, clock, 0.0) == []  # the start-up scan finds it: no event has shown a write
        assert taken(watcher, clock, 0.3) == [("done.jpg", 18)]  # the kernel says no one writes to this one
        assert taken(watcher, clock, 30.0) == []  # long past the settle time, but the kernel says it is open
        f.write(b", and the rest")
    assert taken_once_closed(watcher, clock, 31.0) == [("scan.jpg", 25)]


def test_a_write_opened_in_a_folder_before_it_was_moved_in_holds_the_file(watcher, tmp_path):
    watcher, inbox, clock = watcher
    watcher.start()
    assert taken(watcher, clock, 0.0) == []
    (tmp_path / "album").mkdir()
    with open(tmp_path / "album" / "page 1.jpg", "wb") as f:
        f.write(b"first chunk")
        f.flush()
        os.rename(tmp_path / "album", inbox / "album")  # found by a scan of the folder, not by its own events
        wait_for(lambda: taken(watcher, clock, 1.0) == [] and "album/page 1.jpg" in watcher._tracker,
                 5, what="the moved-in folder scanned")
        assert taken(watcher, clock, 30.0) == []
        f.write(b", and the rest")
    assert taken_once_closed(watcher, clock, 31.0) == [("album/page 1.jpg", 25)]


CAP_LEASE = 28
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def without_lease_capability() -> Iterator[None]:
    """On this thread only (capabilities are per thread): root without CAP_LEASE, so the kernel refuses
    a lease on a file root does not own, as it does for the daemon's user with a scanner's files."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    before = data[0].effective
    data[0].effective = before & ~(1 << CAP_LEASE)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    try:
        yield
    finally:
        data[0].effective = before
        libc.capset(ctypes.byref(header), data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as another user")
def test_where_the_kernel_cannot_say_a_file_written_just_before_the_watch_waits_for_its_close(watcher):
    watcher, inbox, clock = watcher
    old, young = b"written long ago", b"written and closed just before the daemon started"
    (inbox / "old.jpg").write_bytes(old)
    (inbox / "young.jpg").write_bytes(young)
    os.utime(inbox / "old.jpg", (time.time() - 100, time.time() - 100))
    with open(inbox / "open.jpg", "wb") as f:
        f.write(b"first chunk")
        f.flush()
        for name in ("old.jpg", "young.jpg", "open.jpg"):
            os.chown(inbox / name, 65534, 65534)  # the scanner's user, not the daemon's
        watcher.start()
        with without_lease_capability():
            assert taken(watcher, clock, 0.0) == []  # the start-up scan, which asks the kernel in vain
        assert taken(watcher, clock, 0.3) == [("old.jpg", len(old))]  # quiet for longer than the limit
        assert taken(watcher, clock, 30.0) == []  # the young ones may still be open: nothing can say
        f.write(b", and the rest")
    assert taken_once_closed(watcher, clock, 31.0) == [("open.jpg", 25)]  # its close is seen
    assert taken(watcher, clock, 59.0) == []
    assert taken(watcher, clock, 60.0) == [("young.jpg", len(young))]  # no close to see: held to the limit
