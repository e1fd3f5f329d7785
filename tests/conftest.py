"""Shared fixtures: a real emulator on loopback, real folders, and the real daemon in a thread or a process."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from daemon import logging as daemon_logging
from daemon.config import Config, Secret, config_from_mapping
from daemon.emulator import GatewayEmulator
from daemon.service import Service

API_KEY = "test-key-7d1f0c9a2b"


def drop_scan(folders: dict[str, Path], name: str, seed: int = 0, size: tuple[int, int] = (64, 48)) -> Path:
    """A photo-like JPEG written beside the inbox and renamed in, as scanning software does."""
    from daemon.demo import make_photo

    staged = folders["inbox"].parent / ".staged.jpg"
    make_photo(staged, *size, seed=seed)
    target = folders["inbox"] / name
    target.parent.mkdir(parents=True, exist_ok=True)
    staged.rename(target)
    return target


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")


class ManualClock:
    """A clock that moves only when the test says: `clock.now += 1.0`."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_files(folder: Path) -> list[Path]:
    """Files a person would see (temporary dot-files excluded)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


@pytest.fixture
def emulator() -> Iterator[GatewayEmulator]:
    with GatewayEmulator(api_key=API_KEY, latency=0.2) as emu:
        yield emu


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("inbox", "outbox", "archive", "failed", "state")}
    paths["inbox"].mkdir()
    return paths


def config_mapping(folders: dict[str, Path], emulator: GatewayEmulator, **overrides: Any) -> dict[str, Any]:
    """A complete, fast configuration for tests; `overrides` are merged per section."""
    data: dict[str, Any] = {
        "folders": {k: str(folders[k]) for k in ("inbox", "outbox", "archive", "failed")},
        "state_dir": str(folders["state"]),
        "api": {"base_url": emulator.base_url, "status_url": emulator.status_url, "poll_interval": 0.1,
                "max_in_flight": 4, "job_timeout": 60, "read_timeout": 10, "connect_timeout": 2},
        "restore": {"codeformer_fidelity": 0.7, "background_enhance": False, "face_upsample": True, "upscale": 2},
        "hosting": {"adapter": "builtin", "builtin": {"listen": "127.0.0.1:0"}},
        "watch": {"settle_seconds": 0.3, "rescan_seconds": 5},
        "logging": {"format": "json", "level": "debug"},
        # PNG outputs whatever the scan, its pixels exactly the provider's: the pipeline tests name their
        # outputs <stem>.png and compare pixels; tests/test_output_end_to_end.py covers formats and guard.
        "output": {"format": "png", "grayscale": "off"},
        "dashboard": {"listen": None},  # the dashboard's tests turn it on, on a port of their own
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return data


@pytest.fixture
def make_config(folders: dict[str, Path], emulator: GatewayEmulator) -> Callable[..., Config]:
    def build(**overrides: Any) -> Config:
        return config_from_mapping(config_mapping(folders, emulator, **overrides), folders["inbox"].parent)
    return build


class RunningDaemon:
    """The real Service running its loop on a thread, stopped and joined at the end of the test."""

    def __init__(self, config: Config, key: str = API_KEY) -> None:
        self.config = config
        self.service = Service(config, Secret(key))
        self.thread = threading.Thread(target=self._run, name="daemon-under-test", daemon=True)
        self.clean: bool | None = None

    def _run(self) -> None:
        self.clean = self.service.run()

    def start(self) -> "RunningDaemon":
        self.service.start()
        self.thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self.service.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "daemon did not stop"

    def wait_for_passes(self, seconds: float = 0.0, timeout: float = 20) -> None:
        """Wait until the scheduler's loop has kept passing for `seconds` more of its own clock, and then
        one whole pass more (begun after that), so every step has had its chance.

        For checks that something must NOT happen: a bare sleep also passes while the loop is stuck.
        """
        scheduler = self.service.scheduler
        until = scheduler.clock() + seconds
        wait_for(lambda: scheduler.last_pass >= until, seconds + timeout, what=f"{seconds} s of loop passes")
        ended = scheduler.last_pass
        wait_for(lambda: scheduler.last_pass > ended, timeout, what="one more whole loop pass")


@pytest.fixture
def run_daemon() -> Iterator[Callable[..., RunningDaemon]]:
    started: list[RunningDaemon] = []

    def start(config: Config, key: str = API_KEY) -> RunningDaemon:
        daemon = RunningDaemon(config, key).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.thread.is_alive():
            daemon.stop()


@pytest.fixture
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Every structured event the daemon logs during the test, after the real processors ran."""
    events: list[dict[str, Any]] = []

    def capture(logger: Any, method_name: str, event_dict: dict[str, Any]) -> str:
        events.append(dict(event_dict))
        return json.dumps(event_dict, default=str)

    daemon_logging.register_secret(API_KEY)
    old = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                                    structlog.processors.format_exc_info, daemon_logging.redact_secrets, capture],
                        logger_factory=structlog.ReturnLoggerFactory(),
                        wrapper_class=structlog.make_filtering_bound_logger(0))
    yield events
    structlog.configure(**old)


# --------------------------------------------------------------------------- the daemon as a process


def write_config(path: Path, mapping: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(mapping, allow_unicode=True), encoding="utf-8")
    return path


class DaemonProcess:
    """`codeformer-daemon run` as a child process, its stderr (JSON log lines) kept in a file."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.env = {**os.environ, "CODEFORMER_API_KEY": API_KEY, **(env or {})}
        self.preexec_fn = preexec_fn
        """Runs in the child just before the daemon starts, e.g. to give up privileges."""
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DaemonProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(self.config_path)],
                                     stdout=log, stderr=log, env=self.env, stdin=subprocess.DEVNULL,
                                     preexec_fn=self.preexec_fn)
        log.close()
        return self

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_ready(self, count: int = 1, timeout: float = 20) -> None:
        wait_for(lambda: sum(e.get("event") == "daemon.ready" for e in self.events()) >= count
                 or (self.proc.poll() is not None and pytest.fail(f"daemon exited: {self.log_path.read_text()}")),
                 timeout, what="daemon.ready")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout)


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(config_path: Path, env: dict[str, str] | None = None,
              preexec_fn: Callable[[], None] | None = None) -> DaemonProcess:
        proc = DaemonProcess(config_path, tmp_path / "daemon.log", env, preexec_fn).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


# --------------------------------------------------------------------------- a throwaway PostgreSQL


@pytest.fixture(scope="session")
def postgres_server() -> Iterator["PostgresServer"]:  # noqa: F821
    """One PostgreSQL 15 cluster for the whole session, started only when a test asks for it."""
    from .postgres_server import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: "PostgresServer") -> str:  # noqa: F821
    """A new empty database per test, so tests never see each other's tables."""
    return postgres_server.create_database()
