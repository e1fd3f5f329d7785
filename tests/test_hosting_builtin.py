"""The built-in host serves only what is published, only while it is, at unguessable paths."""

from __future__ import annotations

import pytest
import requests

from daemon.hosting import BuiltinHost, new_key
from daemon.hosting.base import KEY_BYTES, HostingError
from daemon.hosting.builtin import MissLimiter, parse_range

from .certs import self_signed


def test_serves_a_published_file_and_nothing_else(tmp_path):
    secret_neighbour = tmp_path / "other.jpg"
    secret_neighbour.write_bytes(b"private")
    scan = tmp_path / "scan.jpg"
    scan.write_bytes(b"\xff\xd8scan bytes" * 50_000)
    host = BuiltinHost("127.0.0.1:0")
    host.start()
    try:
        key = new_key(".jpg")
        url = host.publish(key, scan, "image/jpeg")
        assert url == f"{host.public_url}/{key}" and "scan" not in url
        response = requests.get(url, timeout=5)
        assert response.status_code == 200 and response.content == scan.read_bytes()
        assert response.headers["Content-Type"] == "image/jpeg"
        assert requests.head(url, timeout=5).headers["Content-Length"] == str(scan.stat().st_size)
        for path in ("/", "/scan.jpg", "/other.jpg", f"/{key[:-4]}", "/../other.jpg", f"/{key}/../other.jpg"):
            assert requests.get(host.public_url + path, timeout=5).status_code == 404, path
        assert requests.post(url, timeout=5).status_code == 404  # POST is only for webhook tokens
        for method in ("PUT", "DELETE", "OPTIONS", "PROPFIND"):
            refused = requests.request(method, url, data=b"x", timeout=5)
            assert refused.status_code == 405 and refused.headers["Allow"] == "GET, HEAD", method
        host.unpublish(key)
        assert requests.get(url, timeout=5).status_code == 404
    finally:
        host.stop()


def test_keys_are_unguessable():
    keys = {new_key(".png") for _ in range(1000)}
    assert len(keys) == 1000
    assert KEY_BYTES * 8 >= 128
    assert all(len(k) >= 43 + 4 for k in keys)  # 256 bits in URL-safe base64, plus the suffix


def test_sweep_removes_what_the_journal_no_longer_needs(tmp_path):
    scan = tmp_path / "a.jpg"
    scan.write_bytes(b"x")
    host = BuiltinHost("127.0.0.1:0")
    host.start()
    try:
        keep, drop = new_key(".jpg"), new_key(".jpg")
        host.publish(keep, scan, "image/jpeg")
        host.publish(drop, scan, "image/jpeg")
        assert host.sweep({keep}) == 1 and host.published_count() == 1
    finally:
        host.stop()


def test_webhook_callbacks_only_answer_their_own_token(tmp_path):
    host = BuiltinHost("127.0.0.1:0")
    host.start()
    calls = []
    try:
        key = new_key(".jpg")
        url = host.open_callback(key, lambda: calls.append(key))
        assert url.startswith(f"{host.public_url}/hook/") and key[:-4] not in url
        assert requests.post(url, json={"status": "COMPLETED"}, timeout=5).status_code == 204
        assert calls == [key]
        assert requests.post(f"{host.public_url}/hook/{new_key('')}", json={}, timeout=5).status_code == 404
        try:  # an oversized body is refused unread: a 404, or a reset while the client is still sending
            refused = requests.post(url, data=b"x" * (65 * 1024), timeout=5).status_code == 404
        except requests.ConnectionError:
            refused = True
        assert refused and calls == [key]
        assert requests.get(url, timeout=5).status_code == 404
        host.close_callback(key)
        assert requests.post(url, json={}, timeout=5).status_code == 404
        assert calls == [key]
    finally:
        host.stop()


def test_a_published_file_swapped_for_a_link_is_not_served(tmp_path):
    private = tmp_path / "private.jpg"
    private.write_bytes(b"\xff\xd8 not for the provider")
    scan = tmp_path / "scan.jpg"
    scan.write_bytes(b"\xff\xd8scan bytes")
    host = BuiltinHost("127.0.0.1:0")
    host.start()
    try:
        key = new_key(".jpg")
        url = host.publish(key, scan, "image/jpeg")
        assert requests.get(url, timeout=5).content == b"\xff\xd8scan bytes"
        scan.unlink()
        scan.symlink_to(private)  # swapped after it was published
        assert requests.get(url, timeout=5).status_code == 404
        assert requests.head(url, timeout=5).status_code == 404
        scan.unlink()
        scan.mkdir()  # nor is anything else that is not a regular file
        assert requests.get(url, timeout=5).status_code == 404
        link = tmp_path / "link.jpg"
        link.symlink_to(private)
        with pytest.raises(HostingError):
            host.publish(new_key(".jpg"), link, "image/jpeg")  # a link is never published at all
        assert host.published_count() == 1
    finally:
        host.stop()


@pytest.mark.parametrize("header, expected", [
    (None, None),
    ("bytes=0-99", (0, 99)),
    ("bytes=100-", (100, 999)),
    ("bytes=-100", (900, 999)),
    ("bytes=-5000", (0, 999)),
    ("bytes=990-5000", (990, 999)),
    ("bytes=1000-", "unsatisfiable"),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=50-10", None),  # invalid: ignored, the whole file
    ("bytes=0-1,5-9", None),  # several ranges: the whole file
    ("items=0-5", None),
    ("bytes=-", None),
])
def test_parse_range(header, expected):
    assert parse_range(header, 1000) == expected


def test_range_requests_resume_a_fetch(tmp_path):
    scan = tmp_path / "scan.jpg"
    data = bytes(range(256)) * 40
    scan.write_bytes(data)
    host = BuiltinHost("127.0.0.1:0")
    host.start()
    try:
        url = host.publish(new_key(".jpg"), scan, "image/jpeg")
        part = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=5)
        assert part.status_code == 206 and part.content == data[1000:2000]
        assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        tail = requests.get(url, headers={"Range": "bytes=-10"}, timeout=5)
        assert tail.status_code == 206 and tail.content == data[-10:]
        beyond = requests.get(url, headers={"Range": f"bytes={len(data)}-"}, timeout=5)
        assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{len(data)}"
        whole = requests.get(url, timeout=5)
        assert whole.status_code == 200 and whole.headers["Accept-Ranges"] == "bytes" and whole.content == data
    finally:
        host.stop()


def test_miss_limiter_counts_per_client_and_window():
    limiter = MissLimiter(limit=3, window=60)
    assert [limiter.miss("a", t) for t in (0, 1, 2)] == [False, False, True]
    assert limiter.refused("a", 30) and not limiter.refused("b", 30)
    assert not limiter.miss("a", 31)  # further misses are not announced again
    assert not limiter.refused("a", 60.5)  # a new window
    assert not limiter.miss("a", 61) and not limiter.refused("a", 61)


def test_a_client_guessing_paths_is_refused_and_logged_once(tmp_path, captured_logs):
    import http.client

    scan = tmp_path / "scan.jpg"
    scan.write_bytes(b"scan")
    host = BuiltinHost("127.0.0.1:0", max_misses_per_minute=5)
    host.start()
    try:
        url = host.publish(new_key(".jpg"), scan, "image/jpeg")
        statuses = [requests.get(f"{host.public_url}/{new_key('.jpg')}", timeout=5).status_code for _ in range(8)]
        assert statuses == [404] * 5 + [429] * 3
        # A published file is still served to the same address: behind a reverse proxy the
        # provider shares it with the guessers, and must never be locked out.
        assert requests.get(url, timeout=5).status_code == 200
        port = int(host.public_url.rsplit(":", 1)[1])
        other = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.0.2", 0))
        other.request("GET", f"/{new_key('.jpg')}")
        assert other.getresponse().status == 404  # another client's misses are counted apart
        other.close()
        limited = [e for e in captured_logs if e["event"] == "hosting.rate_limited"]
        assert len(limited) == 1 and limited[0]["client"] == "127.0.0.1"
    finally:
        host.stop()


def test_tls_serves_https_only(tmp_path):
    import socket

    cert, key = self_signed(tmp_path, "host")
    scan = tmp_path / "scan.jpg"
    scan.write_bytes(b"scan bytes")
    host = BuiltinHost("127.0.0.1:0", tls_cert=cert, tls_key=key)
    host.start()
    try:
        url = host.publish(new_key(".jpg"), scan, "image/jpeg")
        assert url.startswith("https://127.0.0.1:")
        assert requests.get(url, verify=str(cert), timeout=5).content == b"scan bytes"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url, timeout=5)  # not trusted without the certificate: really TLS
        port = int(host.public_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=2) as stalled:  # never handshakes
            assert requests.get(url, verify=str(cert), timeout=5).status_code == 200  # others still served
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url.replace("https://", "http://"), timeout=5)  # plain HTTP is not spoken
    finally:
        host.stop()


def test_a_bad_certificate_is_a_clear_start_up_error(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    host = BuiltinHost("127.0.0.1:0", tls_cert=cert, tls_key=key)
    with pytest.raises(HostingError, match="hosting.builtin.tls_cert: cannot load"):
        host.start()
