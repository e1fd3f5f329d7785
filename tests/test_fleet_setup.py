"""Setting up a fleet: the `state` section, `check` on the database, and `status` listing the daemons."""

from __future__ import annotations

import os
import re

import pytest

from daemon.cli import render_status
from daemon.config import ConfigError, Secret, config_from_mapping
from daemon.journal import Journal, JobState
from daemon.reports import status_report
from daemon.service import Service, StartupError
from daemon.storage.postgresql import PostgresConnector

from .conftest import config_mapping, free_port, write_config
from .test_check import check, lines


def state_config(folders, emulator, **state):
    return config_from_mapping(config_mapping(folders, emulator, state=state), folders["inbox"].parent)


@pytest.mark.parametrize(("state", "message"), [
    ({"backend": "postgresql"}, "state.postgresql.dsn: state.backend is postgresql, so a connection string"),
    ({"backend": "postgresql", "postgresql": {"dsn": "host=db user=cf password=hunter22"}}, "holds a password"),
    ({"backend": "postgresql", "postgresql": {"dsn": "postgresql://cf:hunter22@db/cf"}}, "holds a password"),
    ({"backend": "postgresql", "postgresql": {"dsn": "host=db", "lease_seconds": 1}}, "state.postgresql.lease_seconds"),
    ({"backend": "mysql"}, "state.backend"),
    ({"node_name": "station one; rm -rf"}, "state.node_name"),
])
def test_the_state_section_names_what_is_wrong(folders, emulator, state, message):
    with pytest.raises(ConfigError, match=message) as raised:
        state_config(folders, emulator, **state)
    assert "hunter22" not in str(raised.value)


def test_check_says_whether_the_fleets_database_answers(tmp_path, folders, emulator, postgres_dsn):
    good = write_config(tmp_path / "good.yaml", config_mapping(
        folders, emulator, state={"backend": "postgresql", "postgresql": {"dsn": postgres_dsn}}))
    result = check(good)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result)["journal"] == "ok" and "0 daemons of the fleet running" in result.stdout
    nowhere = f"host=127.0.0.1 port={free_port()} dbname=codeformer user=codeformer connect_timeout=2"
    bad = write_config(tmp_path / "bad.yaml", config_mapping(
        folders, emulator, state={"backend": "postgresql", "postgresql": {"dsn": nowhere}}))
    result = check(bad)
    assert result.returncode == 1
    assert lines(result)["journal"] == "FAIL" and "cannot reach the PostgreSQL journal" in result.stdout


def test_a_daemon_that_cannot_reach_its_database_at_start_says_so(folders, emulator):
    nowhere = f"host=127.0.0.1 port={free_port()} dbname=codeformer connect_timeout=2"
    config = state_config(folders, emulator, backend="postgresql", postgresql={"dsn": nowhere})
    with pytest.raises(StartupError, match="cannot reach the PostgreSQL journal at host=127.0.0.1"):
        Service(config, Secret("unused-key-1234")).start()


def test_status_lists_the_fleet(tmp_path, postgres_dsn):
    running, stopped, reader = (Journal(PostgresConnector(postgres_dsn)) for _ in range(3))
    running.join("north", lease_seconds=30)
    stopped.join("south", lease_seconds=30)
    running.transition(running.add_job("scan.jpg", 1, 1, {}), running.get(1).state.PUBLISHING)
    stopped.start_heartbeat(tmp_path / "south.heartbeat")  # written by each station as it starts: the last one's
    stopped.set_meta("pid", "4242")
    stopped.note_inbox("share gone")  # its last word before it stopped: stale once it has
    stopped.leave()
    report = status_report(reader, 0.0)
    assert report["inbox_unavailable"] is None and all(n["inbox_unavailable"] is None for n in report["fleet"])
    assert report["pid"] is None and report["heartbeat_age_seconds"] is None, "one station's, shown as the fleet's"
    assert sorted(n["pid"] for n in report["fleet"]) == [os.getpid()] * 2
    text = render_status(report)
    assert text.splitlines()[0] == "fleet: 1 daemon running"
    assert "  north on " in text and ": running, last heartbeat " in text and "holding 1 job" in text
    assert "  south on " in text and ": stopped, " in text and "holding 0 jobs" in text


def test_the_dashboard_shows_the_fleet(folders, emulator, make_config, run_daemon, postgres_dsn):
    import requests

    daemon = run_daemon(make_config(dashboard={"listen": "127.0.0.1:0"},
                                    state={"backend": "postgresql", "node_name": "north",
                                           "postgresql": {"dsn": postgres_dsn}}))
    other = Journal(PostgresConnector(postgres_dsn))
    other.join("south", lease_seconds=30)
    other.leave()
    page = requests.get(daemon.service.dashboard.url + "/live", timeout=10).text
    assert "Fleet: 1 of 2 daemons running" in page
    rows = re.findall(r"<tr><td>(\w+)</td><td>[^<]*</td>\s*<td>(\w+)</td>", page)
    assert sorted(rows) == [("north", "running"), ("south", "stopped")]


def test_metrics_count_the_fleets_daemons(postgres_dsn, tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    from daemon.metrics import JournalFigures

    running, stopped, silent, reader = (Journal(PostgresConnector(postgres_dsn)) for _ in range(4))
    running.join("north", lease_seconds=30)
    stopped.join("south", lease_seconds=30)
    stopped.leave()
    silent.join("east", lease_seconds=3)
    silent.store.read("UPDATE nodes SET lease_until = lease_until - 10 WHERE name = 'east' RETURNING token")
    registry = CollectorRegistry()
    registry.register(JournalFigures(reader))
    text = generate_latest(registry).decode()
    for state, count in (("running", 1), ("silent", 1), ("stopped", 1)):
        assert f'codeformer_fleet_daemons{{state="{state}"}} {count}.0' in text


def test_no_fleet_metric_on_sqlite(tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    from daemon.metrics import JournalFigures

    registry = CollectorRegistry()
    registry.register(JournalFigures(Journal(tmp_path / "journal.sqlite3")))
    assert "codeformer_fleet_daemons{" not in generate_latest(registry).decode()


def test_a_file_gone_from_the_shared_inbox_by_the_time_it_settled_is_not_taken(folders, emulator, make_config,
                                                                                run_daemon, postgres_dsn):
    """A station's view of the share can lag (its first scan after a restart): another station may have
    restored and archived a file it still offers as settled. Taken, it would only end as vanished."""
    from daemon.settle import Sighting

    from .conftest import drop_scan, wait_for

    daemon = run_daemon(make_config(state={"backend": "postgresql", "postgresql": {"dsn": postgres_dsn}}))
    watcher = daemon.service.watcher
    offered = watcher.take_settled
    late = [Sighting("restored-elsewhere.jpg", 1234, 1, 0.3)]

    def take_settled(active_jobs, limit=None):  # the share's real files, and one this station saw too late
        return offered(active_jobs, limit) + [late.pop()] if late else offered(active_jobs, limit)

    watcher.take_settled = take_settled
    drop_scan(folders, "here.jpg")
    journal = daemon.service.journal
    wait_for(lambda: journal.count_in(JobState.DONE) == 1, 30, what="the file that is there restored")
    assert not late, "the late sighting was offered"
    assert [r[0] for r in journal.read("SELECT rel_path FROM jobs")] == ["here.jpg"]


@pytest.mark.parametrize("dsn", [
    "host=127.0.0.1 port={port} user=cf password=hunter22 connect_timeout=2",
    "postgresql://cf:hunter22@127.0.0.1:{port}/cf?connect_timeout=2",
    "host=127.0.0.1 port={port} user=cf password='sesame hunter22' connect_timeout=2",
    "host=127.0.0.1 port={port} user=cf sslpassword='sesame\\' hunter22' connect_timeout=2",  # the client key's
])
def test_a_password_in_a_dsn_never_reaches_an_error_text(dsn):
    """The configuration refuses such a DSN; the connector, given one anyway, never repeats the password
    (nor in `str()`, which the `daemon.ready` line shows)."""
    from daemon.storage import StorageUnavailable

    with pytest.raises(StorageUnavailable) as raised:
        PostgresConnector(dsn.format(port=free_port()))
    assert "hunter" not in str(raised.value) and "cannot reach the PostgreSQL journal" in str(raised.value)
    assert "connect_timeout=2" in str(raised.value)  # only the password is taken out


def test_a_schema_1_fleet_database_is_migrated_in_place(postgres_dsn):
    """A fleet's database made by the first PostgreSQL release gains what later ones need, keeping its rows."""
    import psycopg

    first = Journal(PostgresConnector(postgres_dsn))
    first.join("north")
    first.close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:  # back to how schema 1 left it
        conn.execute("ALTER TABLE nodes DROP COLUMN inbox_unavailable")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        conn.execute("INSERT INTO meta(key, value) VALUES ('inbox_unavailable', 'one station''s share')")
    journal = Journal(PostgresConnector(postgres_dsn))
    try:
        assert journal.get_meta("schema_version") == "2"
        assert journal.get_meta("inbox_unavailable") is None  # each station's own now, on its row
        [old_run] = journal.nodes()
        assert old_run.name == "north" and old_run.inbox_unavailable is None
        journal.join("south")
        journal.note_inbox("share gone")  # schema 2: why a station cannot read its inbox
        assert {n.name: n.inbox_unavailable for n in journal.nodes()} == {"north": None, "south": "share gone"}
    finally:
        journal.close()


def test_a_fleet_database_of_a_newer_release_is_refused_by_daemons_and_readers(postgres_dsn):
    import psycopg

    from daemon.journal import JournalError
    from daemon.storage.postgresql import SCHEMA_VERSION

    Journal(PostgresConnector(postgres_dsn)).close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    for read_only in (False, True):
        with pytest.raises(JournalError, match=f"schema version 99, newer than this release's {SCHEMA_VERSION}; upgrade"):
            PostgresConnector(postgres_dsn, read_only=read_only)
