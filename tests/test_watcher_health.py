"""The watcher never goes blind: the real daemon keeps every file when its observer dies or the inbox goes away."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from daemon import reports
from daemon.cli import render_status
from daemon.demo import make_photo
from daemon.journal import JobState

from .conftest import visible_files, wait_for
from .test_end_to_end import write_slowly


def summary(daemon) -> dict:
    return reports.journal_summary(daemon.service.journal, time.time())


def wait_until_in_flight_and_fetched(daemon, emulator, count: int) -> None:
    """`count` jobs accepted, their scans fetched by the provider, and no launch under way.

    Past this point, only jobs at the provider depend on the inbox (never a publish in progress,
    whose URL the provider would find gone: that job would fail, as with the real provider).
    """
    journal = daemon.service.journal

    def settled() -> bool:
        jobs = emulator.stats()["jobs"]
        return (len(jobs) == count and all(j["fetched_sha256"] for j in jobs)
                and journal.count_in(JobState.PUBLISHING, JobState.SUBMITTING) == 0)

    wait_for(settled, 15, what=f"{count} jobs in flight and fetched")


def wait_until_archiving_waits_for_the_inbox(daemon, count: int) -> None:
    """`count` delivered jobs tried to archive their original, found the inbox gone, and wait for it
    (or, wrongly, ended some other way: the caller's assertions then say how)."""
    journal = daemon.service.journal

    def settled() -> bool:
        waiting = [j for j in journal.jobs_in(JobState.DELIVERING)
                   if (j.last_error or "").startswith("InboxUnavailable")]
        return len(waiting) == count or journal.count_in(JobState.DONE, JobState.FAILED, JobState.VANISHED) > 0

    wait_for(settled, 10, what=f"{count} deliveries waiting for the inbox")


def all_archived(folders, count: int) -> bool:
    """`count` originals in the archive and none left in the inbox (a move across mounts copies first)."""
    return len(visible_files(folders["archive"])) == count and not visible_files(folders["inbox"])


def assert_each_restored_once(folders, names: list[str]) -> None:
    outputs = [folders["outbox"] / Path(name).with_suffix(".png") for name in names]
    assert sorted(visible_files(folders["outbox"])) == sorted(outputs)  # exactly once each, no "-1" copies
    assert sorted(visible_files(folders["archive"])) == sorted(folders["archive"] / n for n in names)
    assert visible_files(folders["failed"]) == [] and visible_files(folders["inbox"]) == []


def test_files_dropped_after_the_observer_died_are_still_restored(folders, emulator, make_config, run_daemon,
                                                                  captured_logs):
    daemon = run_daemon(make_config(watch={"settle_seconds": 0.3, "rescan_seconds": 60, "mode": "events"}))
    watcher = daemon.service.watcher
    wait_for(lambda: watcher.observer is not None, 5, what="the observer")
    watcher.observer.stop()  # its thread and its emitter end: nothing hears the inbox any more
    make_photo(folders["inbox"] / "dropped at the death.jpg", 200, 160, seed=1, format="JPEG")

    wait_for(lambda: any(e["event"] == "watch.observer_died" for e in captured_logs), 5, what="observer_died")
    wait_for(lambda: watcher.observer_kind == "polling", 5, what="the polling observer")
    make_photo(folders["inbox"] / "dropped after.jpg", 200, 160, seed=2, format="JPEG")

    names = ["dropped at the death.jpg", "dropped after.jpg"]  # far sooner than the 60 s rescan
    wait_for(lambda: all_archived(folders, 2), 15, what="both restored")
    assert_each_restored_once(folders, names)


def test_an_inbox_renamed_away_and_back_loses_nothing(tmp_path, folders, emulator, make_config, run_daemon,
                                                      captured_logs):
    emulator.latency = 2.5  # longer than the health check takes to notice: no slot frees before that
    daemon = run_daemon(make_config(api={"max_in_flight": 2}, watch={"settle_seconds": 0.2, "rescan_seconds": 60}))
    inbox, away = folders["inbox"], tmp_path / "inbox-renamed"
    names = [f"scan-{i}.jpg" for i in range(4)]
    for i, name in enumerate(names):
        make_photo(inbox / name, 200, 160, seed=i, format="JPEG")
    wait_until_in_flight_and_fetched(daemon, emulator, 2)  # two at the provider, two pending

    inbox.rename(away)
    emulator.latency = 0.2
    wait_for(lambda: summary(daemon)["inbox_unavailable"], 5, what="the inbox reported unavailable")
    assert "inbox: unavailable (" in render_status(summary(daemon))
    make_photo(away / "dropped meanwhile.jpg", 200, 160, seed=9, format="JPEG")  # e.g. straight onto the NAS
    wait_for(lambda: len(visible_files(folders["outbox"])) == 2, 10, what="the two in flight delivered")
    wait_until_archiving_waits_for_the_inbox(daemon, 2)
    daemon.wait_for_passes(1.0)  # slots are free and the loop runs on: the pending two are still not started
    counts = summary(daemon)["counts"]
    assert counts["vanished"] == counts["failed"] == counts["done"] == 0
    assert counts["delivering"] == 2 and counts["pending"] == 2
    assert emulator.stats()["submits_received"] == 2

    away.rename(inbox)
    names.append("dropped meanwhile.jpg")
    wait_for(lambda: all_archived(folders, 5), 20, what="every scan restored and archived")
    assert_each_restored_once(folders, names)
    # The last archive move lands just before its job is recorded done: wait for the record too.
    final = wait_for(lambda: (s := summary(daemon))["counts"]["done"] == 5 and s, 5, what="five jobs done")
    assert final["inbox_unavailable"] is None
    assert emulator.stats()["submits_accepted"] == 5
    events = [e["event"] for e in captured_logs]
    assert events.count("watch.inbox_unavailable") == 1 and "watch.inbox_back" in events
    assert "file.vanished" not in events and "job.failed" not in events
    held = [e for e in captured_logs if e["event"] == "job.stage_error"]
    assert not {e["stage"] for e in held} & {"pending", "publishing"}  # never tried while it was away


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def test_an_unmounted_share_holds_every_job_until_it_is_mounted_again(tmp_path, folders, emulator, make_config,
                                                                       run_daemon, captured_logs):
    """The inbox is a mount (a bind mount here, standing in for a share); unmounting it leaves the empty
    mount point behind, which must not be taken for an inbox whose files all vanished. Needs root."""
    share = tmp_path / "share"
    share.mkdir()
    try:
        _mount("--bind", str(share), str(folders["inbox"]))
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot bind-mount here (needs root): {exc}")
    try:
        emulator.latency = 3.0  # longer than the health check takes to notice the unmount
        daemon = run_daemon(make_config(api={"max_in_flight": 2},
                                        watch={"settle_seconds": 0.2, "rescan_seconds": 60}))
        names = [f"scan-{i}.jpg" for i in range(3)]
        for i, name in enumerate(names):
            make_photo(folders["inbox"] / name, 200, 160, seed=i, format="JPEG")
        wait_until_in_flight_and_fetched(daemon, emulator, 2)

        subprocess.run(["umount", "-l", str(folders["inbox"])], check=True, capture_output=True)
        emulator.latency = 0.2
        assert visible_files(folders["inbox"]) == []  # the bare mount point: it exists, and is empty
        wait_for(lambda: "no longer mounted" in (summary(daemon)["inbox_unavailable"] or ""), 5,
                 what="the unmount noticed")
        wait_for(lambda: len(visible_files(folders["outbox"])) == 2, 10, what="the two in flight delivered")
        wait_until_archiving_waits_for_the_inbox(daemon, 2)
        daemon.wait_for_passes(1.0)  # slots are free and the loop runs on: the pending one is still not started
        counts = summary(daemon)["counts"]
        assert counts["vanished"] == counts["failed"] == counts["done"] == 0
        assert counts["delivering"] == 2 and counts["pending"] == 1

        _mount("--bind", str(share), str(folders["inbox"]))
        wait_for(lambda: all_archived(folders, 3), 20, what="every scan restored and archived")
        assert_each_restored_once(folders, names)
        assert summary(daemon)["inbox_unavailable"] is None
        assert emulator.stats()["submits_accepted"] == 3
    finally:
        subprocess.run(["umount", "-l", str(folders["inbox"])], capture_output=True)


def test_polling_mode_takes_moved_in_and_slowly_written_files(tmp_path, folders, emulator, make_config, run_daemon,
                                                              captured_logs):
    daemon = run_daemon(make_config(watch={"settle_seconds": 0.3, "rescan_seconds": 60, "mode": "polling"}))
    [started] = [e for e in captured_logs if e["event"] == "watch.started"]
    assert (started["mode"], started["observer"]) == ("polling", "polling")
    assert daemon.service.watcher.observer_kind == "polling"

    moved = make_photo(tmp_path / "moved in.jpg", 200, 160, seed=1, format="JPEG")
    moved.rename(folders["inbox"] / "moved in.jpg")
    data = make_photo(tmp_path / "slow.jpg", 320, 240, seed=2, format="JPEG").read_bytes()
    write_slowly(folders["inbox"] / "album" / "slow.jpg", data, chunks=6, pause=0.15)

    wait_for(lambda: all_archived(folders, 2), 15, what="both restored")
    assert_each_restored_once(folders, ["moved in.jpg", "album/slow.jpg"])
    assert [j["fetched_size"] for j in emulator.stats()["jobs"]].count(len(data)) == 1  # whole, never half


def test_a_missing_file_under_a_replaced_inbox_folder_is_not_vanished(tmp_path):
    """Between an unmount and the watcher's next look, the empty mount point is another folder:
    a job whose file is missing there waits (InboxUnavailable) instead of ending vanished."""
    import pytest

    from daemon.context import Context, InboxUnavailable, require_inbox
    from daemon.journal import Journal

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    st = inbox.stat()
    journal = Journal(tmp_path / "journal.sqlite3")
    ctx = Context(config=None, journal=journal, host=None, api=None, folders=None, inbox=inbox,
                  staging=tmp_path / "staging", watched_inbox=(st.st_dev, st.st_ino))
    require_inbox(ctx)  # the watched folder: a missing file there really is gone
    inbox.rename(tmp_path / "share-contents")
    inbox.mkdir()  # what an unmount leaves: an empty folder at the same path
    with pytest.raises(InboxUnavailable, match="not the one being watched"):
        require_inbox(ctx)
    journal.close()
