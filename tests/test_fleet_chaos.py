"""A fleet under SIGKILL: three daemon processes on one inbox and one PostgreSQL journal, killed at
random moments and started again, some before their lease lapses and some after. Every scan still
ends exactly once, nothing is paid for twice, and the fleet never holds more than api.max_in_flight.

The seed is printed (and named in every failure); FLEET_CHAOS_SEED=<n> runs one again.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.jobs import FINAL_STATES, IN_FLIGHT_STATES, JobState
from daemon.outbox import is_temporary

from .conftest import DaemonProcess, free_port, visible_files, wait_for
from .test_fleet import fleet_config, read_journal, start_station
from .test_restart import accounted_for, drop

STATIONS = ("north", "south", "east")
MAX_IN_FLIGHT = 3
LEASE_SECONDS = 3  # the shortest allowed: takeovers come quickly
PROVIDER_LATENCY = 1.5


@dataclass
class Station:
    """One daemon of the fleet: its configuration, and the process now running it (if any)."""

    node: str
    config: Path
    tmp_path: Path
    proc: DaemonProcess | None = None
    ready_before: int = 0
    """daemon.ready lines in its log before its latest start: the latest run is ready past this."""
    restart_at: float | None = None
    """When a killed station starts again (monotonic); None while it runs."""

    @property
    def log(self) -> Path:
        return self.tmp_path / f"{self.node}.log"

    def ready_lines(self) -> int:
        if not self.log.exists():
            return 0
        return self.log.read_text(errors="replace").count('"daemon.ready"')

    def start(self) -> None:
        self.ready_before = self.ready_lines()
        self.proc = start_station(self.tmp_path, self.config, self.node)
        self.restart_at = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.restart_at is None

    def kill(self, pause: float) -> None:
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(10)
        self.restart_at = time.monotonic() + pause

    def exited_by_itself(self) -> bool:
        return self.running and self.proc.proc.poll() is not None

    def ready(self) -> bool:
        if self.exited_by_itself():
            pytest.fail(f"{self.node} exited by itself: {self.log.read_text(errors='replace')[-4000:]}")
        return self.ready_lines() > self.ready_before


def fleet_settled(dsn: str) -> bool:
    """Every job final and none held by any run: past this, no daemon can submit or move anything."""
    with read_journal(dsn) as journal:
        unfinished = journal.count_in(*(set(JobState) - FINAL_STATES))
        held = journal.read("SELECT count(*) FROM jobs WHERE owner IS NOT NULL")[0][0]
        return unfinished == 0 and held == 0


@dataclass
class Tally:
    """What the kills did, for the summary printed with every run."""

    kills: int = 0
    back_within_lease: int = 0
    arrived_while_down: int = 0


def run_fleet_chaos(tmp_path, folders, emulator, dsn: str, *, files: int, kills: int, seed: int) -> None:
    print(f"fleet chaos seed: {seed} (FLEET_CHAOS_SEED={seed} runs it again)")
    said = f"[seed {seed}]"
    rng = random.Random(seed)
    emulator.latency = PROVIDER_LATENCY
    emulator.max_concurrent = MAX_IN_FLIGHT
    stations = [Station(node, station_config(tmp_path, folders, emulator, dsn, node), tmp_path) for node in STATIONS]
    staging = tmp_path / "staging"
    staging.mkdir()
    names = [f"batch-{i // 6}/scan-{i:03d}.jpg" for i in range(files)]
    rounds = [names[i::kills + 1] for i in range(kills + 1)]
    tally = Tally()
    first_quick = rng.randrange(2)

    def arrive(batch: list[str]) -> None:
        for name in batch:
            drop(folders["inbox"], staging, name, seed=names.index(name))

    try:
        for station in stations:
            station.start()
        for station in stations:
            wait_for(station.ready, 30, what=f"{station.node} ready")
        for number, batch in enumerate(rounds[:-1]):
            # Some kills catch a station just as it submits (always the second and third), among the
            # files just arrived; some rounds arrive just after their kill, while its station is down
            # (always the last).
            at_submit = number in (1, 2) or rng.random() < 0.3
            while_down = number == kills - 1 or (not at_submit and rng.random() < 0.5)
            if not while_down:
                arrive(batch)
            work_for(rng.uniform(0.0, 1.0) if at_submit else rng.uniform(0.5, 4.0), stations)
            # Back before its lease lapses (its old run's jobs wait for it to lapse all the same), or
            # well after (another station has taken them over by then); each at least once.
            quick = tally.kills == first_quick if tally.kills < 2 else rng.random() < 0.5
            kill_one(rng, stations, dsn, quick, at_submit, tally)
            if while_down:
                tally.arrived_while_down += len(batch)
                arrive(batch)
        arrive(rounds[-1])
        while not all(s.running for s in stations):
            work_for(0.05, stations)
        for station in stations:
            wait_for(station.ready, 30, what=f"{station.node} ready again {said}")
        print(f"{tally.kills} kills ({tally.back_within_lease} back within the lease); "
              f"{tally.arrived_while_down} files arrived while a station was down")
        try:
            wait_for(lambda: accounted_for(folders, names), 60 + 2 * files, interval=0.2,
                     what=f"every input accounted for {said}")
            wait_for(lambda: fleet_settled(dsn), 30, interval=0.2, what=f"every job final and let go {said}")
        except BaseException:
            print(where_things_stand(dsn, folders))
            raise
        assert emulator.wait_idle(20), f"{said} the provider is still working on something"
        for station in stations:
            station.proc.proc.send_signal(signal.SIGTERM)
        for station in stations:
            assert station.proc.proc.wait(30) == 0, f"{said} {station.node} did not stop cleanly"
    finally:
        for station in stations:
            if station.proc is not None:
                station.proc.kill()

    events = logged(stations)
    print(what_happened(events, emulator))
    check_every_scan_ended_once(folders, names, said)
    check_no_live_run_lost_a_job(events, said)
    check_the_journal(dsn, names, said)
    check_nothing_paid_twice(emulator, dsn, folders, said)
    assert emulator.peak_unfinished <= MAX_IN_FLIGHT, \
        f"{said} the provider held {emulator.peak_unfinished} jobs at once; api.max_in_flight is {MAX_IN_FLIGHT}"


def station_config(tmp_path: Path, folders, emulator, dsn: str, node: str) -> Path:
    return fleet_config(
        tmp_path, folders, emulator, dsn, node, lease_seconds=LEASE_SECONDS,
        api={"poll_interval": 0.1, "max_in_flight": MAX_IN_FLIGHT},
        # A fixed port per station: a station started again serves its scans where the provider looks.
        hosting={"adapter": "builtin", "builtin": {"listen": f"127.0.0.1:{free_port()}"}},
        watch={"settle_seconds": 0.2, "rescan_seconds": 2},
        logging={"format": "json", "level": "debug"},  # debug: job.stale, a move refused as stale
        shutdown_timeout=5)


def work_for(seconds: float, stations: list[Station]) -> None:
    """Let the fleet work, starting killed stations again when their pause is over; at least one runs."""
    until = time.monotonic() + seconds
    while time.monotonic() < until or not any(s.running for s in stations):
        restart_due(stations)
        time.sleep(0.05)


def kill_one(rng: random.Random, stations: list[Station], dsn: str, quick: bool, at_submit: bool,
             tally: Tally) -> None:
    """SIGKILL one running station, to start again after a pause within the lease (`quick`) or past it.

    `at_submit`: the next station to publish a scan, a few milliseconds later: before, while or after
    its submit is sent, the ambiguous window. Otherwise mostly one that holds jobs now (a kill is a
    test only where there is work to lose).
    """
    victim, moment = None, "at random"
    if at_submit:
        delay = rng.uniform(0.0, 0.04)
        victim = next_to_publish(stations, timeout=6.0)
        if victim is not None:
            time.sleep(delay)
            moment = f"{delay * 1000:.0f} ms after a publication"
    if victim is None:
        running = [s for s in stations if s.running]
        holding = holders(dsn, running)
        victim = rng.choice(holding if holding and rng.random() < 0.75 else running)
    pause = rng.uniform(0.2, 1.5) if quick else rng.uniform(LEASE_SECONDS + 0.5, LEASE_SECONDS + 3.0)
    victim.kill(pause)
    tally.kills += 1
    tally.back_within_lease += quick
    print(f"kill {tally.kills}: {victim.node} {moment}, back in {pause:.1f}s, "
          f"{sum(not s.running for s in stations)} down")


def next_to_publish(stations: list[Station], timeout: float) -> Station | None:
    """The first running station to log a publication from now (its submit is sent right after); None
    if none did within `timeout`. Killed stations are started again meanwhile, when their time comes."""
    with contextlib.ExitStack() as stack:
        logs = [(station, stack.enter_context(open(station.log, "rb"))) for station in stations]
        for _station, log in logs:
            log.seek(0, os.SEEK_END)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            restart_due(stations)
            for station, log in logs:
                if b'"file.published"' in log.read() and station.running:
                    return station
            time.sleep(0.002)
    return None


def check_the_journal(dsn: str, names: list[str], said: str) -> None:
    """One job per scan, every one final and let go, and never more in flight than the limit: replayed
    from the journal's history (a move's time is read after the claim's lock, so time order is
    the order the claims saw)."""
    with read_journal(dsn) as journal:
        jobs = journal.read_jobs("SELECT * FROM jobs")
        events = journal.read("SELECT job_id, from_state, to_state FROM job_events ORDER BY at, id")
    assert sorted(j.rel_path for j in jobs) == sorted(names), f"{said} one job per scan"
    assert fleet_settled(dsn), f"{said} a job moved or was held again after the fleet stopped"
    in_flight: set[int] = set()
    most = 0
    for job_id, _from_state, to_state in events:
        if JobState(to_state) in IN_FLIGHT_STATES:
            in_flight.add(job_id)
        else:
            in_flight.discard(job_id)
        most = max(most, len(in_flight))
    assert most <= MAX_IN_FLIGHT, f"{said} the journal had {most} jobs in flight at once"


def holders(dsn: str, stations: list[Station]) -> list[Station]:
    """Of `stations`, those whose running process holds a job now."""
    with read_journal(dsn) as journal:
        pids = {n.pid for n in journal.nodes() if n.holding and n.left_at is None}
    return [s for s in stations if s.proc.proc.pid in pids]


def where_things_stand(dsn: str, folders) -> str:
    """For a failure's output: the unfinished jobs, who holds them, and the fleet's runs."""
    with read_journal(dsn) as journal:
        lines = [f"job {j.id} {j.rel_path}: {j.state.value} owner={j.owner} error={j.last_error}"
                 for j in journal.read_jobs("SELECT * FROM jobs WHERE state NOT IN ('done', 'failed', 'vanished') "
                                            "OR owner IS NOT NULL ORDER BY id")]
        now = journal.database_time()
        lines += [f"run {n.name} {n.token}: lease {n.lease_until - now:+.1f}s, left={n.left_at is not None}, "
                  f"holding {n.holding}" for n in journal.nodes()]
    lines += [f"in the inbox: {p}" for p in visible_files(folders["inbox"])]
    return "\n".join(lines)


def logged(stations: list[Station]) -> list[dict]:
    """Every event the stations logged, all their runs."""
    events = []
    for station in stations:
        for line in station.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def what_happened(events: list[dict], emulator) -> str:
    """The run in numbers: how much the kills left for others to carry on."""
    counts: dict[str, int] = {}
    for event in events:
        name = event.get("event", "")
        if name in ("fleet.took_over", "job.ambiguous_at_restart", "job.resumed", "job.failed", "job.done"):
            counts[name] = counts.get(name, 0) + 1
    taken_over = sum(e.get("jobs", 0) for e in events if e.get("event") == "fleet.took_over")
    return (f"events: {dict(sorted(counts.items()))}, jobs taken over: {taken_over}, "
            f"submits accepted: {emulator.stats()['submits_accepted']}, peak unfinished at the provider: "
            f"{emulator.peak_unfinished}")


def check_no_live_run_lost_a_job(events: list[dict], said: str) -> None:
    """Only a run that went silent (killed) loses what it holds: a running daemon that found a job of
    its own taken over (its move refused as stale "here") means a lease lapsed under a live daemon."""
    lost = [e for e in events if e.get("event") == "job.stale" and str(e.get("error", "")).endswith(" here")]
    assert lost == [], f"{said} a running daemon lost jobs it held: {lost[:5]}"
    assert not [e for e in events if e.get("event") == "fleet.lease_lost"], f"{said} a running daemon lost its lease"


def restart_due(stations: list[Station]) -> None:
    for station in stations:
        if station.restart_at is not None and time.monotonic() >= station.restart_at:
            station.start()
        elif station.exited_by_itself():
            pytest.fail(f"{station.node} exited by itself: {station.log.read_text(errors='replace')[-4000:]}")


def failed_record(folders, name: str) -> dict | None:
    path = folders["failed"] / (name + ".error.json")
    return json.loads(path.read_text()) if path.exists() else None


def check_every_scan_ended_once(folders, names: list[str], said: str) -> None:
    """One output or one failed record per scan, never both, nothing numbered or left half-written."""
    for name in names:
        output = folders["outbox"] / Path(name).with_suffix(".png")
        record = folders["failed"] / (name + ".error.json")
        assert output.exists() != record.exists(), f"{said} {name}: exactly one of output / failed record"
    outputs = visible_files(folders["outbox"])
    records = list(folders["failed"].rglob("*.error.json"))
    assert len(outputs) + len(records) == len(names), f"{said} no extra (numbered or partial) outputs: {outputs}"
    # A station killed mid-write leaves its hidden temporary file: only a daemon starting alone may
    # remove those (another one's may be still being written), so in a fleet they can stay.
    hidden = [p for p in folders["outbox"].rglob(".*") if p.is_file()]
    assert all(is_temporary(p) for p in hidden), f"{said} hidden files in the outbox: {hidden}"
    assert visible_files(folders["inbox"]) == [], f"{said} the inbox is empty"
    archived = visible_files(folders["archive"])
    assert len(archived) == len(outputs), f"{said} every restored original is archived, once"


def check_nothing_paid_twice(emulator, dsn: str, folders, said: str) -> None:
    """No content submitted twice; a failed scan failed for the one window a kill leaves open (its
    submit may or may not have gone out), or because the provider could not fetch a scan whose
    station was killed before it did."""
    twice = {sha: n for sha, n in emulator.submits_by_content().items() if n > 1}
    assert twice == {}, f"{said} contents submitted twice: {twice}"
    with read_journal(dsn) as journal:
        jobs = journal.read_jobs("SELECT * FROM jobs")
    by_path = {job.rel_path: job for job in jobs}
    submitted_keys = [emulator_job["image_url"].rsplit("/", 1)[-1] for emulator_job in emulator.stats()["jobs"]]
    assert len(submitted_keys) == len(set(submitted_keys)), f"{said} one publication submitted twice"
    for rel_path, job in by_path.items():
        record = failed_record(folders, rel_path)
        if job.state is JobState.DONE:
            assert record is None
            continue
        assert job.state is JobState.FAILED, f"{said} {rel_path} is {job.state.value}"
        assert record is not None and record["job_id"] == job.id, f"{said} {rel_path}: its own failed record"
        assert record["stage"] in ("submit_ambiguous", "provider_failed"), f"{said} {rel_path}: {record}"
        if record["stage"] != "submit_ambiguous":
            assert "Could not fetch image" in json.dumps(record), f"{said} {rel_path}: {record}"
    assert len(emulator.stats()["jobs"]) <= len(by_path), f"{said} more submits accepted than scans"


def chaos_seed(default: int) -> int:
    return int(os.environ.get("FLEET_CHAOS_SEED", default))


def test_a_fleet_under_sigkill_ends_every_scan_once_and_pays_nothing_twice(tmp_path, folders, emulator,
                                                                            postgres_dsn):
    run_fleet_chaos(tmp_path, folders, emulator, postgres_dsn, files=24, kills=4, seed=chaos_seed(20261125))


@pytest.mark.long
@pytest.mark.timeout(900)
def test_a_fleet_under_sigkill_long(tmp_path, folders, emulator, postgres_dsn):
    run_fleet_chaos(tmp_path, folders, emulator, postgres_dsn, files=120, kills=20, seed=chaos_seed(31))
