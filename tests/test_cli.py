"""The command line as a user runs it: status beside a running daemon, graceful stop, the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from daemon.demo import make_photo

from .conftest import config_mapping, visible_files, wait_for, write_config


def cli(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "CODEFORMER_API_KEY": "unused"})


def test_status_reports_a_running_daemon_and_its_jobs(tmp_path, folders, emulator, daemon_process):
    emulator.latency = 3.0
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    proc = daemon_process(config_path)
    proc.wait_ready()
    make_photo(folders["inbox"] / "slow one.jpg", 200, 160, seed=1, format="JPEG")
    wait_for(lambda: emulator.stats()["submits_accepted"] == 1, 10, what="submit")

    human = cli("status", "--config", str(config_path))
    assert human.returncode == 0, human.stderr
    assert "daemon: running" in human.stdout
    assert "slow one.jpg: submitted" in human.stdout
    assert "submissions spent: 1" in human.stdout

    data = json.loads(cli("status", "--config", str(config_path), "--json").stdout)
    assert data["counts"]["submitted"] == 1 and data["submissions_spent"] == 1
    [job] = data["in_flight"]
    assert job["file"] == "slow one.jpg" and job["request_id"].startswith("codeformer-image-restoration_")

    wait_for(lambda: (folders["outbox"] / "slow one.png").exists(), 15, what="output")
    started = time.monotonic()
    assert proc.terminate() == 0
    assert time.monotonic() - started < 20
    after = json.loads(cli("status", "--config", str(config_path), "--json").stdout)
    assert after["counts"]["done"] == 1 and after["in_flight"] == []


def test_status_without_a_journal_says_so(tmp_path, folders, emulator):
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    result = cli("status", "--config", str(config_path))
    assert result.returncode == 1 and "has not run with this state_dir" in result.stderr


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(tmp_path, folders, emulator, daemon_process):
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    daemon_process(config_path).wait_ready()
    second = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(config_path)],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "CODEFORMER_API_KEY": "k"})
    assert second.returncode == 1 and "already running" in second.stderr


def test_demo_restores_generated_scans_and_refuses_a_used_folder(tmp_path):
    result = cli("demo", "--dir", "demo here", "--latency", "0.3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = visible_files(tmp_path / "demo here" / "outbox")
    assert len(outputs) == 4
    for path in outputs:
        assert str(path) in result.stdout
    assert len(visible_files(tmp_path / "demo here" / "archive")) == 4
    again = cli("demo", "--dir", "demo here", cwd=tmp_path)
    assert again.returncode == 1 and "not empty" in again.stderr


def test_ctrl_c_ends_the_demo_even_when_it_started_with_sigint_ignored(tmp_path):
    """A background job of a script starts with SIGINT ignored, and Python then keeps it ignored: the
    demo with its dashboard would wait for a Ctrl-C that never arrives."""
    demo = subprocess.Popen([sys.executable, "-m", "daemon.cli", "demo", "--dir", str(tmp_path / "demo"),
                             "--dashboard", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for line in demo.stdout:
            if "Ctrl-C ends the demo" in line:
                break
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
    finally:
        demo.kill()


def test_emulator_refuses_a_bad_listen_address_with_a_clear_error():
    result = cli("emulator", "--listen", "nonsense")
    assert result.returncode == 2 and "--listen" in result.stderr and "Traceback" not in result.stderr
