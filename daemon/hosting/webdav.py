"""The WebDAV host: each scan PUT into a folder (Nextcloud, ownCloud, nginx, Apache) that a public URL serves.

`hosting.webdav.url` is the collection (folder) the daemon writes to, with a username and password
(basic auth) or a bearer token, or no credentials at all; `public_url_template` is where the same
file can be fetched without them, with `{key}` for the file's random name (a Nextcloud public share
of that folder, an nginx location). The password comes from `password_file` or the systemd
credential `webdav_password`, the token from `token_file` or the credential `webdav_token`; both are
registered for masking when read. Requests never follow redirects, so credentials go nowhere else.
"""

from __future__ import annotations

import os
import posixpath
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests
import structlog
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from ..config import WebdavHostConfig
from .base import HostingAdapter, HostingError, key_for_logs, open_for_upload
from .remote import read_credential, read_secret, remove_orphans, tail

log = structlog.get_logger("daemon.hosting.webdav")

PASSWORD_CREDENTIAL = "webdav_password"
TOKEN_CREDENTIAL = "webdav_token"
_DAV = "{DAV:}"
_LIST_BODY = (b'<?xml version="1.0" encoding="utf-8"?>'
              b'<d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/></d:prop></d:propfind>')


class _Bearer(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


def transport_retry() -> Retry:
    """Connect errors and 502/503/504 retried with backoff; every method here is idempotent."""
    return Retry(total=3, connect=3, read=1, status=2, backoff_factor=0.25, status_forcelist=(502, 503, 504),
                 allowed_methods=frozenset({"PUT", "DELETE", "PROPFIND", "GET", "HEAD", "OPTIONS"}),
                 raise_on_status=False, respect_retry_after_header=True)


class WebdavHost(HostingAdapter):
    """PUT `<url>/<key>` to publish, DELETE it to unpublish, PROPFIND the folder to sweep."""

    name = "webdav"

    def __init__(self, settings: WebdavHostConfig, *, connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 environ: Mapping[str, str] | None = None) -> None:
        if not settings.url or not settings.public_url_template:
            raise HostingError("hosting.webdav.url: url and public_url_template are required")
        self.settings = settings
        self.collection = settings.url.rstrip("/") + "/"
        self.timeout = (connect_timeout, read_timeout)
        self._environ = os.environ if environ is None else environ
        self._session: requests.Session | None = None
        self._can_list = True

    # -- lifecycle

    def start(self) -> None:
        if self._session is not None:
            return
        auth, described = self._auth()
        session = requests.Session()
        session.auth = auth
        adapter = HTTPAdapter(max_retries=transport_retry(), pool_maxsize=16)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._session = session
        try:
            response = self._request("PROPFIND", self.collection, headers={"Depth": "0"})
        except HostingError:
            self._session = None
            raise
        # 405/501: reachable and let in, but no PROPFIND (nginx's dav module without dav-ext):
        # publishing works, sweeping cannot list.
        self._can_list = response.status_code == 207
        if response.status_code not in (207, 405, 501):
            self._session = None
            raise HostingError(f"hosting.webdav.url: cannot use {self.collection}: "
                               f"{self._explain(response, 'the folder')}")
        log.info("hosting.started", adapter=self.name, url=self.collection, auth=described,
                 public_host=urlsplit(self.settings.public_url_template).netloc,  # a share link is a capability
                 sweep="PROPFIND" if self._can_list else "unavailable: the server does not answer PROPFIND")

    def _auth(self) -> tuple[requests.auth.AuthBase | None, str]:
        """The credentials to send and, in words, what they are (never the secret itself)."""
        settings = self.settings
        if settings.username is not None:
            if settings.password_file is not None:
                password = read_secret(settings.password_file, "hosting.webdav.password_file")
            else:
                password = read_credential(PASSWORD_CREDENTIAL, self._environ)
            if password is None:
                raise HostingError("hosting.webdav.password_file: hosting.webdav.username is set but there is no "
                                   "password: point hosting.webdav.password_file at a file holding it, or pass "
                                   f"a systemd credential named {PASSWORD_CREDENTIAL}")
            return requests.auth.HTTPBasicAuth(settings.username, password), f"basic ({settings.username})"
        if settings.token_file is not None:
            token = read_secret(settings.token_file, "hosting.webdav.token_file")
        else:
            token = read_credential(TOKEN_CREDENTIAL, self._environ)
        if token is not None:
            return _Bearer(token), "bearer token"
        return None, "none"

    def stop(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    # -- the contract

    def publish(self, key: str, path: Path, content_type: str) -> str:
        with open_for_upload(path) as f:
            response = self._request("PUT", self.collection + key, key=key, data=f,
                                     headers={"Content-Type": content_type})
        if response.status_code not in (200, 201, 204):
            raise HostingError(f"upload of {key_for_logs(key)} to {self.collection} failed: "
                               f"{self._explain(response, 'the folder', key)}")
        return self.settings.public_url_template.replace("{key}", key)

    def unpublish(self, key: str) -> None:
        response = self._request("DELETE", self.collection + key, key=key)
        if response.status_code not in (200, 202, 204, 404, 410):
            raise HostingError(f"delete of {key_for_logs(key)} from {self.collection} failed: "
                               f"{self._explain(response, 'the file', key)}")

    def sweep(self, keep: set[str]) -> int:
        """Delete files of the daemon's key shape in the folder that `keep` does not name; nothing else.

        A server without PROPFIND cannot be listed: 0, and orphans wait for the server's own clean-up.
        """
        if not self._can_list:
            return 0
        response = self._request("PROPFIND", self.collection, data=_LIST_BODY,
                                 headers={"Depth": "1", "Content-Type": "application/xml"})
        if response.status_code != 207:
            raise HostingError(f"cannot list {self.collection}: {self._explain(response, 'the folder')}")
        return remove_orphans(self, _file_names(response.content), keep)

    # -- helpers

    def _request(self, method: str, url: str, *, key: str | None = None, **kwargs: object) -> requests.Response:
        if self._session is None:
            raise HostingError("the webdav host is not started")
        try:
            response = self._session.request(method, url, timeout=self.timeout, allow_redirects=False, **kwargs)
        except requests.RequestException as exc:
            raise HostingError(f"{method} to {self.collection} failed: the server is unreachable or did not "
                               f"answer in time ({type(exc).__name__}: {tail(str(exc), hide=key)})") from None
        return response

    def _explain(self, response: requests.Response, what: str, key: str | None = None) -> str:
        status = response.status_code
        if status in (401, 403):
            hint = "check hosting.webdav.username and the password, or the token, and the account's rights"
        elif status in (404, 409):
            hint = f"{what} does not exist: create the folder first"
        elif 300 <= status < 400:
            hint = (f"redirected to {tail(response.headers.get('Location', '?'), hide=key, limit=120)}; "
                    "set hosting.webdav.url to the final address")
        elif status == 405:
            hint = "the server does not accept WebDAV there: is hosting.webdav.url a WebDAV folder?"
        elif status == 507:
            hint = "the server's storage is full"
        else:
            hint = tail(response.text, hide=key, limit=200) or response.reason or ""
        return f"HTTP {status}: {hint}"


def _file_names(body: bytes) -> list[str]:
    """The names of the non-folder members a Depth 1 PROPFIND answer lists."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise HostingError(f"the folder listing is not valid XML: {exc}") from None
    names = []
    for response in root.iter(f"{_DAV}response"):
        href = response.findtext(f"{_DAV}href") or ""
        if response.find(f".//{_DAV}resourcetype/{_DAV}collection") is not None:
            continue
        name = posixpath.basename(unquote(urlsplit(href).path).rstrip("/"))
        if name:
            names.append(name)
    return names
