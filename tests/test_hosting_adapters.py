"""What each remote adapter adds to the contract: start-up checks that say what is wrong, sweeps that
touch nothing the daemon did not name, secrets kept out of errors, and the configuration they need."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from daemon.config import (CommandHostConfig, ConfigError, S3HostConfig, WebdavHostConfig, config_from_mapping)
from daemon.hosting import CommandHost, S3Host, WebdavHost, new_key
from daemon.hosting.base import HostingError
from daemon.logging import mask_secrets

from .conftest import config_mapping, free_port, write_config
from .hosting_fixtures import (DAV_PASSWORD, DAV_USER, S3_ACCESS_KEY, S3_SECRET_KEY,  # noqa: F401
                               aws_sandbox, command_settings, dav_server, folder_server, moto_s3, s3_credentials,
                               s3_settings, webdav_settings)

MiB = 1024 * 1024


def s3_host(moto_s3, tmp_path: Path, bucket: str | None = None, **overrides) -> S3Host:
    settings = S3HostConfig(**s3_settings(moto_s3, bucket or moto_s3.new_bucket(), **overrides))
    return S3Host(settings, url_expiry=1200, connect_timeout=1, read_timeout=5,
                  environ={"CREDENTIALS_DIRECTORY": str(s3_credentials(tmp_path / "credentials"))},
                  multipart_threshold=5 * MiB, multipart_chunk=5 * MiB)


def a_file(tmp_path: Path, name: str = "scan.jpg", data: bytes = b"\xff\xd8 scan") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


class _Answers(http.server.BaseHTTPRequestHandler):
    """A loopback server that answers every request with one status (an S3 or WebDAV server refusing)."""

    status = 403
    seen_authorization: list[str] = []

    def _answer(self) -> None:
        self.seen_authorization.append(self.headers.get("Authorization", ""))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(self.status)
        if self.status == 207:
            body = b'<?xml version="1.0"?><d:multistatus xmlns:d="DAV:"/>'
            self.send_header("Content-Type", "application/xml")
        else:
            body = b""
        if 300 <= self.status < 400:
            self.send_header("Location", "https://elsewhere.example/")
            self.send_header("x-amz-bucket-region", "eu-west-1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_DELETE = do_PROPFIND = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def answering() -> Iterator:
    servers = []

    def start(status: int) -> str:
        handler = type("Handler", (_Answers,), {"status": status, "seen_authorization": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        servers.append(server)
        start.handler = handler
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- S3


def test_s3_objects_are_named_by_prefix_and_key_and_signed_for_url_expiry(moto_s3, tmp_path):
    bucket = moto_s3.new_bucket()
    host = s3_host(moto_s3, tmp_path, bucket, prefix="station-2/scans")  # the missing slash is added
    host.start()
    key = new_key(".jpg")
    url = host.publish(key, a_file(tmp_path, "Aunt Mary.jpg"), "image/jpeg")
    assert moto_s3.keys(bucket) == [f"station-2/scans/{key}"]
    head = moto_s3.client.head_object(Bucket=bucket, Key=f"station-2/scans/{key}")
    assert head["ContentType"] == "image/jpeg"
    assert "X-Amz-Expires=1200" in url and "X-Amz-Signature=" in url and "Aunt" not in url
    host.unpublish(key)
    assert moto_s3.keys(bucket) == []


def test_s3_large_files_go_up_in_parts(moto_s3, tmp_path):
    bucket = moto_s3.new_bucket()
    host = s3_host(moto_s3, tmp_path, bucket)
    host.start()
    key = new_key(".png")
    host.publish(key, a_file(tmp_path, "big.png", os.urandom(11 * MiB)), "image/png")
    etag = moto_s3.client.head_object(Bucket=bucket, Key=f"scans/{key}")["ETag"]
    assert etag.strip('"').endswith("-3"), etag  # 5 + 5 + 1 MiB


def test_s3_sweep_deletes_only_orphans_of_the_daemons_own_shape(moto_s3, tmp_path):
    bucket = moto_s3.new_bucket()
    host = s3_host(moto_s3, tmp_path, bucket)
    host.start()
    kept, orphan = new_key(".jpg"), new_key(".png")
    for name in (f"scans/{kept}", f"scans/{orphan}", "scans/notes.txt", f"scans/deeper/{new_key('.jpg')}",
                 f"elsewhere/{new_key('.jpg')}", f"scans-old/{new_key('.jpg')}"):
        moto_s3.put(bucket, name)
    assert host.sweep({kept}) == 1
    assert f"scans/{orphan}" not in moto_s3.keys(bucket) and len(moto_s3.keys(bucket)) == 5


def test_s3_region_auto_is_signed_as_us_east_1(moto_s3, tmp_path):
    host = s3_host(moto_s3, tmp_path, region="auto")
    host.start()
    url = host.publish(new_key(".jpg"), a_file(tmp_path), "image/jpeg")
    assert "%2Fus-east-1%2Fs3%2Faws4_request" in url
    assert requests.get(url, timeout=5).status_code == 200


@pytest.mark.parametrize("status,says", [(403, "access denied"), (404, "does not exist"),
                                         (301, "another region")])
def test_s3_start_says_why_the_bucket_cannot_be_used(tmp_path, answering, status, says):
    endpoint = answering(status)
    host = S3Host(S3HostConfig(bucket="scans-bucket", endpoint_url=endpoint, region="us-east-1",
                               addressing_style="path"), 1200, connect_timeout=1, read_timeout=2,
                  environ={"CREDENTIALS_DIRECTORY": str(s3_credentials(tmp_path / "c"))})
    with pytest.raises(HostingError, match=says) as raised:
        host.start()
    assert "hosting.s3.bucket" in str(raised.value) and "scans-bucket" in str(raised.value)
    assert S3_SECRET_KEY not in str(raised.value)


def test_s3_start_errors_for_a_missing_bucket_or_endpoint_or_credentials(moto_s3, tmp_path):
    credentials = {"CREDENTIALS_DIRECTORY": str(s3_credentials(tmp_path / "c"))}
    missing = S3Host(S3HostConfig(**s3_settings(moto_s3, "no-such-bucket")), 1200, environ=credentials)
    with pytest.raises(HostingError, match="'no-such-bucket' does not exist"):
        missing.start()
    unreachable = S3Host(S3HostConfig(**s3_settings(moto_s3, "b-bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")),
                         1200, connect_timeout=0.5, read_timeout=1, environ=credentials)
    with pytest.raises(HostingError, match="unreachable") as raised:
        unreachable.start()
    assert S3_SECRET_KEY not in str(raised.value)
    half = tmp_path / "half"
    half.mkdir()
    (half / "s3_access_key_id").write_text(S3_ACCESS_KEY)
    with pytest.raises(HostingError, match="go together"):
        S3Host(S3HostConfig(**s3_settings(moto_s3, "b-bucket")), 1200, environ={"CREDENTIALS_DIRECTORY": str(half)}).start()
    with pytest.raises(HostingError, match="no credentials found"):
        S3Host(S3HostConfig(**s3_settings(moto_s3, "b-bucket")), 1200, environ={}).start()
    with pytest.raises(HostingError, match="hosting.s3.profile"):
        S3Host(S3HostConfig(**s3_settings(moto_s3, "b-bucket", profile="nope")), 1200, environ={}).start()


def test_s3_credentials_are_masked_once_read(moto_s3, tmp_path):
    host = s3_host(moto_s3, tmp_path)
    host.start()
    assert S3_SECRET_KEY not in mask_secrets(f"oops {S3_SECRET_KEY}")
    assert S3_ACCESS_KEY not in mask_secrets(f"oops {S3_ACCESS_KEY}")


# --------------------------------------------------------------------------- command


def test_command_errors_say_why_with_the_end_of_stderr(folder_server, tmp_path):
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in command_settings(folder_server).items()}
    host = CommandHost(CommandHostConfig(**{**settings, "timeout": 1.0}))
    host.start()
    with pytest.raises(HostingError, match="exited with status 1.*stderr: .*quota exceeded"):
        host.publish(new_key(".jpg"), a_file(tmp_path, "exit1.jpg"), "image/jpeg")
    started = time.monotonic()
    with pytest.raises(HostingError, match="did not finish within 1 s and was killed"):
        host.publish(new_key(".jpg"), a_file(tmp_path, "hang.jpg"), "image/jpeg")
    assert time.monotonic() - started < 5
    with pytest.raises(HostingError, match="printed no http\\(s\\) URL.*got nothing"):
        host.publish(new_key(".jpg"), a_file(tmp_path, "silent.jpg"), "image/jpeg")


def test_command_runs_without_a_shell_and_without_the_api_key(tmp_path):
    probe = ("import os, sys; open(sys.argv[2], 'w').write(sys.argv[1]); "
             "print('http://127.0.0.1/' + ('LEAKED' if 'CODEFORMER_API_KEY' in os.environ else 'clean'))")
    record = tmp_path / "argument"
    host = CommandHost(CommandHostConfig(publish=(sys.executable, "-c", probe, "{path}", str(record), "{key}"),
                                         unpublish=(sys.executable, "-c", "pass", "{key}")),
                       environ={**os.environ, "CODEFORMER_API_KEY": "sk-never-passed-on"})
    host.start()
    odd = a_file(tmp_path, "a; touch pwned $(touch pwned2) `touch pwned3`.jpg")
    url = host.publish(new_key(".jpg"), odd, "image/jpeg")
    assert url == "http://127.0.0.1/clean"
    assert record.read_text() == str(odd)
    assert not any(p.name.startswith("pwned") for p in Path.cwd().iterdir())
    assert not any(p.name.startswith("pwned") for p in tmp_path.iterdir())


def test_command_url_template_wins_over_the_output(folder_server, tmp_path):
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in command_settings(folder_server).items()}
    host = CommandHost(CommandHostConfig(**{**settings, "url_template": "https://files.example/s/{key}"}))
    host.start()
    key = new_key(".jpg")
    assert host.publish(key, a_file(tmp_path), "image/jpeg") == f"https://files.example/s/{key}"
    assert (folder_server.folder / key).exists()


def test_command_start_refuses_a_program_that_is_not_there():
    host = CommandHost(CommandHostConfig(publish=("rclone-not-installed-here", "copyto", "{path}", "r:{key}"),
                                         unpublish=("rclone-not-installed-here", "deletefile", "r:{key}")))
    with pytest.raises(HostingError, match="hosting.command.publish: cannot run 'rclone-not-installed-here'"):
        host.start()


# --------------------------------------------------------------------------- WebDAV


def test_webdav_start_says_what_is_wrong(dav_server, tmp_path, answering):
    settings = webdav_settings(dav_server, tmp_path / "pw")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    cases = [
        ({**settings, "password_file": wrong}, "HTTP 401: check hosting.webdav.username"),
        ({**settings, "url": dav_server.url + "/missing"}, "HTTP 404: the folder does not exist"),
        ({**settings, "url": f"http://127.0.0.1:{free_port()}/dav"}, "unreachable"),
        ({**settings, "url": answering(302)}, "redirected to https://elsewhere.example/"),
    ]
    for values, says in cases:
        values = {**values, "password_file": Path(values["password_file"])}
        host = WebdavHost(WebdavHostConfig(**values), connect_timeout=0.5, read_timeout=2, environ={})
        with pytest.raises(HostingError, match=says) as raised:
            host.start()
        assert "not-the-password" not in str(raised.value) and DAV_PASSWORD not in str(raised.value)
    no_password = WebdavHost(WebdavHostConfig(url=dav_server.url, public_url_template="http://x/{key}",
                                              username=DAV_USER), environ={})
    with pytest.raises(HostingError, match="webdav_password"):
        no_password.start()


def test_webdav_password_from_a_systemd_credential_and_sweep_leaves_foreign_files(dav_server, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "webdav_password").write_text(DAV_PASSWORD)
    host = WebdavHost(WebdavHostConfig(url=dav_server.url, public_url_template=dav_server.public.url + "/{key}",
                                       username=DAV_USER), environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    host.start()
    assert DAV_PASSWORD not in mask_secrets(DAV_PASSWORD)
    kept, orphan = new_key(".jpg"), new_key(".jpg")
    for key in (kept, orphan):
        host.publish(key, a_file(tmp_path), "image/jpeg")
    (dav_server.folder / "notes.txt").write_text("mine")
    (dav_server.folder / "album").mkdir()
    (dav_server.folder / "album" / new_key(".jpg")).write_text("deeper: not the daemon's")
    assert host.sweep({kept}) == 1
    assert sorted(p.name for p in dav_server.folder.iterdir()) == sorted(["album", "notes.txt", kept])


def test_webdav_without_propfind_publishes_but_cannot_sweep(answering):
    host = WebdavHost(WebdavHostConfig(url=answering(405) + "/dav", public_url_template="https://x.example/{key}"),
                      environ={})
    host.start()  # reachable and let in: only listing is missing (nginx's dav module)
    assert host.sweep(set()) == 0


def test_webdav_bearer_token_is_sent_as_such(answering, tmp_path):
    endpoint = answering(207)
    token = tmp_path / "token"
    token.write_text("tok-0123456789abcdef\n")
    host = WebdavHost(WebdavHostConfig(url=endpoint + "/dav", public_url_template="https://x.example/{key}",
                                       token_file=token), environ={})
    host.start()
    assert answering.handler.seen_authorization == ["Bearer tok-0123456789abcdef"]
    assert "tok-0123456789abcdef" not in mask_secrets("tok-0123456789abcdef")


# --------------------------------------------------------------------------- configuration

BAD_HOSTING = [
    ({"adapter": "s3"}, "hosting.s3.bucket: required when hosting.adapter is s3"),
    ({"adapter": "s3", "s3": {"bucket": "b", "region": "auto"}}, "hosting.s3.region"),
    ({"adapter": "s3", "s3": {"bucket": "b", "addressing_style": "dns"}}, "hosting.s3.addressing_style"),
    ({"adapter": "s3", "s3": {"bucket": "b", "endpoint_url": "minio:9000"}}, "hosting.s3.endpoint_url"),
    ({"adapter": "s3", "s3": {"bucket": "b", "secret_access_key": "x"}}, "hosting.s3.secret_access_key: unknown key"),
    ({"adapter": "command"}, "hosting.command.publish: required when hosting.adapter is command"),
    ({"adapter": "command", "command": {"publish": "rclone copyto {path} r:{key}", "unpublish": ["rm", "{key}"]}},
     "hosting.command.publish: expected a list"),
    ({"adapter": "command", "command": {"publish": ["cp", "{path}", "/srv/{name}"], "unpublish": ["rm", "{key}"]}},
     "hosting.command.publish: unknown placeholder {name}"),
    ({"adapter": "command", "command": {"publish": ["cp", "/x", "/srv/{key}"], "unpublish": ["rm", "{key}"]}},
     "hosting.command.publish: must contain {path}"),
    ({"adapter": "command", "command": {"publish": ["cp", "{path}", "/srv/{key}"]}},
     "hosting.command.unpublish: required"),
    ({"adapter": "command", "command": {"publish": ["cp", "{path}", "/srv/{key}"], "unpublish": ["rm", "{path}"]}},
     "hosting.command.unpublish: unknown placeholder {path}"),
    ({"adapter": "command", "command": {"publish": ["cp", "{path}", "/srv/{key}"], "unpublish": ["rm", "{key}"],
                                        "url_template": "https://files.example/scans/"}},
     "hosting.command.url_template: must contain {key}"),
    ({"adapter": "webdav"}, "hosting.webdav.url: required when hosting.adapter is webdav"),
    ({"adapter": "webdav", "webdav": {"url": "https://dav.example/scans"}},
     "hosting.webdav.public_url_template: required"),
    ({"adapter": "webdav", "webdav": {"url": "https://dav.example/scans", "public_url_template": "ftp://x/{key}"}},
     "hosting.webdav.public_url_template: expected an http(s) URL"),
    ({"adapter": "webdav", "webdav": {"url": "https://dav.example/s", "public_url_template": "https://x/{key}",
                                      "username": "u", "token_file": "/t"}}, "hosting.webdav.token_file"),
    ({"adapter": "webdav", "webdav": {"url": "https://u:pw@dav.example/s", "public_url_template": "https://x/{key}"}},
     "hosting.webdav.url: no credentials in the URL"),
]


@pytest.mark.parametrize("hosting,says", BAD_HOSTING, ids=[s.split(":")[0] + "-" + str(i) for i, (_, s) in
                                                          enumerate(BAD_HOSTING)])
def test_each_adapter_names_the_key_it_misses(folders, emulator, hosting, says):
    mapping = config_mapping(folders, emulator, hosting=hosting)
    with pytest.raises(ConfigError) as raised:
        config_from_mapping(mapping, folders["inbox"].parent)
    assert says in str(raised.value)


def test_url_expiry_defaults_to_job_timeout_plus_a_margin(folders, emulator):
    def build(**s3):
        mapping = config_mapping(folders, emulator, hosting={"adapter": "s3", "s3": {"bucket": "b", **s3}})
        return config_from_mapping(mapping, folders["inbox"].parent)

    config = build()
    assert config.hosting.s3.expiry_for(config.api.job_timeout) == 60 + 600
    assert build(url_expiry=3600).hosting.s3.expiry_for(60) == 3600
    mapping = config_mapping(folders, emulator, api={"job_timeout": 900},
                             hosting={"adapter": "s3", "s3": {"bucket": "b", "url_expiry": 300}})
    with pytest.raises(ConfigError, match="hosting.s3.url_expiry: 300 s is shorter than api.job_timeout"):
        config_from_mapping(mapping, folders["inbox"].parent)


def test_s3_without_boto3_is_a_configuration_error_naming_the_extra(tmp_path, folders, emulator):
    mapping = config_mapping(folders, emulator, hosting={"adapter": "s3", "s3": {"bucket": "scans"}})
    path = write_config(tmp_path / "config.yaml", mapping)
    code = ("import sys; sys.modules['boto3'] = None; from daemon.cli import main; "
            f"sys.exit(main(['run', '--config', {str(path)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "CODEFORMER_API_KEY": "k-1234567890"})
    assert result.returncode == 2, result.stderr
    assert "hosting.adapter: s3 needs boto3" in result.stderr and "codeformer-daemon[s3]" in result.stderr
    assert not folders["state"].exists()
