"""`codeformer-daemon check`: proves the setup without spending anything, one line per check."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daemon.check import judge_key_probe

from .conftest import API_KEY, config_mapping, free_port, write_config


def check(config_path, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "daemon.cli", "check", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CODEFORMER_API_KEY": API_KEY, **env})


def lines(result) -> dict[str, str]:
    """'ok'/'FAIL' per check name (the last line of each name wins)."""
    found = {}
    for line in result.stdout.splitlines():
        verdict, _, rest = line.partition("  ")
        found[rest.split(":", 1)[0].strip()] = verdict.strip()
    return found


def test_check_passes_against_the_emulator_and_spends_nothing(tmp_path, folders, emulator):
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    result = check(config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result) == {"config": "ok", "folders": "ok", "api key": "ok", "hosting (builtin)": "ok"}
    assert "published, fetched and matched" in result.stdout and "no longer fetchable" in result.stdout
    assert emulator.stats()["submits_received"] == 0 and emulator.stats()["polls"] == 1
    assert API_KEY not in result.stdout + result.stderr


def test_check_names_a_wrong_key_without_showing_it(tmp_path, folders, emulator):
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    result = check(config_path, CODEFORMER_API_KEY="not-the-right-key-123")
    assert result.returncode == 1
    assert "FAIL  api key: rejected by the provider (HTTP 401" in result.stdout
    assert "CODEFORMER_API_KEY" in result.stdout and "not-the-right-key-123" not in result.stdout
    assert lines(result)["hosting (builtin)"] == "ok"  # the other checks still ran


def test_check_names_an_unreachable_endpoint(tmp_path, folders, emulator):
    closed = f"http://127.0.0.1:{free_port()}"
    mapping = config_mapping(folders, emulator, api={"base_url": closed, "status_url": f"{closed}/v2/requests/status",
                                                     "connect_timeout": 0.5})
    result = check(write_config(tmp_path / "config.yaml", mapping))
    assert result.returncode == 1
    assert f"FAIL  api key: cannot reach {closed}/v2/requests/status: ConnectionError" in result.stdout


def test_check_reports_a_bad_configuration_and_a_host_that_cannot_start(tmp_path, folders, emulator):
    mapping = config_mapping(folders, emulator, api={"max_in_flight": 0})
    result = check(write_config(tmp_path / "bad.yaml", mapping))
    assert result.returncode == 2 and result.stdout.startswith("FAIL  config: api.max_in_flight")

    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mapping = config_mapping(folders, emulator, hosting={"adapter": "builtin",
                                                             "builtin": {"listen": f"127.0.0.1:{port}"}})
        result = check(write_config(tmp_path / "busy.yaml", mapping))
    assert result.returncode == 1
    assert "FAIL  hosting (builtin): cannot start: hosting.builtin.listen: cannot listen" in result.stdout


@pytest.mark.parametrize("status, error, ok, words", [
    (404, "Request not found", True, "accepted"),
    (401, "Unauthorized", False, "rejected by the provider (HTTP 401"),
    (403, "Forbidden", False, "rejected by the provider (HTTP 403"),
    (None, "ConnectionError: refused", False, "cannot reach"),
    (500, "oops", False, "unexpected answer"),
])
def test_judge_key_probe(status, error, ok, words):
    result = judge_key_probe(status, error, "https://api.example/status", "api.api_key_file (/etc/key)")
    assert result.ok is ok and words in result.detail
