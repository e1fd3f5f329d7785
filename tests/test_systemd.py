"""Running for months under systemd: sd_notify (ready, status, watchdog, reload, stop), a full reload
on SIGHUP, the unit files' hardening, and log lines the journal understands.
"""

from __future__ import annotations

import ctypes
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import structlog

from daemon import logging as daemon_logging
from daemon.config import Config
from daemon.demo import make_photo
from daemon.notify import Notifier, socket_address, watchdog_interval
from daemon.service import loop_stale_after, reloaded_config

from .conftest import config_mapping, wait_for, write_config

ROOT = Path(__file__).resolve().parent.parent


def drop(folder: Path, name: str, seed: int) -> None:
    make_photo(folder / name, 200, 160, seed=seed, format="JPEG")


class NotifyListener:
    """A stand-in for systemd's notification socket: every datagram, with the time it arrived."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode().split("\n")))

    def lines(self) -> list[str]:
        with self._lock:
            return [line for _, lines in self.messages for line in lines]

    def times_of(self, line: str) -> list[float]:
        with self._lock:
            return [at for at, lines in self.messages if line in lines]

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def path_listener():
    folder = tempfile.mkdtemp(prefix="cfd-", dir="/tmp")  # AF_UNIX paths are limited to 107 bytes
    listener = NotifyListener(os.path.join(folder, "notify"))
    yield listener
    listener.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def abstract_listener():
    listener = NotifyListener(f"@codeformer-daemon-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


def deny_write_execute() -> None:
    """In the child: the kernel's own MemoryDenyWriteExecute (PR_SET_MDWE, Linux >= 6.3), where it exists.

    The units set MemoryDenyWriteExecute=yes; the daemon under test must run (Python, Pillow,
    watchdog's ctypes) with it. Older kernels refuse the prctl, and then the test runs without it.
    """
    ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0)  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN


# --------------------------------------------------------------------------- sd_notify, end to end


def test_the_daemon_tells_systemd_ready_status_watchdog_reload_and_stop(
        tmp_path, folders, emulator, daemon_process, path_listener):
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    proc = daemon_process(config_path, env={"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "1000000"},
                          preexec_fn=deny_write_execute)
    wait_for(lambda: "READY=1" in path_listener.lines(), 20, what="READY=1")
    wait_for(lambda: any(line.startswith("STATUS=") for line in path_listener.lines()), 10, what="a STATUS= line")
    assert "STATUS=0 in flight, 0 queued" in path_listener.lines()

    drop(folders["inbox"], "scan.jpg", seed=1)  # Pillow and the rest, under MemoryDenyWriteExecute
    wait_for(lambda: (folders["outbox"] / "scan.png").exists(), 20, what="the restored scan")
    wait_for(lambda: len(path_listener.times_of("WATCHDOG=1")) >= 4, 10, what="watchdog pings")
    pings = path_listener.times_of("WATCHDOG=1")
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert all(0.3 < gap < 1.0 for gap in gaps), f"pings every half WATCHDOG_USEC (0.5 s): {gaps}"

    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: path_listener.lines().count("READY=1") == 2, 10, what="READY=1 after the reload")
    lines = path_listener.lines()
    reloading = lines.index("RELOADING=1")
    assert lines.index("READY=1") < reloading < len(lines) - 1 - lines[::-1].index("READY=1")
    monotonic = [line for line in lines if line.startswith("MONOTONIC_USEC=")]
    assert len(monotonic) == 1 and int(monotonic[0].split("=")[1]) > 0
    assert any(e.get("event") == "daemon.reloaded" for e in proc.events())

    assert proc.terminate() == 0
    lines = path_listener.lines()
    assert "STOPPING=1" in lines
    assert "WATCHDOG=1" not in lines[lines.index("STOPPING=1"):], "no ping once stopping"


def test_a_stuck_scheduler_stops_the_watchdog_pings(monkeypatch, make_config, run_daemon, abstract_listener):
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    daemon = run_daemon(make_config())
    wait_for(lambda: len(abstract_listener.times_of("WATCHDOG=1")) >= 3, 10, what="pings while the loop turns")

    scheduler = daemon.service.scheduler
    entered, release = threading.Event(), threading.Event()
    take_new_files = scheduler.take_new_files

    def stuck() -> None:
        entered.set()
        release.wait(30)
        take_new_files()

    monkeypatch.setattr(scheduler, "take_new_files", stuck)
    try:
        assert entered.wait(5)
        stale_after = loop_stale_after(0.2)
        # Pings go on while the last pass is recent enough, then stop.
        wait_for(lambda: time.monotonic() - abstract_listener.times_of("WATCHDOG=1")[-1] > 1.0,
                 stale_after + 3, what="the pings to stop")
        stopped_at = len(abstract_listener.times_of("WATCHDOG=1"))
        watchdog, looks = daemon.service._watchdog, []
        looked = watchdog.alive
        monkeypatch.setattr(watchdog, "alive", lambda: looks.append(looked()) or looks[-1])
        wait_for(lambda: len(looks) >= 5, 5, what="five more ping intervals, each looked at by the watchdog")
        assert not any(looks), "the watchdog took a stuck loop for a live one"
        assert len(abstract_listener.times_of("WATCHDOG=1")) == stopped_at, "a stuck loop must not be pinged for"
    finally:
        release.set()
    wait_for(lambda: len(abstract_listener.times_of("WATCHDOG=1")) > stopped_at, 3, what="pings once it turns again")


def test_watchdog_freshness_bound_covers_the_loops_longest_naps():
    assert loop_stale_after(0.5) == 6.0  # failed pass: LOOP_ERROR_PAUSE 2 s + MAX_SLEEP 2 s, + 2 s
    assert loop_stale_after(30.0) == 30.0  # WatchdogSec=60: "it passed since about the previous ping"


@pytest.mark.parametrize("value, expected", [
    (None, None),
    ("", None),
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@abstract/name", b"\0abstract/name"),
    ("vsock:2:1234", None),
    ("relative/path", None),
])
def test_notify_socket_addresses(value, expected):
    assert socket_address(value) == expected


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "60000000"}, 30.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4242"}, 30.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # the watchdog is some other process's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only(environ, expected):
    assert watchdog_interval(environ, pid=4242) == expected


def test_notifier_over_an_abstract_socket_sends_status_only_when_it_changes(abstract_listener):
    notifier = Notifier({"NOTIFY_SOCKET": abstract_listener.env_value})
    assert notifier.status("1 in flight,\n0 queued") and not notifier.status("1 in flight, 0 queued")
    assert notifier.status("2 in flight, 0 queued") and notifier.reloading() and notifier.stopping()
    wait_for(lambda: len(abstract_listener.messages) == 4, 5, what="four messages")
    assert [lines for _, lines in abstract_listener.messages][:2] == [["STATUS=1 in flight, 0 queued"],
                                                                     ["STATUS=2 in flight, 0 queued"]]
    reloading = abstract_listener.messages[2][1]
    assert reloading[0] == "RELOADING=1"
    sent_usec = int(reloading[1].removeprefix("MONOTONIC_USEC="))
    assert abs(sent_usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 5_000_000
    notifier.close()
    assert not Notifier({}).ready(), "no NOTIFY_SOCKET: nothing to do, and no error"


# --------------------------------------------------------------------------- reload


def test_sighup_applies_a_changed_configuration_to_new_jobs_only_and_refuses_a_broken_one(
        tmp_path, folders, emulator, daemon_process):
    emulator.latency = 3.0  # the first job is still at the provider when the reload comes
    mapping = config_mapping(folders, emulator)  # codeformer_fidelity 0.7, logging level debug
    config_path = write_config(tmp_path / "config.yaml", mapping)
    proc = daemon_process(config_path)
    proc.wait_ready()
    drop(folders["inbox"], "first.jpg", seed=1)
    wait_for(lambda: len(emulator.stats()["jobs"]) == 1, 15, what="the first submit")

    changed = config_mapping(folders, emulator, restore={"codeformer_fidelity": 0.2},
                             logging={"format": "json", "level": "info"}, watch={"settle_seconds": 0.2})
    write_config(config_path, changed)
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: [e for e in proc.events() if e.get("event") == "daemon.reloaded"], 10, what="daemon.reloaded")
    assert emulator.stats()["jobs"][0]["status"] in ("QUEUED", "PROCESSING"), "the first job is in flight"
    [reloaded] = [e for e in proc.events() if e.get("event") == "daemon.reloaded"]
    assert reloaded["changed"] == {"logging.level": ["debug", "info"], "restore.codeformer_fidelity": [0.7, 0.2]}
    [restart] = [e for e in proc.events() if e.get("event") == "daemon.restart_needed"]
    assert restart["keys"] == ["watch.settle_seconds"] and restart["level"] == "warning"

    emulator.latency = 0.2
    drop(folders["inbox"], "second.jpg", seed=2)
    wait_for(lambda: {"first.png", "second.png"} <= {p.name for p in folders["outbox"].iterdir()}, 20,
             what="both outputs")
    first, second = emulator.stats()["jobs"]
    assert first["params"]["codeformer_fidelity"] == 0.7, "a job in flight keeps its parameters"
    assert second["params"]["codeformer_fidelity"] == 0.2, "a new job gets the reloaded ones"
    events = proc.events()
    at = next(i for i, e in enumerate(events) if e.get("event") == "daemon.reloaded")
    assert any(e.get("level") == "debug" for e in events[:at])
    assert not any(e.get("level") == "debug" for e in events[at:]), "logging.level info took effect"

    broken = config_mapping(folders, emulator, restore={"codeformer_fidelity": 1.5})
    write_config(config_path, broken)
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: [e for e in proc.events() if e.get("event") == "daemon.reload_failed"], 10,
             what="daemon.reload_failed")
    [failed] = [e for e in proc.events() if e.get("event") == "daemon.reload_failed"]
    assert "restore.codeformer_fidelity" in failed["reason"] and failed["level"] == "error"
    drop(folders["inbox"], "third.jpg", seed=3)
    wait_for(lambda: (folders["outbox"] / "third.png").exists(), 20, what="the third output")
    assert emulator.stats()["jobs"][2]["params"]["codeformer_fidelity"] == 0.2, "the old configuration stays"
    assert proc.proc.poll() is None
    assert proc.terminate() == 0


def test_what_a_reload_applies_and_what_waits_for_a_restart(make_config):
    old: Config = make_config()
    new: Config = make_config(restore={"upscale": 4}, preflight={"max_pixels": 1000}, shutdown_timeout=5,
                              api={"max_in_flight": 9, "api_key_file": "/etc/codeformer-daemon/api_key"},
                              hosting={"adapter": "builtin", "builtin": {"listen": "127.0.0.1:9"}},
                              watch={"mode": "polling"}, state_dir="/elsewhere")
    applied, needs_restart = reloaded_config(old, new)
    assert applied.restore.upscale == 4 and applied.preflight.max_pixels == 1000 and applied.shutdown_timeout == 5
    assert str(applied.api.api_key_file) == "/etc/codeformer-daemon/api_key"
    assert (applied.api.max_in_flight, applied.hosting, applied.watch, applied.state_dir, applied.folders) == (
        old.api.max_in_flight, old.hosting, old.watch, old.state_dir, old.folders)
    assert needs_restart == ["api.max_in_flight", "hosting.builtin.listen", "state_dir", "watch.mode"]


# --------------------------------------------------------------------------- the unit files


def load_check_units():
    spec = importlib.util.spec_from_file_location("check_units", ROOT / "systemd" / "check_units.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check_units = load_check_units()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["codeformer-daemon.service", "codeformer-daemon@.service"])
def test_the_units_are_hardened_and_verify_cleanly(unit):
    report = check_units.check_unit(ROOT / "systemd" / unit, shutil.which("systemd-analyze"))
    assert report.ok, "\n".join(report.problems)
    assert report.exposure is not None and report.exposure <= check_units.MAX_EXPOSURE


def test_the_unit_check_reads_exposure_and_allows_only_the_missing_binary():
    assert check_units.exposure_of("...\n→ Overall exposure level for x.service: 1.2 OK 🙂\n") == 1.2
    assert check_units.exposure_of("Failed to load unit") is None
    binary = "/opt/codeformer-daemon/venv/bin/codeformer-daemon"
    assert check_units.exec_start_binary(f"[Service]\nExecStart=-{binary} run --config x\n") == binary
    output = (f"x.service: Command {binary} is not executable: No such file or directory\n"
              "x.service:3: Unknown key 'Typo' in section [Service], ignoring.\n")
    assert check_units.unexpected_verify_lines(output, binary) == [
        "x.service:3: Unknown key 'Typo' in section [Service], ignoring."]
    assert check_units.unexpected_verify_lines("Command /bin/kill is not executable: x", binary) != []


@pytest.mark.parametrize("unit", ["codeformer-daemon.service", "codeformer-daemon@.service"])
def test_the_units_speak_notify_reload_by_sighup_and_outwait_the_shutdown(unit):
    text = (ROOT / "systemd" / unit).read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z]\w+=", line))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main" and int(settings["WatchdogSec"]) > 0
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["LoadCredential"].startswith("api_key:")
    environment = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("Environment=")]
    assert all(v.startswith("MALLOC_") for line in environment for v in line.split()), "the key never as one"
    shutdown_default = Config.__dataclass_fields__["shutdown_timeout"].default
    assert int(settings["TimeoutStopSec"]) > shutdown_default + 5


# --------------------------------------------------------------------------- logs under journald


@pytest.mark.parametrize("level, prefix", [
    ("debug", "<7>"), ("info", "<6>"), ("warning", "<4>"), ("warn", "<4>"), ("error", "<3>"),
    ("exception", "<3>"), ("critical", "<2>"), ("fatal", "<2>"), ("something else", "<6>"),
])
def test_syslog_priority_prefix_per_level(level, prefix):
    assert daemon_logging.syslog_prefix(level) == prefix


@pytest.fixture
def restore_structlog():
    old = structlog.get_config()
    yield
    structlog.configure(**old)


def journal_lines(path: Path, monkeypatch, journal_stream: str | None) -> list[str]:
    with open(path, "w", encoding="utf-8") as stream:
        if journal_stream is None:
            stat = os.fstat(stream.fileno())
            journal_stream = f"{stat.st_dev}:{stat.st_ino}"
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream)
        daemon_logging.configure("json", "debug", stream=stream)
        log = structlog.get_logger("test")
        log.debug("a.debug")
        log.info("an.info")
        log.warning("a.warning")
        log.error("an.error")
        log.critical("a.critical")
    return path.read_text(encoding="utf-8").splitlines()


def test_lines_to_the_journal_carry_their_priority(tmp_path, monkeypatch, restore_structlog):
    lines = journal_lines(tmp_path / "journal", monkeypatch, journal_stream=None)
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["a.debug", "an.info", "a.warning", "an.error",
                                                                  "a.critical"]


def test_no_prefix_when_the_stream_is_not_the_journals(tmp_path, monkeypatch, restore_structlog):
    lines = journal_lines(tmp_path / "file", monkeypatch, journal_stream="1:2")  # inherited, not this stream
    assert [json.loads(line)["event"] for line in lines][0] == "a.debug"


def send_request(api_key_value: str) -> None:
    headers = {"Ocp-Apim-Subscription-Key": api_key_value}  # a local that must never reach a log line
    raise ConnectionError(f"provider refused a request with {len(headers)} header(s)")


@pytest.mark.parametrize("format", ["json", "console"])
def test_tracebacks_are_logged_without_local_variables(format, restore_structlog):
    secret = "sk-" + uuid.uuid4().hex  # not registered: only leaving locals out keeps it out
    stream = io.StringIO()
    daemon_logging.configure(format, "debug", stream=stream)
    try:
        send_request(secret)
    except ConnectionError:
        structlog.get_logger("test").exception("job.stage_error")
    text = stream.getvalue()
    assert "send_request" in text and "provider refused a request" in text, text
    assert secret not in text
