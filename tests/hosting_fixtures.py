"""Real storage servers on loopback for the hosting adapters' tests: moto's S3, wsgidav, a plain folder server.

Imported by the test modules that need them (pytest picks up fixtures imported into a module).
Nothing here reaches beyond 127.0.0.1: boto3 is kept away from ~/.aws and from instance metadata.
"""

from __future__ import annotations

import functools
import http.server
import io
import logging
import secrets
import socketserver
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

STANDIN = Path(__file__).with_name("standin_rclone.py")
S3_ACCESS_KEY = "AKIDLOOPBACKTEST0001"
S3_SECRET_KEY = "moto-secret-" + "9f8e7d6c5b4a3f2e1d0c"
DAV_USER = "scanner"
DAV_PASSWORD = "dav-password-" + "5e4d3c2b1a09"


@pytest.fixture(scope="module", autouse=True)
def aws_sandbox() -> Iterator[None]:
    """boto3 in this process (and daemons started from it) reads no real AWS configuration."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "CREDENTIALS_DIRECTORY"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


# --------------------------------------------------------------------------- a plain folder over HTTP


class _QuietFolderHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class FolderServer:
    """Serves a folder read-only over HTTP on loopback: the public side of an rclone remote or a WebDAV share."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        handler = functools.partial(_QuietFolderHandler, directory=str(folder))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def folder_server(tmp_path: Path) -> Iterator[FolderServer]:
    folder = tmp_path / "remote"
    folder.mkdir()
    server = FolderServer(folder)
    yield server
    server.stop()


def command_settings(folder_server: FolderServer, **overrides: Any) -> dict[str, Any]:
    """hosting.command for the stand-in: publish copies into the served folder and prints the URL."""
    folder = str(folder_server.folder)
    settings = {
        "publish": [sys.executable, str(STANDIN), "publish", "{path}", folder, "{key}", folder_server.url],
        "unpublish": [sys.executable, str(STANDIN), "unpublish", folder, "{key}"],
        "timeout": 10,
    }
    settings.update(overrides)
    return settings


# --------------------------------------------------------------------------- S3: moto's server


class MotoS3:
    """moto's standalone S3 server on a loopback port, with a client to set up and inspect buckets."""

    def __init__(self) -> None:
        import boto3
        from botocore.config import Config as BotoConfig
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # its access log prints presigned URLs
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
                                   config=BotoConfig(signature_version="s3v4"))

    def new_bucket(self) -> str:
        name = "scans-" + secrets.token_hex(6)
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        return sorted(o["Key"] for o in self.client.list_objects_v2(Bucket=bucket).get("Contents", []))

    def put(self, bucket: str, key: str, body: bytes = b"x") -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=body)

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="module")
def moto_s3(aws_sandbox: None) -> Iterator[MotoS3]:
    server = MotoS3()
    yield server
    server.stop()


def s3_settings(moto_s3: MotoS3, bucket: str, **overrides: Any) -> dict[str, Any]:
    settings = {"bucket": bucket, "prefix": "scans/", "endpoint_url": moto_s3.endpoint, "region": "us-east-1",
                "addressing_style": "path"}
    settings.update(overrides)
    return settings


def s3_credentials(folder: Path) -> Path:
    """A systemd-style credentials directory holding the S3 key pair."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "s3_access_key_id").write_text(S3_ACCESS_KEY + "\n")
    (folder / "s3_secret_access_key").write_text(S3_SECRET_KEY + "\n")
    return folder


# --------------------------------------------------------------------------- WebDAV: wsgidav


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietWsgiHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _bounded_input(app: Any) -> Any:
    """wsgiref hands over the raw socket as wsgi.input; wsgidav reads a PUT body until EOF, so bound it."""
    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        environ["wsgi.input"] = io.BytesIO(environ["wsgi.input"].read(length) if length > 0 else b"")
        return app(environ, start_response)
    return wrapped


class DavServer:
    """wsgidav on loopback with basic auth over `root/<share>`, plus a plain server for the public side."""

    def __init__(self, root: Path) -> None:
        from wsgidav.wsgidav_app import WsgiDAVApp

        self.folder = root / "scans"
        self.folder.mkdir(parents=True)
        app = WsgiDAVApp({
            "provider_mapping": {"/dav": str(root)},
            "http_authenticator": {"domain_controller": None, "accept_basic": True, "accept_digest": False,
                                   "default_to_digest": False},
            "simple_dc": {"user_mapping": {"*": {DAV_USER: {"password": DAV_PASSWORD}}}},
            "verbose": 0, "logging": {"enable": False}, "dir_browser": {"enable": False},
        })
        self._server = make_server("127.0.0.1", 0, _bounded_input(app), server_class=_Server,
                                   handler_class=_QuietWsgiHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/dav/scans"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()
        self.public = FolderServer(self.folder)

    def stop(self) -> None:
        self.public.stop()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def dav_server(tmp_path: Path) -> Iterator[DavServer]:
    server = DavServer(tmp_path / "dav-root")
    yield server
    server.stop()


def webdav_settings(dav: DavServer, password_file: Path | None = None, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"url": dav.url, "public_url_template": dav.public.url + "/{key}",
                                "username": DAV_USER}
    if password_file is not None:
        password_file.write_text(DAV_PASSWORD + "\n")
        settings["password_file"] = str(password_file)
    settings.update(overrides)
    return settings
