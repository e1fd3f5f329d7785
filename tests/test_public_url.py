"""The built-in host's public URL: `run` refuses one the provider cannot reach, `check` warns, the rest works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.check import CheckResult, judge_public_url
from daemon.config import (PROVIDER_BASE_URL, ApiConfig, BuiltinHostConfig, Config, FoldersConfig, HostingConfig,
                           builtin_public_url_problem, load_config)

from .conftest import API_KEY, config_mapping, write_config

OUTSIDE_APIS = [PROVIDER_BASE_URL, "https://gateway.invalid/codeformer-image-restoration/v1",
                "http://192.168.1.5:8000/v1"]  # a provider on the LAN is not exempt: only loopback is
LOOPBACK_APIS = ["http://127.0.0.1:41234/codeformer-image-restoration/v1", "http://localhost:8000/v1",
                 "http://[::1]:8000/v1", "http://127.9.9.9/v1"]

UNREACHABLE = [  # (public_url, words the problem must hold)
    (None, "not set, so scans would be offered at the listen address (http://0.0.0.0:8089/...)"),
    ("http://0.0.0.0:8089", "unspecified"),
    ("http://[::]:8089", "unspecified"),
    ("http://127.0.0.1:8089", "loopback"),
    ("http://127.5.6.7:8089", "loopback"),
    ("http://[::1]:8089", "loopback"),
    ("http://localhost:8089", "loopback"),
    ("http://LocalHost.:8089", "loopback"),
    ("http://scans.localhost:8089", "loopback"),
    ("http://10.1.2.3:8089", "private"),
    ("http://172.16.0.5:8089", "private"),
    ("http://192.168.1.20:8089", "private"),
    ("http://169.254.10.10:8089", "link-local"),
    ("http://[fe80::1]:8089", "link-local"),
    ("http://[fd12:3456::1]:8089", "private"),
    ("http://[::ffff:192.168.1.2]:8089", "private"),
    ("http://100.101.102.103:8089", "private"),  # carrier-grade NAT (Tailscale): not on the internet
    ("http://scanner.local:8089", "local network"),
    ("https://nas.home.arpa/scans", "local network"),
]
REACHABLE = ["https://scans.example.org:8089", "https://scans.example.org/codeformer", "http://93.184.216.34:8089",
             "http://[2606:4700:4700::1111]:8089", "https://my-station.duckdns.org"]


def make(public_url: str | None, base_url: str, adapter: str = "builtin") -> Config:
    root = Path("/srv/scans")
    return Config(folders=FoldersConfig(root / "in", root / "out", root / "archive", root / "failed"),
                  state_dir=root / "state", api=ApiConfig(base_url=base_url),
                  hosting=HostingConfig(adapter=adapter, builtin=BuiltinHostConfig(public_url=public_url)))


@pytest.mark.parametrize("base_url", OUTSIDE_APIS)
@pytest.mark.parametrize("public_url, words", UNREACHABLE)
def test_a_public_url_the_provider_cannot_reach_is_a_problem(public_url, words, base_url):
    problem = builtin_public_url_problem(make(public_url, base_url))
    assert problem is not None and problem.startswith("hosting.builtin.public_url: ")
    assert words in problem
    assert "such as https://scans.example.org:8089" in problem and "hosting.builtin.listen (0.0.0.0:8089)" in problem


@pytest.mark.parametrize("base_url", OUTSIDE_APIS)
@pytest.mark.parametrize("public_url", REACHABLE)
def test_a_public_name_or_address_is_fine(public_url, base_url):
    assert builtin_public_url_problem(make(public_url, base_url)) is None


@pytest.mark.parametrize("base_url", LOOPBACK_APIS)
@pytest.mark.parametrize("public_url", [url for url, _ in UNREACHABLE] + REACHABLE)
def test_with_the_api_on_loopback_any_public_url_is_fine(public_url, base_url):
    """The emulator, the demo and the tests fetch from this very station."""
    assert builtin_public_url_problem(make(public_url, base_url)) is None


@pytest.mark.parametrize("adapter", ["s3", "command", "webdav"])
def test_other_adapters_never_use_the_builtin_public_url(adapter):
    assert builtin_public_url_problem(make(None, PROVIDER_BASE_URL, adapter)) is None


def test_the_problem_shows_the_host_and_never_credentials_in_the_url():
    problem = builtin_public_url_problem(make("https://scanner:hunter2@192.168.1.20:8089/x", PROVIDER_BASE_URL))
    assert "192.168.1.20" in problem and "hunter2" not in problem and "scanner:" not in problem


# --------------------------------------------------------------------------- run refuses, others work


def outside_mapping(folders, emulator, public_url):
    """A configuration for the real provider (an address that never resolves), built-in host on loopback."""
    outside = "https://gateway.invalid"
    return config_mapping(folders, emulator,
                          api={"base_url": f"{outside}/codeformer-image-restoration/v1",
                               "status_url": f"{outside}/v2/requests/status"},
                          hosting={"adapter": "builtin",
                                   "builtin": {"listen": "127.0.0.1:0", "public_url": public_url}})


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CODEFORMER_API_KEY": API_KEY})


@pytest.mark.parametrize("public_url", [None, "http://0.0.0.0:8089"])
def test_run_refuses_before_starting_anything(tmp_path, folders, emulator, public_url):
    config_path = write_config(tmp_path / "config.yaml", outside_mapping(folders, emulator, public_url))
    result = cli("run", "--config", str(config_path), timeout=20)  # started, it would run until killed
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("codeformer-daemon: configuration error: hosting.builtin.public_url: ")
    assert "such as https://scans.example.org:8089" in result.stderr and "Traceback" not in result.stderr
    assert not folders["state"].exists() and not folders["outbox"].exists()  # no service, no host, no network
    assert API_KEY not in result.stdout + result.stderr


def test_status_and_retry_still_work_with_such_a_file(tmp_path, folders, emulator):
    from daemon.journal import Journal
    from daemon.service import journal_path

    config_path = write_config(tmp_path / "config.yaml", outside_mapping(folders, emulator, None))
    Journal(journal_path(load_config(config_path))).close()  # as a daemon run earlier would have left it
    status = cli("status", "--config", str(config_path))
    assert status.returncode == 0, status.stderr
    assert "daemon: not running" in status.stdout
    retry = cli("retry", "--config", str(config_path), "--all")
    assert retry.returncode == 0, retry.stderr
    assert "nothing to retry" in retry.stdout


def test_judge_public_url_warns_only_when_the_provider_is_outside():
    warning = judge_public_url(make("http://0.0.0.0:8089", PROVIDER_BASE_URL))
    assert warning is not None and warning.ok and warning.warning
    assert warning.line().startswith("WARN  public url: hosting.builtin.public_url: ")
    assert "`run` refuses" in warning.line()
    assert judge_public_url(make("http://0.0.0.0:8089", LOOPBACK_APIS[0])) is None
    assert judge_public_url(make("https://scans.example.org:8089", PROVIDER_BASE_URL)) is None
    assert CheckResult("x", True, "d").line() == "ok    x: d" and CheckResult("x", False, "d").line() == "FAIL  x: d"


@pytest.mark.parametrize("outside", [False, True])
def test_check_warns_without_failing(tmp_path, folders, emulator, outside):
    """The key probe goes to api.status_url (the emulator) and the round trip to the built-in host on
    loopback; only api.base_url, which check never calls, names the outside provider."""
    mapping = config_mapping(folders, emulator)
    if outside:
        mapping["api"]["base_url"] = "https://gateway.invalid/codeformer-image-restoration/v1"
    result = cli("check", "--config", str(write_config(tmp_path / "config.yaml", mapping)))
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARN")]
    if outside:
        [line] = warnings
        assert line.startswith("WARN  public url: hosting.builtin.public_url: not set")
        assert "such as https://scans.example.org:8089" in line
    else:
        assert warnings == []
    assert "ok    hosting (builtin): published, fetched and matched" in result.stdout
    assert "FAIL" not in result.stdout
