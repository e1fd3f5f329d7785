"""A share that drops between the submit and the provider's fetch costs no scan.

The inbox is a real FUSE mount (bindfs over a local folder), the way a network share behaves: it
can be unmounted under the daemon. What the provider fetches is the daemon's pinned copy in its
state folder, so the scan is restored all the same, and archived once the share is back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.demo import make_photo
from daemon.journal import Journal
from daemon.service import journal_path

from .conftest import visible_files, wait_for

pytestmark = pytest.mark.skipif(shutil.which("bindfs") is None or not os.access("/dev/fuse", os.R_OK | os.W_OK),
                                reason="needs bindfs and /dev/fuse (.ci/run installs bindfs)")


def mount(backing: Path, mount_point: Path) -> None:
    subprocess.run(["bindfs", str(backing), str(mount_point)], check=True, timeout=20)


def unmount(mount_point: Path) -> None:
    if subprocess.run(["fusermount", "-u", str(mount_point)], timeout=20).returncode != 0:
        subprocess.run(["fusermount", "-u", "-z", str(mount_point)], check=True, timeout=20)


@pytest.fixture
def share(tmp_path, folders):
    """folders["inbox"] as a bindfs mount of a local folder; unmounted at the end whatever happened."""
    backing = tmp_path / "share-backing"
    backing.mkdir()
    mount(backing, folders["inbox"])
    yield backing
    if os.path.ismount(folders["inbox"]):
        unmount(folders["inbox"])


def test_a_share_unmounted_after_the_submit_and_before_the_fetch_loses_no_scan(
        tmp_path, folders, share, emulator, make_config, run_daemon, captured_logs):
    emulator.fetch_delay = 2.0  # the provider is busy: it fetches the scan a while after accepting it
    config = make_config(watch={"settle_seconds": 0.3, "rescan_seconds": 5, "mode": "auto"})
    run_daemon(config)
    scan = make_photo(tmp_path / "portrait.jpg", 240, 180, seed=41, format="JPEG")
    shutil.copy(scan, folders["inbox"] / "portrait.jpg")
    wait_for(lambda: emulator.stats()["submits_accepted"] == 1, 15, what="the submit")
    assert emulator.stats()["jobs"][0]["fetched_sha256"] is None, "not fetched yet"

    unmount(folders["inbox"])  # the share drops before the provider comes for the scan
    wait_for(lambda: (folders["outbox"] / "portrait.png").exists(), 20, what="the scan restored all the same")
    [job] = emulator.stats()["jobs"]
    assert job["status"] == "COMPLETED" and job["fetched_size"] == scan.stat().st_size
    assert visible_files(folders["failed"]) == []

    mount(share, folders["inbox"])  # the share is back: the original is archived, the job ends
    wait_for(lambda: (folders["archive"] / "portrait.jpg").exists(), 20, what="the original archived")
    assert (folders["archive"] / "portrait.jpg").read_bytes() == scan.read_bytes()
    assert visible_files(folders["failed"]) == [] and emulator.stats()["submits_received"] == 1
    journal = Journal(journal_path(config), read_only=True)
    wait_for(lambda: journal.counts_by_state().get("done") == 1, 10, what="the job done")
    journal.close()
    assert os.listdir(config.state_dir / "staging") == [], "the pinned copy is removed when the job ends"
