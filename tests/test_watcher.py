"""The watcher's decisions: which names are skipped, when a file counts as complete, which observer
watches, and how a real watcher keeps watching when its observer dies or the inbox goes away."""

from __future__ import annotations

import os
import resource
import threading

import pytest
from structlog.testing import capture_logs
from watchdog.observers.polling import PollingObserverVFS

from daemon.mounts import Mount, filesystem_type, mount_gone, mount_of
from daemon.observers import choose_observer, polling_interval
from daemon.settle import SettleTracker
from daemon.watcher import HEALTH_CHECK_SECONDS, InboxWatcher, is_ignored

from .conftest import ManualClock


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
    assert tracker.next_deadline(2.7) == 2.7  # b has settled and is not taken yet: there is work now
    tracker.forget("b.jpg")
    assert tracker.next_deadline(2.7) == 3.0
    tracker.forget("a.jpg")
    assert tracker.next_deadline(3.0) is None  # nothing left to wake up for


def test_a_change_moves_the_deadline_and_stale_deadlines_are_skipped():
    tracker = SettleTracker(settle_seconds=2.0, open_write_limit=60)
    tracker.observe("a.jpg", 1, 1, now=0.0)
    tracker.observe("a.jpg", 2, 2, now=1.5)  # changed: settles at 3.5, the 2.0 deadline is stale
    assert tracker.due(2.0) == [] and tracker.settled(2.0) == []
    assert tracker.next_deadline(2.0) == 3.5
    assert tracker.due(3.5) == ["a.jpg"]
    tracker.observe("a.jpg", 2, 2, now=3.5)  # looked at once more: unchanged
    assert [(s.rel_path, s.size) for s in tracker.settled(3.5)] == [("a.jpg", 2)]


def test_a_file_quiet_since_before_it_was_seen_settles_sooner_but_never_before_a_look():
    tracker = SettleTracker(settle_seconds=2.0, open_write_limit=60)
    tracker.observe("old.jpg", 1, 1, now=10.0, quiet_for=3600)  # written an hour ago, no write open
    tracker.observe("new.jpg", 1, 1, now=10.0, quiet_for=0.5)
    assert [s.rel_path for s in tracker.settled(10.0)] == ["old.jpg"]
    assert tracker.next_deadline(10.0) == 10.0
    tracker.forget("old.jpg")
    assert tracker.next_deadline(10.0) == 11.5  # half a second of quiet counts toward its two


def test_only_the_files_whose_time_has_come_are_due():
    tracker = SettleTracker(settle_seconds=2.0, open_write_limit=60)
    for i in range(10_000):
        tracker.observe(f"{i}.jpg", 1, 1, now=float(i % 100))
    assert tracker.due(1.5) == []
    assert sorted(tracker.due(2.0), key=lambda p: int(p[:-4])) == [f"{i}.jpg" for i in range(0, 10_000, 100)]


# --------------------------------------------------------------------------- which observer, on which file system

MOUNTINFO = "\n".join([
    r"22 27 0:21 / /proc rw,relatime - proc proc rw",
    r"27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard",
    r"61 27 0:52 / /srv/scans rw,relatime shared:30 - cifs //nas/scans rw,vers=3.1.1,username=scan",
    r"62 27 0:53 / /mnt/nfs rw,relatime - nfs4 nas:/export rw,vers=4.2,addr=192.168.1.5",
    r"63 62 8:17 / /mnt/nfs/local\040disk rw,relatime - ext4 /dev/sdb1 rw",
    r"64 27 0:55 / /home/ann/My\040Scans rw,nosuid,nodev shared:40 master:2 - fuse.sshfs ann@nas:/scans rw",
    r"65 27 8:33 / /media/usb rw,relatime - vfat /dev/sdc1 rw",
    r"66 65 0:56 / /media/usb rw,relatime - fuseblk /dev/sdd1 rw",  # mounted over: the later one counts
    "not a mountinfo line",
])


@pytest.mark.parametrize("path,fstype", [
    ("/srv/scans/inbox", "cifs"),                   # an SMB share
    ("/srv/scans", "cifs"),                         # the mount point itself
    ("/srv/scans-local/inbox", "ext4"),             # a name that only starts like the mount point
    ("/mnt/nfs/inbox", "nfs4"),                     # an NFS mount
    ("/mnt/nfs/local disk/inbox", "ext4"),          # a local disk mounted inside it: the deepest wins
    ("/home/ann/My Scans/inbox", "fuse.sshfs"),     # a space, written \040 in mountinfo
    ("/home/ann/My", "ext4"),
    ("/media/usb/inbox", "fuseblk"),
    ("/var/lib/inbox", "ext4"),
])
def test_filesystem_type_is_the_deepest_mount_above_the_path(path, fstype):
    assert filesystem_type(path, MOUNTINFO) == fstype


def test_filesystem_type_is_unknown_without_a_mount_table():
    assert filesystem_type("/srv/scans/inbox", "") is None
    assert mount_of("/srv/scans/inbox", MOUNTINFO) == Mount("/srv/scans", "cifs")


@pytest.mark.parametrize("mode,fstype,chosen", [
    ("auto", "cifs", "polling"), ("auto", "smb3", "polling"), ("auto", "nfs", "polling"),
    ("auto", "nfs4", "polling"), ("auto", "fuse.sshfs", "polling"), ("auto", "fuse", "polling"),
    ("auto", "9p", "polling"), ("auto", "ceph", "polling"), ("auto", "glusterfs", "polling"),
    ("auto", "ext4", "events"), ("auto", "xfs", "events"), ("auto", "fuseblk", "events"),
    ("auto", None, "events"),
    ("events", "cifs", "events"), ("polling", "ext4", "polling"),
])
def test_choose_observer(mode, fstype, chosen):
    assert choose_observer(mode, fstype) == chosen


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="inotify"):
        choose_observer("inotify", "ext4")


@pytest.mark.parametrize("watched,current,gone", [
    (Mount("/srv/scans", "cifs"), Mount("/", "ext4"), True),             # unmounted: the path falls through
    (Mount("/srv/scans", "cifs"), Mount("/srv", "ext4"), True),
    (Mount("/srv/scans", "cifs"), Mount("/srv/scans", "cifs"), False),   # mounted again
    (Mount("/", "ext4"), Mount("/srv/scans", "cifs"), False),            # a share mounted over it: watch that
    (Mount("/srv/scans", "cifs"), None, False),                          # no mount table: cannot tell
])
def test_mount_gone(watched, current, gone):
    assert mount_gone(watched, current) is gone


@pytest.mark.parametrize("settle,interval", [(0.0, 0.25), (0.3, 0.25), (1.0, 0.5), (2.0, 1.0), (30.0, 1.0)])
def test_polling_interval_follows_the_settle_time_within_bounds(settle, interval):
    assert polling_interval(settle) == interval


# --------------------------------------------------------------------------- a real watcher on a manual clock


@pytest.fixture
def watched(tmp_path):
    """A real InboxWatcher on tmp_path/inbox with a clock the test moves; stopped afterwards."""
    made = []

    def make(**options):
        inbox = tmp_path / "inbox"
        inbox.mkdir(exist_ok=True)
        woken = threading.Event()
        clock = ManualClock()
        watcher = InboxWatcher(inbox, settle_seconds=0.3, rescan_seconds=1000, wake=woken.set, clock=clock,
                               **options)
        made.append(watcher)
        return watcher, inbox, clock, woken

    yield make
    for watcher in made:
        watcher.stop()


def taken(watcher, clock, at: float) -> list[str]:
    clock.now = at
    return [s.rel_path for s in watcher.take_settled()]


def test_auto_polls_an_inbox_on_a_network_share_and_a_polled_change_is_not_an_open_write(watched, tmp_path):
    share = f"61 27 0:52 / {tmp_path} rw,relatime - cifs //nas/scans rw"
    watcher, inbox, clock, woken = watched(mountinfo=lambda: MOUNTINFO + "\n" + share)
    with capture_logs() as logs:
        watcher.start()
    assert isinstance(watcher.observer, PollingObserverVFS) and watcher.observer_kind == "polling"
    [started] = [e for e in logs if e["event"] == "watch.started"]
    assert (started["mode"], started["fstype"], started["observer"]) == ("auto", "cifs", "polling")
    assert taken(watcher, clock, 0.0) == []  # the start-up rescan: nothing yet

    woken.clear()
    (inbox / "scan.jpg").write_bytes(b"first half")
    assert woken.wait(5), "the polling observer did not report the new file"
    assert taken(watcher, clock, 1.0) == []
    with open(inbox / "scan.jpg", "ab") as f:
        f.write(b", second half")
    # The walk reports names only; the watcher's own look when the settle time comes sees the change.
    assert taken(watcher, clock, 2.0) == []  # changed: its settle clock starts again
    # A polling observer never reports a close: nothing may hold the file as still being written
    # (that would wait out the 60 s open-write limit).
    assert taken(watcher, clock, 2.5) == ["scan.jpg"]


def test_a_dead_observer_is_replaced_by_polling_and_a_rescan(watched):
    watcher, inbox, clock, woken = watched(mode="events")
    watcher.start()
    assert watcher.observer_kind == "events"
    assert taken(watcher, clock, 0.0) == []
    for emitter in list(watcher.observer.emitters):  # the inotify emitter thread ends
        emitter.stop()
        emitter.join(5)
    (inbox / "missed.jpg").write_bytes(b"dropped while nothing was watching")

    clock.now = 1.0
    with capture_logs() as logs:
        watcher.check_health()
        clock.now = 1.5
        watcher.check_health()  # within the second: nothing more to do, nothing logged twice
    [died] = [e for e in logs if e["event"] == "watch.observer_died"]
    assert died["thread"] == "emitter" and died["fallback"] == "polling" and died["log_level"] == "error"
    assert watcher.observer_kind == "polling"

    assert taken(watcher, clock, 1.5) == []  # found by the rescan the death asked for
    assert taken(watcher, clock, 2.0) == ["missed.jpg"]
    woken.clear()
    (inbox / "later.jpg").write_bytes(b"seen by the polling observer")
    assert woken.wait(5), "the polling observer did not report the new file"
    assert taken(watcher, clock, 2.5) == [] and taken(watcher, clock, 3.0) == ["later.jpg"]


def test_a_vanished_inbox_pauses_the_watcher_and_its_return_resumes_it(watched, tmp_path):
    watcher, inbox, clock, woken = watched()
    (inbox / "a.jpg").write_bytes(b"tracked, not yet settled")
    watcher.start()
    assert taken(watcher, clock, 0.0) == []
    away = tmp_path / "away"
    inbox.rename(away)

    with capture_logs() as logs:
        for beat in (1, 2, 3):
            clock.now = beat * HEALTH_CHECK_SECONDS
            watcher.check_health()
        assert taken(watcher, clock, clock.now) == []  # nothing taken while it is away
        assert watcher.next_deadline() > clock.now  # and nothing to spin on
    assert not watcher.available and "No such file" in watcher.unavailable_reason
    assert watcher.observer is None
    assert [e["event"] for e in logs] == ["watch.inbox_unavailable"]  # one error, not one per second
    (away / "b.jpg").write_bytes(b"dropped while the inbox was away")

    away.rename(inbox)
    back_at = 4 * HEALTH_CHECK_SECONDS
    with capture_logs() as logs:
        clock.now = back_at
        watcher.check_health()
    assert watcher.available and watcher.unavailable_reason is None and watcher.observer_kind == "events"
    assert [e["event"] for e in logs] == ["watch.inbox_back", "watch.started"]
    assert taken(watcher, clock, back_at) == ["a.jpg"]  # tracked all along
    assert taken(watcher, clock, back_at + 0.5) == ["b.jpg"]  # found by the rescan on its return


def test_a_replaced_inbox_folder_is_watched_afresh(watched, tmp_path):
    watcher, inbox, clock, woken = watched()
    watcher.start()
    old_observer = watcher.observer
    inbox.rename(tmp_path / "old inbox")
    inbox.mkdir()  # another folder at the same path, between two checks
    with capture_logs() as logs:
        clock.now = 1.0
        watcher.check_health()
    [back] = [e for e in logs if e["event"] == "watch.inbox_back"]
    assert back["replaced"] is True and watcher.observer is not old_observer
    assert taken(watcher, clock, 1.0) == []
    woken.clear()
    (inbox / "new.jpg").write_bytes(b"in the new folder")
    assert woken.wait(5), "the new folder is not watched"


def test_an_observer_that_cannot_start_is_reported_and_retried_as_polling(watched):
    """A real start failure: no file descriptor left for inotify (EMFILE), nor for the polling walk."""
    watcher, inbox, clock, woken = watched(mode="events")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    with capture_logs() as logs:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # every new descriptor fails
        try:
            watcher.start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    failed = [e for e in logs if e["event"] == "watch.observer_failed"]
    assert [(e["observer"], e["fallback"]) for e in failed] == [
        ("events", "polling"), ("polling", "rescans only; retried every two seconds")]
    assert "limit" in failed[0]["fix"] and watcher.observer is None and watcher.available
    (inbox / "scan.jpg").write_bytes(b"found by the rescan even without an observer")
    assert taken(watcher, clock, 0.0) == []
    assert taken(watcher, clock, 0.5) == ["scan.jpg"]

    clock.now = 1.0
    watcher.check_health()  # descriptors are back: the retry starts the polling observer
    assert watcher.observer_kind == "polling"
