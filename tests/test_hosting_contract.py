"""One contract, every adapter: the same tests run against built-in, S3, command and WebDAV hosting.

Each adapter works against a real server on loopback (moto's S3, a stand-in for rclone copying into a
folder served over HTTP, wsgidav with basic auth), and each URL is fetched the way the provider does:
a plain GET with no credentials.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from daemon.config import HOSTING_ADAPTERS, CommandHostConfig, S3HostConfig, WebdavHostConfig
from daemon.hosting import ADAPTERS, BuiltinHost, CommandHost, HostingAdapter, S3Host, WebdavHost, new_key
from daemon.hosting.base import HostingError

from .hosting_fixtures import (aws_sandbox, command_settings, dav_server, folder_server,  # noqa: F401
                               moto_s3, s3_credentials, s3_settings, webdav_settings)

MiB = 1024 * 1024


@dataclass
class Hosted:
    """An adapter under test, started, and what its kind promises."""

    host: HostingAdapter
    lists: bool
    """True if `sweep` can find what was published before (adapters that cannot, return 0)."""


def make_host(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Hosted:
    if name == "builtin":
        return Hosted(BuiltinHost("127.0.0.1:0"), lists=True)
    if name == "s3":
        moto = request.getfixturevalue("moto_s3")
        credentials = s3_credentials(tmp_path / "credentials")
        # Parts of 5 MiB (S3's minimum) so that the large-file test goes up in several parts.
        return Hosted(S3Host(S3HostConfig(**s3_settings(moto, moto.new_bucket())), url_expiry=900,
                             environ={"CREDENTIALS_DIRECTORY": str(credentials)},
                             multipart_threshold=5 * MiB, multipart_chunk=5 * MiB), lists=True)
    if name == "command":
        settings = command_settings(request.getfixturevalue("folder_server"))
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
        return Hosted(CommandHost(CommandHostConfig(**settings)), lists=False)
    if name == "webdav":
        dav = request.getfixturevalue("dav_server")
        settings = webdav_settings(dav, tmp_path / "dav-password")
        settings["password_file"] = Path(settings["password_file"])
        return Hosted(WebdavHost(WebdavHostConfig(**settings)), lists=True)
    raise AssertionError(name)


@pytest.fixture(params=list(HOSTING_ADAPTERS))
def hosted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hosted]:
    hosted = make_host(request.param, request, tmp_path)
    hosted.host.start()
    yield hosted
    hosted.host.stop()


def scan(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "files" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def fetch(url: str) -> requests.Response:
    return requests.get(url, timeout=10)


def gone(url: str) -> bool:
    return fetch(url).status_code in (403, 404)


def test_every_adapter_is_registered_and_configurable():
    assert set(ADAPTERS) == set(HOSTING_ADAPTERS)


@pytest.mark.parametrize("suffix,content_type", [(".jpg", "image/jpeg"), (".png", "image/png")])
def test_publish_serves_exactly_the_bytes_under_the_key_not_the_name(hosted, tmp_path, suffix, content_type):
    data = os.urandom(200_000)
    path = scan(tmp_path, "Grandma Rose 1962 private" + suffix, data)
    key = new_key(suffix)
    url = hosted.host.publish(key, path, content_type)
    assert url.startswith(("http://", "https://"))
    assert key in url and "Grandma" not in url and "private" not in url
    response = fetch(url)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["Content-Type"] == content_type


def test_unpublish_makes_the_url_unfetchable_and_may_be_repeated(hosted, tmp_path):
    path = scan(tmp_path, "scan.jpg", b"\xff\xd8" + os.urandom(5000))
    key = new_key(".jpg")
    url = hosted.host.publish(key, path, "image/jpeg")
    assert fetch(url).status_code == 200
    hosted.host.unpublish(key)
    assert gone(url)
    hosted.host.unpublish(key)  # again: fine
    hosted.host.unpublish(new_key(".jpg"))  # never published: fine too
    assert gone(url)


def test_publishing_a_key_again_replaces_what_it_serves(hosted, tmp_path):
    key = new_key(".jpg")
    hosted.host.publish(key, scan(tmp_path, "first.jpg", b"first version"), "image/jpeg")
    url = hosted.host.publish(key, scan(tmp_path, "second.jpg", b"second version"), "image/jpeg")
    assert fetch(url).content == b"second version"
    hosted.host.unpublish(key)


def test_sweep_removes_what_keep_does_not_name(hosted, tmp_path):
    path = scan(tmp_path, "scan.png", b"\x89PNG" + os.urandom(1000))
    kept, orphans = new_key(".png"), [new_key(".png"), new_key(".jpg")]
    urls = {key: hosted.host.publish(key, path, "image/png") for key in [kept, *orphans]}
    removed = hosted.host.sweep({kept})
    assert fetch(urls[kept]).status_code == 200
    if hosted.lists:
        assert removed == len(orphans)
        assert all(gone(urls[key]) for key in orphans)
    else:  # it cannot list what it published: nothing removed, nothing claimed
        assert removed == 0
        assert all(fetch(urls[key]).status_code == 200 for key in orphans)
    assert hosted.host.sweep({kept, *orphans}) == 0  # nothing more to remove
    for key in [kept, *orphans]:
        hosted.host.unpublish(key)


def test_a_link_is_never_published(hosted, tmp_path):
    private = scan(tmp_path, "private.jpg", b"\xff\xd8 not for the provider")
    link = tmp_path / "files" / "link.jpg"
    link.symlink_to(private)
    with pytest.raises(HostingError):
        hosted.host.publish(new_key(".jpg"), link, "image/jpeg")
    with pytest.raises(HostingError):
        hosted.host.publish(new_key(".jpg"), tmp_path / "files" / "missing.jpg", "image/jpeg")


def test_a_large_file_arrives_whole(hosted, tmp_path):
    data = os.urandom(12 * MiB + 12345)  # over the S3 test host's 5 MiB part size: a multipart upload
    key = new_key(".png")
    url = hosted.host.publish(key, scan(tmp_path, "large.png", data), "image/png")
    response = fetch(url)
    assert response.status_code == 200 and len(response.content) == len(data) and response.content == data
    hosted.host.unpublish(key)
    assert gone(url)
