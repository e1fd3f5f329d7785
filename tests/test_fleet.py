"""Several daemons, one queue: two real daemon processes on one shared inbox and one PostgreSQL journal."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from daemon.journal import IN_FLIGHT_STATES, Journal, JobState
from daemon.storage.postgresql import PostgresConnector

from .conftest import DaemonProcess, config_mapping, drop_scan, visible_files, wait_for, write_config


def fleet_config(tmp_path: Path, folders: dict[str, Path], emulator, dsn: str, node: str, **overrides) -> Path:
    """A station's configuration: the shared folders and database, a state folder of its own."""
    state = tmp_path / f"state-{node}"
    lease_seconds = overrides.pop("lease_seconds", 3)  # a state.postgresql setting, not a section
    mapping = config_mapping(folders, emulator, **overrides)
    mapping["state_dir"] = str(state)
    mapping["state"] = {"backend": "postgresql", "node_name": node,
                        "postgresql": {"dsn": dsn, "lease_seconds": lease_seconds}}
    return write_config(tmp_path / f"{node}.yaml", mapping)


def start_station(tmp_path: Path, config: Path, node: str) -> DaemonProcess:
    return DaemonProcess(config, tmp_path / f"{node}.log").start()


def read_journal(dsn: str) -> contextlib.closing[Journal]:
    """The fleet's journal, read-only, for a `with` block: closed when the block ends."""
    return contextlib.closing(Journal(PostgresConnector(dsn, read_only=True)))


class Stations:
    """The station processes a test started, each killed at teardown however the test ended."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[DaemonProcess] = []

    def start(self, config: Path, node: str, log_name: str | None = None) -> DaemonProcess:
        """Station `node` on `config`; a station started again gets a log of its own, `log_name`."""
        station = start_station(self.tmp_path, config, log_name or node)
        self.started.append(station)
        return station

    def __iter__(self) -> Iterator[DaemonProcess]:
        return iter(self.started)


@pytest.fixture
def stations(tmp_path: Path, emulator) -> Iterator[Stations]:
    """`stations.start(config, node)` starts a station; every one is killed at teardown. Asks for the
    emulator so that they are killed before it stops."""
    started = Stations(tmp_path)
    yield started
    for station in started:
        station.kill()


@pytest.fixture
def journal(postgres_dsn: str) -> Iterator[Journal]:
    """The shared journal, read-only, for the test to watch; closed at teardown."""
    with read_journal(postgres_dsn) as reader:
        yield reader


@pytest.fixture
def own_postgres_server():
    """A PostgreSQL server for one test alone, to stop and start; ask for it before `stations`, so that
    the stations are killed before it stops."""
    from .postgres_server import PostgresServer

    with PostgresServer() as server:
        yield server


def test_two_stations_share_one_queue(tmp_path, folders, emulator, postgres_dsn, stations, journal):
    for n in ("north", "south"):
        stations.start(fleet_config(tmp_path, folders, emulator, postgres_dsn, n), n)
    for station in stations:
        station.wait_ready()
    names = [f"album/scan-{i}.jpg" for i in range(8)]
    for i, name in enumerate(names):
        drop_scan(folders, name, seed=i)
    wait_for(lambda: all((folders["outbox"] / name).with_suffix(".png").exists() for name in names), 60,
             what="every scan restored")
    wait_for(lambda: journal.counts_by_state() == {"done": 8}, 20, what="every job done")
    assert all(count == 1 for count in emulator.submits_by_content().values())
    assert len(emulator.submits_by_content()) == 8
    status = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--json", "--config",
                             str(tmp_path / "north.yaml")], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    fleet = json.loads(status.stdout)["fleet"]
    assert sorted(n["node"] for n in fleet if n["alive"]) == ["north", "south"]


# --------------------------------------------------------------------------- the fleet's promises, one by one


def named(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e.get("event") == name]


def logged_at(event: dict) -> float:
    """Wall time of a log line (its ISO timestamp, UTC)."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def run_token(journal: Journal, node: str) -> str | None:
    """The token of the newest run of daemon `node`."""
    return next((n.token for n in journal.nodes() if n.name == node), None)


def output_for(folders: dict[str, Path], name: str) -> Path:
    return (folders["outbox"] / name).with_suffix(".png")


def held_jobs(journal: Journal, state: JobState, token: str | None) -> list[int]:
    return [int(r[0]) for r in journal.read("SELECT id FROM jobs WHERE state = ? AND owner = ? ORDER BY id",
                                             (state.value, token))]


def insert_attempts(journal: Journal) -> int:
    """Values the jobs' id sequence has handed out: PostgreSQL draws one for every INSERT tried, also one
    that ON CONFLICT DO NOTHING then drops, so two stations recording the same file draw two."""
    row = journal.read("SELECT last_value, is_called FROM jobs_id_seq")[0]
    return int(row[0]) if row[1] else 0


def test_one_new_file_seen_by_two_stations_is_one_job_and_one_submit(tmp_path, folders, emulator, postgres_dsn,
                                                                     stations, journal):
    """Both stations watch the inbox and both see each new file settle at the same moment: the
    journal's unique index lets one record it, and only that one job is ever sent."""
    for n in ("north", "south"):
        stations.start(fleet_config(tmp_path, folders, emulator, postgres_dsn, n), n)
    for station in stations:
        station.wait_ready()
    wait_for(lambda: len([n for n in journal.nodes() if n.left_at is None]) == 2, 10, what="both stations joined")
    names = [f"race-{i}.jpg" for i in range(3)]
    raced = 0
    for i, name in enumerate(names):  # one file at a time: each is its own race between two idle stations
        tried_before = insert_attempts(journal)
        drop_scan(folders, name, seed=100 + i)
        wait_for(lambda: output_for(folders, name).exists(), 30, what=f"{name} restored")
        wait_for(lambda: [r["state"] for r in journal.read("SELECT state FROM jobs WHERE rel_path = ?", (name,))]
                 == ["done"], 10, what=f"{name}: one job, done")
        # Let both stations look again (settle, a loop pass) before counting who tried to record it.
        time.sleep(1.0)
        assert len(journal.read("SELECT id FROM jobs WHERE rel_path = ?", (name,))) == 1
        raced += insert_attempts(journal) - tried_before >= 2
    assert raced >= 1, "the two stations never tried to record the same file at once: no race was run"
    assert sorted(emulator.submits_by_content().values()) == [1, 1, 1]
    assert emulator.stats()["submits_received"] == 3
    assert visible_files(folders["outbox"]) == sorted(output_for(folders, n) for n in names)
    assert journal.counts_by_state() == {"done": 3}


def test_a_killed_stations_jobs_are_finished_by_another_without_a_second_submit(tmp_path, folders, emulator,
                                                                                postgres_dsn, stations, journal):
    """East is SIGKILLed while its jobs are at the provider: West takes them over once East's lease
    lapses and delivers them by polling (never submitting again); East, started again as a new run
    while West holds them, leaves them alone."""
    emulator.latency = 14.0  # long enough that the jobs are still at the provider when East comes back
    east_config = fleet_config(tmp_path, folders, emulator, postgres_dsn, "east")
    west_config = fleet_config(tmp_path, folders, emulator, postgres_dsn, "west")
    east = stations.start(east_config, "east")
    east.wait_ready()
    names = [f"held-{i}.jpg" for i in range(3)]
    for i, name in enumerate(names):
        drop_scan(folders, name, seed=200 + i)
    east_token = wait_for(lambda: run_token(journal, "east"), 10, what="east's run in the journal")
    ids = wait_for(lambda: (found := held_jobs(journal, JobState.SUBMITTED, east_token)) and len(found) == 3
                   and found, 30, what="three jobs at the provider, held by east")
    # The provider has fetched every scan, so east's built-in host may go with it.
    wait_for(lambda: len(emulator.submits_by_content()) == 3, 10, what="the provider fetched every scan")

    west = stations.start(west_config, "west")
    west.wait_ready()
    assert held_jobs(journal, JobState.SUBMITTED, east_token) == ids  # east's lease is live: west took nothing
    east.kill()
    took = wait_for(lambda: named(west.events(), "fleet.took_over"), 20, what="west takes east's jobs over")
    assert sorted(took[0]["job_ids"]) == ids
    assert took[0]["states"] == ["submitted"]
    east_lease_until = next(n.lease_until for n in journal.nodes() if n.token == east_token)
    assert logged_at(took[0]) >= east_lease_until - 0.05, "taken over before east's lease lapsed"
    west_token = run_token(journal, "west")
    assert held_jobs(journal, JobState.SUBMITTED, west_token) == ids, \
        "the jobs left the provider before east came back: the test would show nothing (raise the latency)"

    east_again = stations.start(east_config, "east", log_name="east-again")
    east_again.wait_ready()
    wait_for(lambda: all(output_for(folders, n).exists() for n in names), 30, what="every scan restored")
    wait_for(lambda: journal.counts_by_state() == {"done": 3}, 10, what="every job done")
    # East's new run has had its takeover checks (every 2 s) since, with the jobs still at the provider.
    again_token = run_token(journal, "east")
    assert again_token != east_token
    wait_for(lambda: next(n.heartbeat_at - n.started_at for n in journal.nodes() if n.token == again_token) >= 4.5,
             15, what="east's new run renewed its lease for a while")

    assert sorted(emulator.submits_by_content().values()) == [1, 1, 1]
    assert emulator.stats()["submits_received"] == 3
    west_events = west.events()
    for event in ("job.completed", "job.delivered", "job.done"):
        assert sorted(e["job_id"] for e in named(west_events, event)) == ids, event
    again_events = east_again.events()
    assert not [e for e in again_events if e.get("job_id") in ids], "east's new run touched jobs west holds"
    assert not named(again_events, "fleet.took_over")
    assert not [h for i in ids for h in journal.history(i) if h["to_state"] == "failing"]


def in_flight_at_once(jobs: list[dict]) -> int:
    """The most of these provider jobs that were accepted and unfinished at one moment."""
    marks = sorted([(j["submitted_at"], 1) for j in jobs] + [(j["finished_at"], -1) for j in jobs],
                   key=lambda m: (m[0], m[1]))  # a job finishing at the instant another starts is not overlap
    peak = current = 0
    for _, step in marks:
        current += step
        peak = max(peak, current)
    return peak


def test_the_fleet_never_has_more_than_max_in_flight_at_the_provider(tmp_path, folders, emulator, postgres_dsn,
                                                                     stations, journal):
    """api.max_in_flight is the fleet's limit (it is the API key's), not each station's: three stations,
    twelve files, never more than two jobs at the provider. The first two fill the fleet's slots while
    the other stations are idle, with room of their own: had each its own limit, they would send more."""
    emulator.latency = 1.5
    emulator.max_concurrent = 2  # a third job at once would wait QUEUED at the provider
    for n in ("one", "two", "three"):
        stations.start(fleet_config(tmp_path, folders, emulator, postgres_dsn, n, api={"max_in_flight": 2}), n)
    peak_in_journal = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak_in_journal
        with read_journal(postgres_dsn) as watcher:
            while not sampling.wait(0.02):
                in_flight = watcher.count_in(*IN_FLIGHT_STATES)
                peak_in_journal = max(peak_in_journal, in_flight)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        for station in stations:
            station.wait_ready()
        sampler.start()
        names = [f"burst/scan-{i:02d}.jpg" for i in range(12)]
        for i, name in enumerate(names[:2]):
            drop_scan(folders, name, seed=300 + i)
        wait_for(lambda: journal.count_in(JobState.SUBMITTED) == 2, 20, what="the fleet's two slots taken")
        for i, name in enumerate(names[2:], start=2):
            drop_scan(folders, name, seed=300 + i)
        wait_for(lambda: all(output_for(folders, n).exists() for n in names), 90, what="every scan restored")
        wait_for(lambda: journal.counts_by_state() == {"done": 12}, 10, what="every job done")
        sampling.set()
        sampler.join(5)

        stats = emulator.stats()
        assert stats["rejected"] == {}
        assert sorted(emulator.submits_by_content().values()) == [1] * 12
        assert in_flight_at_once(stats["jobs"]) <= 2
        assert all(j["started_at"] - j["submitted_at"] < 0.05 for j in stats["jobs"]), "a job waited for a slot"
        assert 1 <= peak_in_journal <= 2
    finally:
        sampling.set()


def test_an_empty_wallet_heard_by_one_station_pauses_every_station(tmp_path, folders, emulator, postgres_dsn,
                                                                  stations):
    """A 402 is the API key's wallet, so one station's refusal pauses all: the other hears it from
    the journal within a couple of seconds, without a 402 of its own; a top-up resumes both."""
    emulator.balance = 0
    for n in ("left", "right"):
        stations.start(fleet_config(tmp_path, folders, emulator, postgres_dsn, n), n)
    for station in stations:
        station.wait_ready()
    drop_scan(folders, "wallet/first.jpg", seed=400)
    pauses = wait_for(lambda: (found := [named(s.events(), "submits.paused") for s in stations]) and all(found)
                      and found, 10, what="every station paused")
    assert all(len(p) == 1 for p in pauses)
    heard_from_fleet = [p[0]["detail"] == "another daemon of the fleet" for p in pauses]
    assert sorted(heard_from_fleet) == [False, True], [p[0]["detail"] for p in pauses]
    assert all(p[0]["reason"] == "insufficient balance" for p in pauses)
    refused, follower = (pauses[0][0], pauses[1][0]) if heard_from_fleet[1] else (pauses[1][0], pauses[0][0])
    assert logged_at(follower) - logged_at(refused) < 3.0  # an idle loop naps up to 2 s between passes
    assert emulator.stats()["rejected"] == {"402": 1}

    # More files while paused: they wait in the inbox, nobody tries them.
    later = [f"wallet/later-{i}.jpg" for i in range(4)]
    for i, name in enumerate(later):
        drop_scan(folders, name, seed=410 + i)
    with read_journal(postgres_dsn) as journal:
        wait_for(lambda: journal.counts_by_state().get("pending") == 5, 10, what="five files waiting")
        time.sleep(1.5)
        assert journal.counts_by_state() == {"pending": 5}
    assert emulator.stats()["submits_accepted"] == 0
    refusals = emulator.stats()["rejected"].get("402", 0)
    assert refusals <= 2  # the first refusal, perhaps one probe: the follower sent none

    # A station stopping for the night takes nothing of the fleet's pause with it: `status` still says it.
    follower_station = next(s for s, heard in zip(stations, heard_from_fleet) if heard)
    assert follower_station.terminate() == 0
    assert "paused: insufficient balance" in fleet_status(tmp_path, "left"), "the pause left with a station"

    emulator.balance = 100  # topped up: the refused station's probe goes through and it resumes
    names = ["wallet/first.jpg", *later]
    wait_for(lambda: all(output_for(folders, n).exists() for n in names), 40, what="every scan restored")
    refused_station = next(s for s, heard in zip(stations, heard_from_fleet) if not heard)
    wait_for(lambda: named(refused_station.events(), "submits.resumed"), 10, what="the station resumed")
    assert sorted(emulator.submits_by_content().values()) == [1] * 5
    assert emulator.stats()["rejected"].get("402", 0) <= refusals + 1  # perhaps one more probe before the top-up
    wait_for(lambda: "paused" not in fleet_status(tmp_path, "left"), 10, what="status no longer paused")


def fleet_status(tmp_path: Path, node: str) -> str:
    """`status` as a person runs it on station `node`."""
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--config", str(tmp_path / f"{node}.yaml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_station_that_loses_the_share_holds_up_no_other(tmp_path, folders, emulator, postgres_dsn, stations,
                                                          journal):
    """Each station mounts the NAS itself. When one station's mount goes (here: its path to the shared
    inbox goes away), `status` names that station and why, and the other station goes on restoring every scan: another station's lost share
    is no reason to hold its own jobs. When the mount is back, `status` says nothing of it any more."""
    mount_point = tmp_path / "south-mount"
    mount_point.symlink_to(folders["inbox"], target_is_directory=True)
    south_folders = dict(folders, inbox=mount_point)
    stations.start(fleet_config(tmp_path, folders, emulator, postgres_dsn, "north"), "north")
    stations.start(fleet_config(tmp_path, south_folders, emulator, postgres_dsn, "south"), "south")
    for station in stations:
        station.wait_ready()

    mount_point.unlink()  # the share gone from south
    wait_for(lambda: "unavailable" in fleet_status(tmp_path, "north"), 10, what="status naming south's inbox")
    [said] = [line for line in fleet_status(tmp_path, "north").splitlines() if line.startswith("inbox:")]
    assert said.startswith("inbox: unavailable (on south: ") and "north" not in said, said

    names = [f"share/scan-{i}.jpg" for i in range(4)]
    for i, name in enumerate(names):
        drop_scan(folders, name, seed=600 + i)
    wait_for(lambda: all(output_for(folders, n).exists() for n in names), 40, what="north restoring every scan")
    wait_for(lambda: journal.counts_by_state() == {"done": 4}, 10, what="every job done")
    # A scan a person takes back out of the inbox while it is at the provider: north, whose inbox is
    # there, sees it was deleted rather than lost with a share, and finishes the job.
    emulator.latency = 2.0
    drop_scan(folders, "share/taken-back.jpg", seed=610)
    wait_for(lambda: journal.count_in(JobState.SUBMITTED) == 1, 20, what="the scan at the provider")
    (folders["inbox"] / "share/taken-back.jpg").unlink()
    wait_for(lambda: journal.counts_by_state() == {"done": 5}, 20, what="its job done without the original")
    assert output_for(folders, "share/taken-back.jpg").exists()
    assert not named(stations.started[0].events(), "job.waiting_for_inbox")
    assert sorted(emulator.submits_by_content().values()) == [1] * 5

    mount_point.symlink_to(folders["inbox"], target_is_directory=True)  # remounted
    wait_for(lambda: "inbox:" not in fleet_status(tmp_path, "north"), 15, what="status clear of south's share")


def test_a_station_rides_out_its_database_going_away(tmp_path, folders, emulator, own_postgres_server, stations):
    """The journal's server stops while jobs are at the provider and new files arrive: the station keeps
    running, says so once, loses no file, and when the server is back says so and finishes them all.

    A server of its own: the session's shared one must not go away under other tests."""
    emulator.latency = 2.0
    dsn = own_postgres_server.create_database()
    station = stations.start(fleet_config(tmp_path, folders, emulator, dsn, "solo"), "solo")
    station.wait_ready()
    first = [f"outage/before-{i}.jpg" for i in range(3)]
    for i, name in enumerate(first):
        drop_scan(folders, name, seed=500 + i)
    with read_journal(dsn) as journal:
        wait_for(lambda: journal.count_in(JobState.SUBMITTED) == 3, 20, what="three jobs at the provider")

    own_postgres_server.stop()
    try:
        wait_for(lambda: named(station.events(), "journal.unavailable"), 10, what="journal.unavailable")
        during = [f"outage/during-{i}.jpg" for i in range(3)]
        for i, name in enumerate(during):
            drop_scan(folders, name, seed=510 + i)
        time.sleep(7.0)  # longer than the lease, the settle time, the jobs' time at the provider
        assert station.proc.poll() is None, "the station stopped with its database"
        for name in first + during:  # nothing moved without the journal's word: every scan still there
            assert (folders["inbox"] / name).exists(), name
    finally:
        own_postgres_server.start()
    wait_for(lambda: named(station.events(), "journal.available"), 15, what="journal.available")
    names = first + during
    wait_for(lambda: all(output_for(folders, n).exists() or (folders["failed"] / f"{n}.error.json").exists()
                         for n in names), 60, what="every scan restored or failed")
    with read_journal(dsn) as journal:
        wait_for(lambda: sum(journal.counts_by_state().get(s, 0) for s in ("done", "failed")) == 6, 10,
                 what="every job finished")
    for name in names:
        finished = [output_for(folders, name).exists(), (folders["failed"] / f"{name}.error.json").exists()]
        assert sorted(finished) == [False, True], name
    assert sorted(emulator.submits_by_content().values()) == [1] * 6
    events = station.events()
    assert len(named(events, "journal.unavailable")) == 1
    assert len(named(events, "journal.available")) == 1
    assert named(events, "journal.available")[0]["down_for"] >= 7.0


def test_a_built_in_host_job_its_station_took_down_goes_back_to_wait(tmp_path, folders, emulator, postgres_dsn,
                                                                     stations, journal):
    """East publishes through its own built-in host, submits, and dies before the provider comes for the
    scan. West takes the job over; the provider reports it could not fetch the scan, and since the copy
    it was to fetch died with east, the job goes back to wait and west sends it again (its own host
    serving it) rather than failing it. Fleets should publish through S3, WebDAV or a command."""
    emulator.fetch_delay = 6.0  # the provider comes for the scan only after east is gone
    east = stations.start(fleet_config(tmp_path, folders, emulator, postgres_dsn, "east"), "east")
    east.wait_ready()
    drop_scan(folders, "fragile.jpg", seed=300)
    east_token = wait_for(lambda: run_token(journal, "east"), 10, what="east's run in the journal")
    [job_id] = wait_for(lambda: held_jobs(journal, JobState.SUBMITTED, east_token), 20,
                        what="the job at the provider, held by east")
    east.kill()  # before west starts, however slowly: the provider must find east's host gone
    west = stations.start(fleet_config(tmp_path, folders, emulator, postgres_dsn, "west"), "west")
    west.wait_ready()
    wait_for(lambda: output_for(folders, "fragile.jpg").exists(), 60, what="restored by west")
    assert not list(folders["failed"].rglob("*.error.json"))
    waits = [h for h in journal.history(job_id) if h["from_state"] == "submitted" and h["to_state"] == "pending"]
    assert len(waits) == 1 and "could not fetch" in waits[0]["detail"]
    assert emulator.stats()["submits_received"] == 2, "sent again, once, after the first could not be fetched"
    assert named(west.events(), "fleet.took_over")[0]["job_ids"] == [job_id]


def test_a_station_starting_beside_a_live_one_leaves_the_shared_folders_alone(tmp_path, folders, emulator,
                                                                                postgres_dsn, stations, journal):
    """A half-written output in the shared outbox may be a live station's delivery in progress: a
    station starting beside it must not clean it away. A station starting alone does."""
    north_config = fleet_config(tmp_path, folders, emulator, postgres_dsn, "north")
    south_config = fleet_config(tmp_path, folders, emulator, postgres_dsn, "south")
    folders["outbox"].mkdir(parents=True)
    in_progress = folders["outbox"] / ".codeformer-0123456789abcdef.tmp"
    north = stations.start(north_config, "north")
    north.wait_ready()
    # North's own start-up clean-up (alone, it cleans everything) comes before its loop renews its lease.
    wait_for(lambda: any(n.name == "north" and n.heartbeat_at - n.started_at >= 1.0 for n in journal.nodes()), 10,
             what="north past its start-up, renewing its lease")
    in_progress.write_bytes(b"half of a delivery")
    leftover = folders["outbox"] / ".codeformer-fedcba9876543210.tmp"
    leftover.write_bytes(b"a crash's leftover, untouched for seven hours")
    os.utime(leftover, (time.time() - 7 * 3600,) * 2)
    south = stations.start(south_config, "south")
    south.wait_ready()
    wait_for(lambda: named(south.events(), "recover.cleaned") or not leftover.exists(), 10,
             what="south's start-up clean-up")
    assert in_progress.exists(), "south removed what may be north's delivery in progress"
    assert not leftover.exists(), "a temporary file untouched for hours is a crash's leftover"
    assert north.terminate() == 0 and south.terminate() == 0  # clean stops: both leases end now
    alone = stations.start(south_config, "south", log_name="south-alone")
    alone.wait_ready()
    wait_for(lambda: named(alone.events(), "recover.cleaned"), 10, what="the start-up clean-up of a station alone")
    assert not in_progress.exists(), "a station alone cleans up a crash's leftovers"
    assert named(alone.events(), "recover.cleaned")[0]["temporary_files_removed"] == 1
