"""Several daemons, one queue: two real daemon processes on one shared inbox and one PostgreSQL journal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daemon.journal import Journal, JobState
from daemon.storage.postgresql import PostgresConnector

from .conftest import API_KEY, DaemonProcess, config_mapping, drop_scan, wait_for, write_config


def fleet_config(tmp_path: Path, folders: dict[str, Path], emulator, dsn: str, node: str, **overrides) -> Path:
    """A station's configuration: the shared folders and database, a state folder of its own."""
    state = tmp_path / f"state-{node}"
    mapping = config_mapping(folders, emulator, **overrides)
    mapping["state_dir"] = str(state)
    mapping["state"] = {"backend": "postgresql", "node_name": node,
                        "postgresql": {"dsn": dsn, "lease_seconds": overrides.pop("lease_seconds", 3)}}
    return write_config(tmp_path / f"{node}.yaml", mapping)


def start_station(tmp_path: Path, config: Path, node: str) -> DaemonProcess:
    return DaemonProcess(config, tmp_path / f"{node}.log").start()


def test_two_stations_share_one_queue(tmp_path, folders, emulator, postgres_dsn):
    stations = [start_station(tmp_path, fleet_config(tmp_path, folders, emulator, postgres_dsn, n), n)
                for n in ("north", "south")]
    try:
        for station in stations:
            station.wait_ready()
        names = [f"album/scan-{i}.jpg" for i in range(8)]
        for i, name in enumerate(names):
            drop_scan(folders, name, seed=i)
        wait_for(lambda: all((folders["outbox"] / name).with_suffix(".png").exists() for name in names), 60,
                 what="every scan restored")
        journal = Journal(PostgresConnector(postgres_dsn, read_only=True))
        wait_for(lambda: journal.counts_by_state() == {"done": 8}, 20, what="every job done")
        assert all(count == 1 for count in emulator.submits_by_content().values())
        assert len(emulator.submits_by_content()) == 8
        status = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--json", "--config",
                                 str(tmp_path / "north.yaml")], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        fleet = json.loads(status.stdout)["fleet"]
        assert sorted(n["node"] for n in fleet if n["alive"]) == ["north", "south"]
    finally:
        for station in stations:
            station.kill()
