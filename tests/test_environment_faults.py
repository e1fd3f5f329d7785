"""Disk full, read-only folders, a corrupt journal: the input survives and completes once the fault clears.

The faults are real: a tiny tmpfs mounted for the test (full, then grown; read-only, then
writable again). That needs root, which CI has; elsewhere these tests are skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.demo import make_photo

from .conftest import API_KEY, config_mapping, visible_files, wait_for, write_config


def _mount(target: Path, options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True,
                   capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs folders for a test; each is unmounted afterwards whatever happens."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        target = tmp_path / name
        target.mkdir(exist_ok=True)
        try:
            _mount(target, f"size={size},mode=0755")
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def remount(target: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(target)], check=True, capture_output=True)


def test_disk_full_outbox_keeps_the_input_and_completes_when_space_returns(
        tmp_path, folders, emulator, run_daemon, tmpfs, captured_logs):
    from daemon.config import config_from_mapping

    outbox = tmpfs("outbox", "48k")  # far smaller than one restored image
    folders["outbox"] = outbox
    config = config_from_mapping(config_mapping(folders, emulator), tmp_path)
    run_daemon(config)
    make_photo(folders["inbox"] / "scan.jpg", 320, 240, seed=1, format="JPEG")
    wait_for(lambda: any(e["event"] == "job.stage_error" and "No space left" in e["error"]
                         for e in captured_logs), 20, what="a disk-full error")
    assert (folders["inbox"] / "scan.jpg").exists(), "the input stays in the inbox"
    assert visible_files(folders["failed"]) == []
    assert [p for p in outbox.rglob("*") if p.is_file()] == [], "no partial file left behind"

    remount(outbox, "size=16m")
    wait_for(lambda: (outbox / "scan.png").exists(), 60, what="output once space returned")
    wait_for(lambda: (folders["archive"] / "scan.jpg").exists(), 10, what="archived input")
    assert emulator.stats()["submits_accepted"] == 1


def test_read_only_outbox_keeps_the_input_and_completes_when_writable(
        tmp_path, folders, emulator, run_daemon, tmpfs, captured_logs):
    from daemon.config import config_from_mapping

    outbox = tmpfs("outbox", "16m")
    folders["outbox"] = outbox
    config = config_from_mapping(config_mapping(folders, emulator), tmp_path)
    run_daemon(config)
    remount(outbox, "ro")
    make_photo(folders["inbox"] / "scan.jpg", 320, 240, seed=2, format="JPEG")
    wait_for(lambda: any(e["event"] == "job.stage_error" and "Read-only" in e["error"]
                         for e in captured_logs), 20, what="a read-only error")
    assert (folders["inbox"] / "scan.jpg").exists()

    remount(outbox, "rw")
    wait_for(lambda: (outbox / "scan.png").exists(), 60, what="output once writable")
    assert emulator.stats()["submits_accepted"] == 1


def run_cli(config_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "CODEFORMER_API_KEY": API_KEY})


def test_corrupt_journal_refuses_to_start_with_the_reason(tmp_path, folders, emulator):
    folders["state"].mkdir()
    (folders["state"] / "journal.sqlite3").write_bytes(b"definitely not sqlite " * 200)
    (folders["inbox"] / "scan.jpg").write_bytes(b"kept")
    result = run_cli(write_config(tmp_path / "c.yaml", config_mapping(folders, emulator)))
    assert result.returncode == 1
    assert "cannot open journal" in result.stderr
    assert (folders["inbox"] / "scan.jpg").read_bytes() == b"kept"


def test_read_only_state_dir_refuses_to_start_with_the_reason(tmp_path, folders, emulator, tmpfs):
    state = tmpfs("state", "1m")
    remount(state, "ro")
    folders["state"] = state
    (folders["inbox"] / "scan.jpg").write_bytes(b"kept")
    result = run_cli(write_config(tmp_path / "c.yaml", config_mapping(folders, emulator)))
    assert result.returncode == 1
    assert str(state) in result.stderr and "not writable" in result.stderr
    assert (folders["inbox"] / "scan.jpg").read_bytes() == b"kept"
