"""The built-in host serves only what is published, only while it is, at unguessable paths."""

from __future__ import annotations

import pytest
import requests

from daemon.hosting import BuiltinHost, new_key
from daemon.hosting.base import KEY_BYTES, HostingError


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
        assert requests.put(url, data=b"x", timeout=5).status_code == 501
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
        token = new_key("")
        url = host.open_callback(token, lambda: calls.append(token))
        assert url == f"{host.public_url}/hook/{token}"
        assert requests.post(url, json={"status": "COMPLETED"}, timeout=5).status_code == 204
        assert calls == [token]
        assert requests.post(f"{host.public_url}/hook/{new_key('')}", json={}, timeout=5).status_code == 404
        try:  # an oversized body is refused unread: a 404, or a reset while the client is still sending
            refused = requests.post(url, data=b"x" * (65 * 1024), timeout=5).status_code == 404
        except requests.ConnectionError:
            refused = True
        assert refused and calls == [token]
        assert requests.get(url, timeout=5).status_code == 404
        host.close_callback(token)
        assert requests.post(url, json={}, timeout=5).status_code == 404
        assert calls == [token]
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
