"""What the README promises about the built-in host and the units is what the code and the units do."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import requests

from daemon.config import BuiltinHostConfig
from daemon.hosting import BuiltinHost
from daemon.scheduler import CHECKS_AHEAD_AT_ONCE

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
README_TEXT = " ".join(README.split())  # sentences whatever their line breaks
UNITS = sorted((ROOT / "systemd").glob("*.service"))


def tasks_max(unit: Path) -> int:
    [value] = re.findall(r"^TasksMax=(\d+)\s*$", unit.read_text(encoding="utf-8"), re.MULTILINE)
    return int(value)


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_the_units_cap_tasks_above_the_daemons_own_worst_case_and_the_readme_says_the_same(unit):
    highest_connections = next(f for f in dataclasses.fields(BuiltinHostConfig)
                               if f.name == "max_connections").metadata["range"][1]
    scheduler_workers = 64  # the pool's ceiling, whatever api.max_in_flight asks
    assert CHECKS_AHEAD_AT_ONCE < scheduler_workers
    assert tasks_max(unit) >= scheduler_workers + highest_connections + 16, "room for the daemon's own threads"
    assert f"`TasksMax={tasks_max(unit)}`" in README


def test_the_readme_describes_the_methods_the_built_in_host_really_answers(tmp_path):
    sentence = re.search(r"Only GET and HEAD reach files: (.*?) get 405 with `Allow: GET, HEAD`", README_TEXT)
    assert sentence, "the README says which methods get 405"
    methods = re.findall(r"[A-Z]{3,}", sentence.group(1))
    scan = tmp_path / "scan.jpg"
    scan.write_bytes(b"\xff\xd8" + b"x" * 100)
    host = BuiltinHost("127.0.0.1:0")
    host.start()
    try:
        url = host.publish("k" * 43 + ".jpg", scan, "image/jpeg")
        for method in methods:
            answer = requests.request(method, url, timeout=5)
            assert (answer.status_code, answer.headers.get("Allow")) == (405, "GET, HEAD"), method
        assert requests.get(url, timeout=5).status_code == 200
        assert requests.post(url, timeout=5).status_code == 404
    finally:
        host.stop()


def test_the_readme_says_the_webhook_token_is_its_own_and_it_is(tmp_path):
    assert "a random 256-bit token of its own drawn apart from the file's key" in README_TEXT
    scan = tmp_path / "scan.jpg"
    scan.write_bytes(b"\xff\xd8" + b"x" * 100)
    host = BuiltinHost("127.0.0.1:0")
    host.start()
    try:
        key = "Q" * 43 + ".jpg"
        host.publish(key, scan, "image/jpeg")
        hook = host.open_callback(key, lambda: None)
        token = hook.rsplit("/", 1)[1]
        assert key.split(".")[0] not in hook and len(token) >= 43
        assert requests.get(f"{host.public_url}/{token}.jpg", timeout=5).status_code == 404
    finally:
        host.stop()
