"""The polling observer on a large share: one cheap walk, and walks paced to a tenth of a core."""

from __future__ import annotations

import os
import queue
import threading

import pytest
from watchdog.events import DirCreatedEvent, DirDeletedEvent, FileCreatedEvent, FileDeletedEvent

from daemon.observers import (WALK_CPU_SHARE, PacedPollingEmitter, QueueingHandler, list_tree, listing_changes,
                              start_observer, walk_pause)

from .conftest import wait_for


@pytest.mark.parametrize("interval, walk_cpu, share, pause", [
    (1.0, 0.0, 0.05, 1.0),    # a small inbox: the configured interval
    (1.0, 0.05, 0.05, 1.0),   # 0.05 s of work, 1 s apart: 5%, within the share
    (1.0, 0.1, 0.05, 1.9),    # 0.1 s of work: walk again after 1.9 s, 5% of a core
    (1.0, 0.3, 0.10, 2.7),
    (0.25, 1.0, 0.05, 19.0),
])
def test_walk_pause(interval, walk_cpu, share, pause):
    assert walk_pause(interval, walk_cpu, share) == pytest.approx(pause)
    if walk_cpu:
        assert walk_cpu / (walk_cpu + walk_pause(interval, walk_cpu)) <= WALK_CPU_SHARE + 1e-9


def test_listing_changes_by_table():
    before = {"/i/a.jpg": False, "/i/b.jpg": False, "/i/album": True, "/i/old": True}
    after = {"/i/a.jpg": False, "/i/album": True, "/i/c.jpg": False, "/i/new": True}
    assert sorted((type(e).__name__, e.src_path) for e in listing_changes(before, after)) == sorted([
        (FileCreatedEvent.__name__, "/i/c.jpg"), (DirCreatedEvent.__name__, "/i/new"),
        (FileDeletedEvent.__name__, "/i/b.jpg"), (DirDeletedEvent.__name__, "/i/old")])
    assert listing_changes(after, after) == []


def test_list_tree_lists_below_without_following_links_or_entering_hidden_folders(tmp_path):
    (tmp_path / "album").mkdir()
    (tmp_path / "album" / "p.jpg").write_bytes(b"x")
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "hidden.jpg").write_bytes(b"x")
    (tmp_path / "to-root").symlink_to("/")
    listing = list_tree(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in listing) == [".partial", "album", "album/p.jpg", "to-root"]


def test_a_costly_walk_is_paced_and_a_new_file_is_still_reported(tmp_path, captured_logs):
    for i in range(20_000):
        (tmp_path / f"scan-{i:05d}.jpg").write_bytes(b"x")
    events: queue.SimpleQueue = queue.SimpleQueue()
    woken = threading.Event()
    observer = start_observer("polling", tmp_path, QueueingHandler(events, woken.set, reports_close=False), 0.05)
    try:
        [emitter] = list(observer.emitters)
        assert isinstance(emitter, PacedPollingEmitter)
        wait_for(lambda: any(e["event"] == "watch.polling_paced" for e in captured_logs), 20,
                 what="the walk of 20,000 files to be paced")
        [paced] = [e for e in captured_logs if e["event"] == "watch.polling_paced"][:1]
        # Both figures are logged rounded (the CPU to 1 ms, which the pause multiplies by 19; the pause to 10 ms).
        assert paced["interval"] > 0.05 and paced["interval"] == pytest.approx(
            walk_pause(0.05, paced["walk_cpu"]), abs=0.0005 * 19 + 0.005 + 1e-9)
        (tmp_path / "new.jpg").write_bytes(b"dropped on the share")
        seen: list = []

        def reported() -> bool:
            while not events.empty():
                seen.append(events.get_nowait())
            return ("appeared", str(tmp_path / "new.jpg")) in seen

        wait_for(reported, 30, what="the new file on a paced share to be reported")
        assert woken.is_set()
    finally:
        observer.stop()
        observer.join(10)
