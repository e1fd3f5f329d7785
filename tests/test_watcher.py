"""The watcher's decisions: which names are skipped, and when a file counts as complete."""

from __future__ import annotations

import pytest

from daemon.watcher import SettleTracker, is_ignored


@pytest.mark.parametrize("rel_path,ignored", [
    ("scan.jpg", False), ("album/scan 01.tif", False), ("école.png", False),
    (".hidden.jpg", True), ("album/.cache/x.jpg", True), ("scan.jpg.part", True), ("scan.TMP", True),
    ("download.crdownload", True), ("~scan.jpg", True), ("album/~lock.jpg", True),
])
def test_is_ignored(rel_path, ignored):
    assert is_ignored(rel_path) is ignored


def test_user_patterns_match_names_and_paths():
    assert is_ignored("a/b.bak", ["*.bak"]) and is_ignored("thumbs/x.jpg", ["thumbs/*"])
    assert not is_ignored("a/b.jpg", ["*.bak"])


def test_a_file_settles_once_unchanged_for_the_settle_time():
    tracker = SettleTracker(settle_seconds=2.0, open_write_limit=60)
    tracker.observe("a.jpg", 100, 1, now=0.0)
    assert tracker.settled(1.9) == []
    tracker.observe("a.jpg", 200, 2, now=1.9)  # grew: the clock starts again
    assert tracker.settled(3.8) == []
    assert [s.rel_path for s in tracker.settled(3.9)] == ["a.jpg"]


def test_an_open_write_holds_the_file_until_it_is_closed():
    tracker = SettleTracker(settle_seconds=1.0, open_write_limit=60)
    tracker.observe("a.jpg", 100, 1, now=0.0)
    tracker.write_opened("a.jpg", now=0.5)
    assert tracker.settled(30.0) == []  # long silence, but the writer never closed it
    tracker.write_closed("a.jpg", now=30.0)
    assert [s.rel_path for s in tracker.settled(30.0)] == ["a.jpg"]


def test_a_lost_close_event_only_delays_the_file():
    tracker = SettleTracker(settle_seconds=1.0, open_write_limit=10)
    tracker.observe("a.jpg", 100, 1, now=0.0)
    tracker.write_opened("a.jpg", now=0.0)
    assert tracker.settled(9.9) == []
    assert [s.rel_path for s in tracker.settled(10.0)] == ["a.jpg"]


def test_next_deadline_is_the_earliest_settle_time():
    tracker = SettleTracker(settle_seconds=2.0, open_write_limit=60)
    assert tracker.next_deadline(0.0) is None
    tracker.observe("a.jpg", 1, 1, now=1.0)
    tracker.observe("b.jpg", 1, 1, now=0.5)
    assert tracker.next_deadline(1.0) == 2.5
    assert tracker.next_deadline(2.7) == 3.0
    assert tracker.next_deadline(3.0) is None  # both settled: nothing left to wake up for
