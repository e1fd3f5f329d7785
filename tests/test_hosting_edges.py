"""The hosting side at its edges: webhook tokens that give nothing away, a built-in host that a flood
of connections cannot starve, and command programs that never see the daemon's secrets."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from daemon.config import API_KEY_ENV, BuiltinHostConfig, CommandHostConfig, ConfigError, config_from_mapping
from daemon.hosting import BuiltinHost, CommandHost, new_key
from daemon.hosting.limits import CONNECTION_THREAD, MissLimiter

from .conftest import config_mapping, wait_for


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "scan.jpg"
    path.write_bytes(b"\xff\xd8scan bytes" * 1000)
    return path


def start_host(**options) -> BuiltinHost:
    host = BuiltinHost("127.0.0.1:0", **options)
    host.start()
    return host


def port_of(host: BuiltinHost) -> int:
    return int(host.public_url.rsplit(":", 1)[1])


def shared_pieces(a: str, b: str, length: int = 6) -> set[str]:
    """Every run of `length` characters found in both strings."""
    return {a[i:i + length] for i in range(len(a) - length + 1)} & {b[i:i + length] for i in range(len(b) - length + 1)}


# --------------------------------------------------------------------------- webhook tokens


def test_a_webhook_url_shares_nothing_with_its_files_key_and_never_serves_the_file(scan):
    host = start_host()
    calls = []
    try:
        key = new_key(".jpg")
        file_url = host.publish(key, scan, "image/jpeg")
        hook_url = host.open_callback(key, lambda: calls.append(key))
        token = hook_url.rsplit("/", 1)[1]
        assert hook_url == f"{host.public_url}/hook/{token}" and len(token) >= 43  # 256 random bits
        assert shared_pieces(key, hook_url) == set() and shared_pieces(token, file_url) == set()
        assert host.open_callback(key, lambda: calls.append("again")) == hook_url  # same key, same URL

        assert requests.post(hook_url, json={"status": "COMPLETED"}, timeout=5).status_code == 204
        assert calls == ["again"]  # the callback opened last answers
        for guess in (f"/{token}.jpg", f"/{token}.png", f"/{token}", f"/hook/{key}", f"/hook/{key[:-4]}"):
            assert requests.get(host.public_url + guess, timeout=5).status_code == 404, guess
        assert requests.post(f"{host.public_url}/hook/{key[:-4]}", timeout=5).status_code == 404

        host.close_callback(key)
        assert requests.post(hook_url, json={}, timeout=5).status_code == 404
        assert calls == ["again"]
        assert requests.get(file_url, timeout=5).content == scan.read_bytes()  # the file stays published
        host.close_callback(key)  # an unknown key is fine
    finally:
        host.stop()


def test_unpublish_and_sweep_close_the_webhooks_of_what_they_remove(scan):
    host = start_host()
    try:
        done, orphan, kept = new_key(".jpg"), new_key(".png"), new_key(".jpg")
        hooks = {}
        for key in (done, orphan, kept):
            host.publish(key, scan, "image/jpeg")
            hooks[key] = host.open_callback(key, lambda: None)
        assert len(set(hooks.values())) == 3
        host.unpublish(done)
        assert requests.post(hooks[done], timeout=5).status_code == 404
        assert requests.post(hooks[orphan], timeout=5).status_code == 204
        assert host.sweep({kept}) == 1
        assert requests.post(hooks[orphan], timeout=5).status_code == 404
        assert requests.post(hooks[kept], timeout=5).status_code == 204
    finally:
        host.stop()


# --------------------------------------------------------------------------- what other methods get


@pytest.mark.parametrize("method, status", [
    ("PUT", 405), ("DELETE", 405), ("PATCH", 405), ("OPTIONS", 405), ("TRACE", 405), ("PROPFIND", 405),
    ("MKCOL", 405), ("POST", 404), ("COPY", 501), ("BREW", 501),
])
def test_other_methods_get_what_the_readme_says(scan, method, status):
    host = start_host()
    try:
        key = new_key(".jpg")
        host.publish(key, scan, "image/jpeg")
        connection = http.client.HTTPConnection("127.0.0.1", port_of(host), timeout=5)
        connection.request(method, f"/{key}", body=b"x")
        answer = connection.getresponse()
        assert answer.status == status
        if status == 405:
            assert answer.getheader("Allow") == "GET, HEAD"
        connection.close()
    finally:
        host.stop()


# --------------------------------------------------------------------------- a flood of connections


def connection_threads() -> int:
    return sum(t.name == CONNECTION_THREAD for t in threading.enumerate())


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """Connections that never send a byte."""
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def answered_busy(sock: socket.socket) -> bool:
    """True if the server answered 503 and closed (a client that sent nothing is never reset)."""
    answer = b""
    while chunk := sock.recv(4096):
        answer += chunk
    return answer.startswith(b"HTTP/1.0 503 ") and b"\r\nRetry-After: 1\r\n" in answer


def closed_by_server(sock: socket.socket) -> bool:
    """True if the server closed without an answer (a reset counts too)."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def fetch_refused(url: str) -> bool:
    """A real fetch meets the cap: a 503, or a reset if its request came in just as the refusal closed."""
    try:
        answer = requests.get(url, timeout=5)
    except requests.ConnectionError:
        return True
    return answer.status_code == 503 and answer.headers["Retry-After"] == "1"


def readable(socks: list[socket.socket], wait: float) -> list[socket.socket]:
    return select.select(socks, [], [], wait)[0]


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_a_flood_of_idle_connections_is_bounded_and_a_fetch_gets_through_after_it(scan, sockets, captured_logs):
    header_timeout = 3.0
    host = start_host(max_connections=8, header_timeout=header_timeout)
    try:
        url = host.publish(new_key(".jpg"), scan, "image/jpeg")
        started = time.monotonic()
        sockets += idle_connections(port_of(host), 40)

        # The 32 beyond the cap are answered at once, on the accepting thread: no thread each.
        refused: list[socket.socket] = []
        while len(refused) < 32 and time.monotonic() - started < 2:
            for sock in readable([s for s in sockets if s not in refused], 0.1):
                assert answered_busy(sock)
                refused.append(sock)
        assert len(refused) == 32, f"{len(refused)} of 32 excess connections turned away within 2 s"
        assert time.monotonic() - started < header_timeout  # answered, not timed out
        wait_for(lambda: connection_threads() == 8, 5, what="eight connection threads")
        assert connection_threads() == 8
        held = [s for s in sockets if s not in refused]
        assert readable(held, 0) == []  # the eight with a slot are still open, waiting for a request

        assert fetch_refused(url)  # a real fetch now meets the cap too, and hears so at once
        busy_logs = [e for e in captured_logs if e["event"] == "hosting.busy"]
        assert len(busy_logs) == 1 and busy_logs[0]["max_connections"] == 8  # a flood is one line a minute
        assert connection_threads() <= 8

        # The idle ones lose their slots after header_timeout (not the 30 s I/O timeout) ...
        wait_for(lambda: len(readable(held, 0)) == 8, 10, what="the idle connections closed by the server")
        assert all(closed_by_server(s) for s in held)
        assert time.monotonic() - started < header_timeout + 5
        # ... and the provider is served again.
        wait_for(lambda: connection_threads() == 0, 5, what="connection threads gone")
        fetched = requests.get(url, timeout=5)
        assert fetched.status_code == 200 and fetched.content == scan.read_bytes()
    finally:
        host.stop()


def test_slots_come_back_when_idle_clients_hang_up(scan, sockets):
    host = start_host(max_connections=4, header_timeout=60)
    try:
        url = host.publish(new_key(".jpg"), scan, "image/jpeg")
        sockets += idle_connections(port_of(host), 4)
        wait_for(lambda: connection_threads() == 4, 5, what="every slot taken")
        assert fetch_refused(url)
        for sock in sockets:
            sock.close()
        wait_for(lambda: connection_threads() == 0, 5, what="the slots freed")
        assert requests.get(url, timeout=5).status_code == 200
    finally:
        host.stop()


def test_over_tls_excess_connections_are_closed_and_a_stalled_handshake_frees_its_slot(tmp_path, scan, sockets):
    from .certs import self_signed

    cert, key_file = self_signed(tmp_path, "host")
    host = start_host(max_connections=2, header_timeout=1.5, tls_cert=cert, tls_key=key_file)
    try:
        url = host.publish(new_key(".jpg"), scan, "image/jpeg")
        started = time.monotonic()
        sockets += idle_connections(port_of(host), 3)  # plain TCP: never a handshake
        first_closed = readable(sockets, 1.0)
        assert len(first_closed) == 1 and closed_by_server(first_closed[0])  # no 503 without a handshake
        assert time.monotonic() - started < 1.0
        stalled = [s for s in sockets if s is not first_closed[0]]
        wait_for(lambda: len(readable(stalled, 0)) == 2, 6, what="the stalled handshakes given up")
        assert all(closed_by_server(s) for s in stalled) and time.monotonic() - started < 6
        wait_for(lambda: connection_threads() == 0, 5, what="connection threads gone")
        assert requests.get(url, verify=str(cert), timeout=5).content == scan.read_bytes()
    finally:
        host.stop()


def test_a_client_trickling_its_request_loses_its_slot_at_the_deadline(scan):
    """A byte every 0.3 s keeps a plain socket timeout from ever firing; the request head's deadline does."""
    host = start_host(max_connections=2, header_timeout=1.5)
    try:
        key = new_key(".jpg")
        host.publish(key, scan, "image/jpeg")
        request = f"GET /{key} HTTP/1.1\r\nHost: x\r\n" + "X-Slow: " + "a" * 200
        with socket.create_connection(("127.0.0.1", port_of(host)), timeout=5) as sock:
            started = time.monotonic()
            closed_after = None
            for byte in request.encode():
                if time.monotonic() - started > 5:
                    break  # still open long past the deadline
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed_after = time.monotonic() - started
                    break
                if readable([sock], 0.3):
                    assert closed_by_server(sock)
                    closed_after = time.monotonic() - started
                    break
            assert closed_after is not None and 1.2 < closed_after < 4, closed_after
    finally:
        host.stop()


def test_a_client_at_its_own_pace_within_the_deadline_is_served(scan):
    host = start_host(max_connections=2, header_timeout=2)
    try:
        key = new_key(".jpg")
        host.publish(key, scan, "image/jpeg")
        with socket.create_connection(("127.0.0.1", port_of(host)), timeout=5) as sock:
            sock.sendall(f"GET /{key} HTTP/1.0\r\n".encode())
            time.sleep(0.5)
            sock.sendall(b"Host: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and body == scan.read_bytes()
    finally:
        host.stop()


def test_the_connection_cap_comes_from_the_configuration(scan, sockets):
    assert BuiltinHostConfig().max_connections == 64
    host = BuiltinHost.from_config(BuiltinHostConfig(listen="127.0.0.1:0", max_connections=3))
    host.start()
    try:
        url = host.publish(new_key(".jpg"), scan, "image/jpeg")
        sockets += idle_connections(port_of(host), 3)
        wait_for(lambda: connection_threads() == 3, 5, what="every slot taken")
        assert fetch_refused(url)
    finally:
        host.stop()


@pytest.mark.parametrize("value", [0, 257])
def test_a_connection_cap_out_of_range_is_refused(tmp_path, folders, emulator, value):
    mapping = config_mapping(folders, emulator, hosting={"adapter": "builtin",
                                                         "builtin": {"listen": "127.0.0.1:0", "max_connections": value}})
    with pytest.raises(ConfigError, match="hosting.builtin.max_connections"):
        config_from_mapping(mapping, tmp_path)


def test_miss_limiter_counts_exactly_under_concurrent_misses():
    threads, per_thread = 16, 1000
    limiter = MissLimiter(limit=threads * per_thread, window=3600)
    fired: list[bool] = []
    fired_lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def guess() -> None:
        barrier.wait()
        mine = [limiter.miss("203.0.113.9", 1.0) for _ in range(per_thread)]
        with fired_lock:
            fired.extend(mine)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a lost update shows at once
    try:
        workers = [threading.Thread(target=guess) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
    finally:
        sys.setswitchinterval(old)
    assert len(fired) == threads * per_thread
    assert fired.count(True) == 1  # exactly the last miss takes it to the limit: none was lost
    assert limiter.refused("203.0.113.9", 2.0)
    assert not limiter.miss("203.0.113.9", 2.0)


# --------------------------------------------------------------------------- the command's environment


DUMP_ENVIRONMENT = ("import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w')); "
                    "print('http://127.0.0.1/' + sys.argv[2])")
"""A publish command that records its whole environment (given only test values: see below)."""
DUMP_NAMES = ("import json, os, sys; json.dump(sorted(os.environ), open(sys.argv[1], 'w')); "
              "print('http://127.0.0.1/' + sys.argv[2])")
"""The same, but only the names: for a child of this process's real environment, whose values stay put."""


def dumping_host(record, script: str, environ=None) -> CommandHost:
    settings = CommandHostConfig(publish=(sys.executable, "-c", script, str(record), "{key}"),
                                 unpublish=(sys.executable, "-c", "pass", "{key}"))
    return CommandHost(settings, environ=environ)


def test_a_command_never_sees_the_daemons_secrets_but_keeps_its_own_settings(tmp_path, scan):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    record = tmp_path / "environment.json"
    handed_to_the_daemon = {
        "CREDENTIALS_DIRECTORY": str(credentials), API_KEY_ENV: "sk-never-passed-on",
        "CODEFORMER_WEBDAV_PASSWORD": "another-secret", "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1", "LISTEN_FDS": "1", "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "http"}
    for_the_program = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "RCLONE_CONFIG": "/etc/rclone.conf",
                       "RCLONE_CONFIG_PASS": "rclone's own", "AWS_SECRET_ACCESS_KEY": "aws cli's own",
                       "SSH_AUTH_SOCK": "/run/agent"}
    host = dumping_host(record, DUMP_ENVIRONMENT, {**handed_to_the_daemon, **for_the_program})
    host.start()
    key = new_key(".jpg")
    assert host.publish(key, scan, "image/jpeg") == f"http://127.0.0.1/{key}"
    seen = json.loads(record.read_text())
    assert sorted(set(handed_to_the_daemon) & set(seen)) == []
    assert {name: seen.get(name) for name in for_the_program} == for_the_program  # passed on untouched


def test_a_command_run_from_the_daemons_own_environment_has_no_credentials_directory(tmp_path, scan, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))  # as systemd's LoadCredential= sets it
    monkeypatch.setenv(API_KEY_ENV, "sk-never-passed-on")
    record = tmp_path / "names.json"
    host = dumping_host(record, DUMP_NAMES)  # no environ given: the daemon's own
    host.start()
    host.publish(new_key(".jpg"), scan, "image/jpeg")
    names = json.loads(record.read_text())
    assert [name for name in ("CREDENTIALS_DIRECTORY", API_KEY_ENV) if name in names] == []
    assert "PATH" in names
    assert os.environ["CREDENTIALS_DIRECTORY"] == str(credentials)  # the daemon itself keeps it
