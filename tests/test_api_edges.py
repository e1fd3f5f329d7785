"""The provider client at its edges: where a TLS session broke, gateway 502/504 on a submit, and
secrets (a presigned image URL, a signed media URL) kept out of error texts.

Real servers on loopback: a TLS server that takes the whole request and then breaks the session, or
breaks the handshake; plain HTTP servers that answer 5xx, close or hang; a front gateway before the
emulator. Decisions are checked with tables; the daemon runs end to end where money is at stake.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import urllib3

from daemon.api import PUBLISHED_URL, ApiClient, DownloadError, PollVerdict, SubmitVerdict, decide_submit, error_message
from daemon.config import ApiConfig, Secret
from daemon.demo import make_photo
from daemon.stages import RESEND_HINT
from daemon.transport import is_safe_to_resend, transport_retry

from .certs import self_signed
from .conftest import API_KEY, free_port, visible_files, wait_for

NOW = 1_800_000_000.0
GENERATE_PATH = "/codeformer-image-restoration/v1/codeformer/generate"


# --------------------------------------------------------------------------- loopback servers


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("certs")
    return {"trusted": self_signed(folder, "trusted"), "untrusted": self_signed(folder, "untrusted")}


@pytest.fixture
def trusted(certs, monkeypatch) -> Path:
    """The client trusts the test certificate (requests reads REQUESTS_CA_BUNDLE on every request)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs["trusted"][0]))
    return certs["trusted"][0]


AFTER_THE_REQUEST = ("garbage", "plaintext", "close_notify", "reset", "close")
"""How the TLS server breaks a session after reading the whole request: bytes that are no TLS record,
a plain HTTP answer outside TLS, a TLS close_notify alert, a TCP reset, a close without close_notify."""
IN_THE_HANDSHAKE = ("untrusted", "reset_in_handshake", "close_in_handshake")
"""How a handshake breaks: a certificate the client does not trust, a reset or a close after the ClientHello."""


def _read_request(conn: socket.socket) -> bytes | None:
    """The request line once the whole request (head and Content-Length body) is in; None if cut short."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head.split(b"\r\n")[0]


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class BreakingServer:
    """A loopback server that breaks every connection the way `mode` says; TLS when given a certificate.

    `requests` holds the request line of every request read whole: what the provider would have taken.
    """

    def __init__(self, mode: str, cert: tuple[Path, Path] | None = None) -> None:
        self.mode = mode
        self.requests: list[bytes] = []
        self.connections = 0
        self._tls = None
        if cert is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(*cert)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            if self.mode in ("reset_in_handshake", "close_in_handshake"):
                conn.recv(4096)  # the ClientHello
                return _reset(conn) if self.mode == "reset_in_handshake" else conn.close()
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            line = _read_request(conn)
            if line is None:
                return conn.close()
            self.requests.append(line)
            self._break(conn)
        except OSError:  # a handshake the client refused, or a client that went away
            conn.close()

    def _break(self, conn: socket.socket) -> None:
        if self.mode == "close_notify":
            return conn.unwrap().close()
        raw = socket.socket(fileno=conn.detach()) if isinstance(conn, ssl.SSLSocket) else conn
        if self.mode == "garbage":
            raw.sendall(b"\x17\x03\x03\x00\x20" + b"\xde\xad" * 16)  # application data that never was
        elif self.mode == "plaintext":
            raw.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}")
        elif self.mode == "reset":
            return _reset(raw)
        elif self.mode == "hang":
            self._stop.wait(5)
        elif self.mode == "truncated":
            raw.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n\x89PNG")
        raw.close()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)


@contextlib.contextmanager
def breaking_server(mode: str, cert: tuple[Path, Path] | None = None) -> Iterator[BreakingServer]:
    server = BreakingServer(mode, cert)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def http_server(handler: type) -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def base_of(server: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def client_for(base: str, **timeouts: float) -> ApiClient:
    api = ApiConfig(base_url=base + "/codeformer-image-restoration/v1", status_url=base + "/v2/requests/status",
                    **timeouts)
    return ApiClient(api, Secret(API_KEY))


def captured_post_error(client: ApiClient) -> requests.RequestException:
    """The exception the submit's own request raises, from the client's own session and adapters."""
    with pytest.raises(requests.RequestException) as caught:
        client.session.post(client.generate_url, json={"image": "https://x.example/a.jpg"}, timeout=client.timeout,
                            allow_redirects=False)
    return caught.value


# --------------------------------------------------------------------------- 1: where a TLS session broke


@pytest.mark.parametrize("mode,safe", [*[(m, False) for m in AFTER_THE_REQUEST],
                                       *[(m, True) for m in IN_THE_HANDSHAKE]])
def test_a_tls_error_is_safe_to_resend_only_when_the_handshake_broke(certs, trusted, mode, safe):
    """Real exceptions from real sessions: urllib3 raises SSLError on both sides of the request."""
    cert = certs["untrusted" if mode == "untrusted" else "trusted"]
    with breaking_server(mode, cert) as server:
        client = client_for(server.url, connect_timeout=2, read_timeout=5)
        exc = captured_post_error(client)
        answer = client.submit("https://bucket.example/k.jpg", {"upscale": 2})
        client.close()
    assert is_safe_to_resend(exc) is safe, f"{mode}: {exc!r}"
    assert len(server.requests) == (0 if safe else 2), "the server took the request only when it was sent"
    if safe:
        assert answer.verdict is SubmitVerdict.RETRY and answer.message.startswith("not sent: ")
    else:
        assert answer.verdict is SubmitVerdict.AMBIGUOUS and answer.message.startswith("sent, answer lost: ")
    if mode in ("garbage", "plaintext"):
        assert isinstance(exc, requests.exceptions.SSLError), "the case urllib3 reports like a handshake error"


@pytest.mark.parametrize("mode,safe", [("refused", True), ("close", False), ("hang", False)])
def test_plain_http_failures_are_placed_the_same_way(mode, safe):
    """Over plain HTTP the connection opens inside the request call: a refusal is still before sending."""
    if mode == "refused":
        client = client_for(f"http://127.0.0.1:{free_port()}", connect_timeout=1, read_timeout=0.3)
        exc = captured_post_error(client)
    else:
        with breaking_server(mode) as server:
            client = client_for(server.url, connect_timeout=1, read_timeout=0.3)
            exc = captured_post_error(client)
        assert len(server.requests) == 1
    client.close()
    assert is_safe_to_resend(exc) is safe, repr(exc)


def _ssl_error_without_traceback() -> requests.exceptions.SSLError:
    return requests.exceptions.SSLError(urllib3.exceptions.MaxRetryError(
        None, "/x", urllib3.exceptions.SSLError(ssl.SSLError(1, "[SSL] decryption failed or bad record mac"))))


@pytest.mark.parametrize("exc,safe", [
    (requests.exceptions.ConnectTimeout("connect timed out"), True),
    (requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(
        None, "/x", urllib3.exceptions.NewConnectionError(None, "refused"))), True),
    (requests.exceptions.MissingSchema("no scheme"), True),
    (requests.exceptions.ReadTimeout("read timed out"), False),
    (requests.exceptions.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted.",
                                                                          ConnectionResetError())), False),
    (_ssl_error_without_traceback(), False),  # where it broke is unknown: treated as sent
    (requests.exceptions.SSLError("handshake?"), False),
    (requests.exceptions.ChunkedEncodingError("broken"), False),
])
def test_hand_made_exceptions_fall_back_to_their_type(exc, safe):
    assert is_safe_to_resend(exc) is safe


def loop_runs_on(daemon, seconds: float) -> None:
    """The scheduler's loop kept passing for `seconds` of its own clock: time for a resend to show up."""
    scheduler = daemon.service.scheduler
    until = scheduler.clock() + seconds
    wait_for(lambda: scheduler.last_pass > until, seconds + 20, what=f"{seconds} s of loop passes")


@pytest.mark.parametrize("mode", ["garbage", "reset"])
def test_a_tls_session_broken_after_the_submit_fails_the_job_as_ambiguous_after_one_submit(
        certs, trusted, folders, make_config, run_daemon, mode):
    with breaking_server(mode, certs["trusted"]) as server:
        config = make_config(api={"base_url": server.url + "/codeformer-image-restoration/v1", "max_attempts": 3})
        daemon = run_daemon(config)
        make_photo(folders["inbox"] / "scan.jpg", 200, 160, seed=1, format="JPEG")
        wait_for(lambda: (folders["failed"] / "scan.jpg.error.json").exists(), 20, what="scan.jpg in failed/")
        record = json.loads((folders["failed"] / "scan.jpg.error.json").read_text(encoding="utf-8"))
        loop_runs_on(daemon, 1.5)
        daemon.stop()
    assert record["stage"] == "submit_ambiguous", record
    assert RESEND_HINT in record["reason"] and "sent, answer lost" in record["reason"]
    assert [line.split(b" ")[:2] for line in server.requests] == [[b"POST", GENERATE_PATH.encode()]], \
        "exactly one submit: it may have been paid for"


def test_a_broken_handshake_is_retried_and_never_reaches_the_server(certs, trusted, folders, make_config,
                                                                     run_daemon):
    with breaking_server("untrusted", certs["untrusted"]) as server:
        config = make_config(api={"base_url": server.url + "/codeformer-image-restoration/v1", "max_attempts": 2})
        run_daemon(config)
        make_photo(folders["inbox"] / "scan.jpg", 200, 160, seed=1, format="JPEG")
        wait_for(lambda: (folders["failed"] / "scan.jpg.error.json").exists(), 30, what="scan.jpg in failed/")
    record = json.loads((folders["failed"] / "scan.jpg.error.json").read_text(encoding="utf-8"))
    assert record["stage"] == "attempts_exhausted" and "not sent" in record["reason"]
    assert "CERTIFICATE_VERIFY_FAILED" in record["reason"]
    assert server.connections == 2 and server.requests == [], "tried twice, never sent"


# --------------------------------------------------------------------------- 2: 502/504 from the gateway


@pytest.mark.parametrize("status,verdict,words", [
    (502, SubmitVerdict.AMBIGUOUS, "may still have taken the job"),
    (504, SubmitVerdict.AMBIGUOUS, "gave up waiting for the provider"),
    (500, SubmitVerdict.RETRY, "HTTP 500"),
    (503, SubmitVerdict.RETRY, "HTTP 503"),
])
def test_a_gateway_that_gave_up_on_a_submit_is_ambiguous(status, verdict, words):
    body = json.dumps({"statusCode": status, "message": "upstream request timeout"})
    answer = decide_submit(status, body, {"Retry-After": "5"}, NOW)
    assert answer.verdict is verdict and answer.http_status == status
    assert words in answer.message and f"HTTP {status}" in answer.message
    assert "upstream request timeout" in answer.message


def test_transport_retries_never_resend_a_post_on_a_gateway_error():
    retry = transport_retry()
    assert not any(retry.is_retry("POST", status) for status in (500, 502, 503, 504))
    assert all(retry.is_retry("GET", status) for status in (502, 503, 504))


class Answers504(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def _answer(self) -> None:
        self.seen.append(self.command)
        if self.command == "POST":
            self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"statusCode": 504, "message": "Gateway Timeout"}'
        self.send_response(504)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def test_a_504_on_the_submit_is_seen_once_by_the_server_while_a_poll_is_retried():
    Answers504.seen = []
    with http_server(Answers504) as server:
        client = client_for(base_of(server))
        submit = client.submit("https://bucket.example/k.jpg", {"upscale": 2})
        posts = list(Answers504.seen)
        poll = client.poll(base_of(server) + "/v2/requests/status/r1")
        client.close()
    assert posts == ["POST"], "urllib3 must not resend a submit on 504"
    assert submit.verdict is SubmitVerdict.AMBIGUOUS and "HTTP 504" in submit.message
    assert Answers504.seen[1:] == ["GET"] * 3 and poll.verdict is PollVerdict.RETRY, "GETs are retried"


class FrontGateway(http.server.BaseHTTPRequestHandler):
    """A gateway before the emulator: answers the next submits with the queued 5xx, passes the rest on."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        server = self.server
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        server.posts += 1
        if server.faults:
            status = server.faults.pop(0)
            body, headers = json.dumps({"statusCode": status, "message": f"gateway says {status}"}).encode(), {}
            if status == 503:
                headers["Retry-After"] = "1"
        else:
            forwarded = requests.post(server.emulator.base_url + "/codeformer/generate", data=raw, timeout=10,
                                      headers={k: v for k, v in self.headers.items()
                                               if k.lower() in ("content-type", "ocp-apim-subscription-key",
                                                                "x-webhook-url")})
            status, body, headers = forwarded.status_code, forwarded.content, {}
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                            "Connection": "close", **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def front_gateway(emulator, faults: list[int]) -> Iterator[http.server.ThreadingHTTPServer]:
    with http_server(FrontGateway) as server:
        server.emulator, server.faults, server.posts = emulator, list(faults), 0
        yield server


def test_a_504_on_the_submit_fails_the_job_as_ambiguous_after_one_submit(emulator, folders, make_config, run_daemon):
    with front_gateway(emulator, [504, 504]) as gateway:
        config = make_config(api={"base_url": base_of(gateway) + "/codeformer-image-restoration/v1"})
        daemon = run_daemon(config)
        make_photo(folders["inbox"] / "scan.jpg", 200, 160, seed=1, format="JPEG")
        wait_for(lambda: (folders["failed"] / "scan.jpg.error.json").exists(), 20, what="scan.jpg in failed/")
        loop_runs_on(daemon, 1.5)
        daemon.stop()
        posts = gateway.posts
    record = json.loads((folders["failed"] / "scan.jpg.error.json").read_text(encoding="utf-8"))
    assert record["stage"] == "submit_ambiguous" and "HTTP 504" in record["reason"]
    assert "gave up waiting for the provider" in record["reason"] and RESEND_HINT in record["reason"]
    assert posts == 1, "a 504 may have been taken behind the gateway: never resent by itself"


def test_a_503_on_the_submit_is_retried(emulator, folders, make_config, run_daemon):
    with front_gateway(emulator, [503]) as gateway:
        config = make_config(api={"base_url": base_of(gateway) + "/codeformer-image-restoration/v1"})
        run_daemon(config)
        make_photo(folders["inbox"] / "scan.jpg", 200, 160, seed=1, format="JPEG")
        wait_for(lambda: (folders["outbox"] / "scan.png").exists(), 30, what="scan.png after a 503")
        posts = gateway.posts
    assert posts == 2 and emulator.stats()["submits_accepted"] == 1
    assert not visible_files(folders["failed"])


# --------------------------------------------------------------------------- 3a: a presigned URL in a submit's answer

SIGNED = ("https://bucket.example/scans/Zx3abc.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
          "&X-Amz-Credential=AKIAEXAMPLE%2F20260331%2Fus-east-1%2Fs3%2Faws4_request"
          "&X-Amz-Signature=5f0c0ffee5f0c0ffee5f0c0ffee5f0c0ffee")
SIGNATURE = "5f0c0ffee5f0c0ffee"


def escaped(url: str, slash: bool = True, amp: bool = True) -> str:
    """The URL as a JSON writer may spell it inside a string: `\\/` and `\\u0026`."""
    url = url.replace("/", "\\/") if slash else url
    return url.replace("&", "\\u0026") if amp else url


def all_escaped(url: str) -> str:
    """Every character but letters and digits as `\\uXXXX`, as cautious JSON writers spell them."""
    return "".join(c if c.isalnum() else f"\\u{ord(c):04x}" for c in url)


QUOTING_BODIES = [
    '{"detail": "cannot fetch %s"}' % all_escaped(SIGNED),
    '{"message": "cannot fetch %s", "input": "%s"}' % (all_escaped(SIGNED), escaped(SIGNED)),
    '{"detail": "cannot fetch %s"}' % escaped(SIGNED),
    '{"detail": {"input": "%s", "reason": "403"}}' % escaped(SIGNED, amp=False),
    '{"errors": [{"field": "image", "value": "%s"}]}' % escaped(SIGNED, slash=False),
    '{"%s": "unreadable"}' % escaped(SIGNED),
    '{"message": "cannot fetch %s"}' % escaped(SIGNED),
    '{"error": "Bad Request", "message": "cannot fetch %s"}' % escaped(SIGNED),
    '{"detail": "cannot fetch %s", "trace' % escaped(SIGNED),  # cut short: not JSON any more
    '<p>cannot fetch %s</p>' % SIGNED.replace("&", "&amp;"),
]


@pytest.mark.parametrize("body", QUOTING_BODIES)
def test_a_quoted_presigned_url_never_reaches_an_error_text(body):
    texts = [error_message(body, hide=SIGNED),
             decide_submit(400, body, {}, NOW, image_url=SIGNED).message,
             decide_submit(502, body, {}, NOW, image_url=SIGNED).message,
             decide_submit(202, body, {}, NOW, image_url=SIGNED).message]  # accepted, no request_id
    for text in texts:
        assert SIGNATURE not in text and "AKIAEXAMPLE" not in text, text
        assert PUBLISHED_URL in text, text


def test_a_long_answer_is_masked_before_it_is_cut():
    body = json.dumps({"detail": "x" * 150 + " cannot fetch " + SIGNED})
    text = decide_submit(202, body, {}, NOW, image_url=SIGNED).message
    assert "X-Amz" not in text and "bucket.example" not in text


# --------------------------------------------------------------------------- 3b: signed URLs in transport errors

MEDIA_QUERY = "?X-Amz-Expires=3600&X-Amz-Signature=9e1d5ecret9e1d5ecret"


@pytest.mark.parametrize("mode", ["refused", "close", "hang", "truncated"])
def test_a_failed_download_names_the_failure_but_not_the_signed_url(tmp_path, mode):
    def fetch(base: str) -> str:
        client = client_for(base, connect_timeout=1, read_timeout=0.3)
        with open(tmp_path / "out.png", "wb") as dest, pytest.raises(DownloadError) as caught:
            client.download(f"{base}/media/job-7f3a/output.png{MEDIA_QUERY}", dest, 10_000_000)
        client.close()
        return str(caught.value)

    if mode == "refused":
        port = free_port()
        text = fetch(f"http://127.0.0.1:{port}")
    else:
        with breaking_server(mode) as server:
            text = fetch(server.url)
        port = server.port
    assert "9e1d5ecret" not in text and "X-Amz" not in text and "job-7f3a" not in text, text
    assert f"127.0.0.1:{port}" in text and "fetching the result" in text, text


def test_urllib3_does_not_log_a_retried_urls_query(tmp_path, caplog):
    """Its retry warning reaches stderr (the journal) through Python's last-resort handler."""
    caplog.set_level(logging.DEBUG)
    with breaking_server("close") as server:
        client = client_for(server.url, connect_timeout=1, read_timeout=0.3)
        with open(tmp_path / "out.png", "wb") as dest, pytest.raises(DownloadError):
            client.download(f"{server.url}/media/job-7f3a/output.png{MEDIA_QUERY}", dest, 10_000_000)
        client.poll(f"{server.url}/v2/requests/status/r1?token=pollsecret1234")
        client.close()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")]
    assert sum("Retrying" in line and "/media/job-7f3a/output.png" in line for line in lines) == 1, lines
    assert not [line for line in lines if "9e1d5ecret" in line or "pollsecret1234" in line], lines


def test_a_media_url_that_is_not_http_is_refused_without_quoting_it(tmp_path):
    client = client_for("http://127.0.0.1:9")
    with open(tmp_path / "out.png", "wb") as dest, pytest.raises(DownloadError) as caught:
        client.download("s3://bucket/job-7f3a/output.png" + MEDIA_QUERY, dest, 10_000_000)
    client.close()
    assert "non-http(s)" in str(caught.value) and "s3" in str(caught.value)
    assert "9e1d5ecret" not in str(caught.value) and "job-7f3a" not in str(caught.value)


@pytest.mark.parametrize("mode", ["refused", "close"])
def test_a_failed_poll_does_not_quote_the_polling_urls_query(mode):
    def poll(base: str) -> str:
        client = client_for(base, connect_timeout=1, read_timeout=0.3)
        answer = client.poll(f"{base}/v2/requests/status/r1?token=pollsecret1234")
        client.close()
        assert answer.verdict is PollVerdict.RETRY
        return answer.message

    if mode == "refused":
        text = poll(f"http://127.0.0.1:{free_port()}")
    else:
        with breaking_server(mode) as server:
            text = poll(server.url)
    assert "pollsecret1234" not in text and "ConnectionError" in text, text
