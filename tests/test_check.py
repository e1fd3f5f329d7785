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


# --------------------------------------------------------------------------- every adapter

from .hosting_fixtures import (DAV_PASSWORD, S3_SECRET_KEY, aws_sandbox, command_settings,  # noqa: E402,F401
                               dav_server, folder_server, moto_s3, s3_credentials, s3_settings, webdav_settings)


@pytest.mark.parametrize("adapter", ["s3", "command", "webdav"])
def test_check_passes_with_each_adapter_and_leaves_nothing_published(
        adapter, request, tmp_path, folders, emulator):
    env = {}
    if adapter == "s3":
        moto = request.getfixturevalue("moto_s3")
        bucket = moto.new_bucket()
        settings = s3_settings(moto, bucket)
        env["CREDENTIALS_DIRECTORY"] = str(s3_credentials(tmp_path / "credentials"))
        leftovers = lambda: moto.keys(bucket)  # noqa: E731
    elif adapter == "command":
        served = request.getfixturevalue("folder_server")
        settings = command_settings(served)
        leftovers = lambda: sorted(p.name for p in served.folder.iterdir())  # noqa: E731
    else:
        dav = request.getfixturevalue("dav_server")
        settings = webdav_settings(dav, tmp_path / "dav-password")
        leftovers = lambda: sorted(p.name for p in dav.folder.iterdir())  # noqa: E731
    mapping = config_mapping(folders, emulator, hosting={"adapter": adapter, adapter: settings})
    result = check(write_config(tmp_path / "config.yaml", mapping), **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result) == {"config": "ok", "folders": "ok", "api key": "ok", f"hosting ({adapter})": "ok"}
    assert leftovers() == []
    for secret in ("X-Amz-Signature", "Signature=", S3_SECRET_KEY, DAV_PASSWORD, API_KEY):
        assert secret not in result.stdout + result.stderr
    assert emulator.stats()["submits_received"] == 0


def test_check_names_a_bucket_that_does_not_exist(tmp_path, folders, emulator, moto_s3):
    settings = s3_settings(moto_s3, "no-such-bucket-4711")
    mapping = config_mapping(folders, emulator, hosting={"adapter": "s3", "s3": settings})
    result = check(write_config(tmp_path / "config.yaml", mapping),
                   CREDENTIALS_DIRECTORY=str(s3_credentials(tmp_path / "credentials")))
    assert result.returncode == 1
    [line] = [x for x in result.stdout.splitlines() if x.startswith("FAIL  hosting (s3)")]
    assert "cannot start" in line and "no-such-bucket-4711" in line, line
    assert S3_SECRET_KEY not in result.stdout + result.stderr
