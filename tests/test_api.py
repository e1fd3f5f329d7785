"""What each API answer means: pure decision functions, checked with tables and no network."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
import requests
import urllib3

from daemon.api import (
    PollVerdict,
    SubmitVerdict,
    choose_polling_url,
    decide_poll,
    decide_submit,
    parse_retry_after,
)
from daemon.config import ApiConfig
from daemon.transport import is_safe_to_resend

NOW = 1_800_000_000.0
ACCEPTED = json.dumps({"request_id": "codeformer-image-restoration_1", "status": "QUEUED",
                       "polling_url": "https://gw.example/v2/requests/status/codeformer-image-restoration_1"})


@pytest.mark.parametrize("status,body,headers,verdict", [
    (202, ACCEPTED, {}, SubmitVerdict.ACCEPTED),
    (200, ACCEPTED, {}, SubmitVerdict.ACCEPTED),
    (202, "{}", {}, SubmitVerdict.AMBIGUOUS),
    (202, "<html>oops</html>", {}, SubmitVerdict.AMBIGUOUS),
    (400, '{"error": "Model not found", "message": "disabled"}', {}, SubmitVerdict.REJECTED),
    (404, "", {}, SubmitVerdict.REJECTED),
    (401, '{"statusCode": 401, "message": "Access denied"}', {}, SubmitVerdict.AUTH),
    (403, "{}", {}, SubmitVerdict.AUTH),
    (402, '{"error": "Insufficient Balance"}', {}, SubmitVerdict.NO_BALANCE),
    (429, "{}", {"Retry-After": "7"}, SubmitVerdict.RETRY),
    (500, "{}", {}, SubmitVerdict.RETRY),
    (503, "", {}, SubmitVerdict.RETRY),
])
def test_decide_submit(status, body, headers, verdict):
    assert decide_submit(status, body, headers, NOW).verdict is verdict


def test_decide_submit_details():
    answer = decide_submit(202, ACCEPTED, {}, NOW)
    assert answer.request_id == "codeformer-image-restoration_1" and answer.polling_url.startswith("https://")
    assert decide_submit(429, "{}", {"Retry-After": "7"}, NOW).retry_after == 7.0
    rejected = decide_submit(400, '{"error": "Model not found", "message": "disabled"}', {}, NOW)
    assert "Model not found: disabled" in rejected.message and "400" in rejected.message


def status_doc(status, **extra):
    return json.dumps({"request_id": "r1", "status": status, "error": None, "output": None, **extra})


@pytest.mark.parametrize("status,body,verdict", [
    (200, status_doc("QUEUED"), PollVerdict.WAITING),
    (200, status_doc("PROCESSING"), PollVerdict.WAITING),
    (200, status_doc("COMPLETED", output={"media_url": ["https://cdn.example/o.png"], "media_type": "image/png"}),
     PollVerdict.COMPLETED),
    (200, status_doc("COMPLETED", output={"media_url": []}), PollVerdict.RETRY),
    (200, status_doc("COMPLETED", output={"media_url": ["file:///etc/passwd"]}), PollVerdict.COMPLETED),  # refused by download()
    (200, status_doc("FAILED", error="no face found"), PollVerdict.FAILED),
    (200, status_doc("ERROR", error="gpu fell over"), PollVerdict.ERROR),
    (200, status_doc("EXPLODED"), PollVerdict.RETRY),
    (200, "not json at all", PollVerdict.RETRY),
    (500, "", PollVerdict.RETRY),
    (404, "{}", PollVerdict.RETRY),
    (401, "{}", PollVerdict.AUTH),
])
def test_decide_poll(status, body, verdict):
    assert decide_poll(status, body, {}, NOW).verdict is verdict


def test_decide_poll_details():
    done = decide_poll(200, status_doc("COMPLETED", output={"media_url": ["https://cdn.example/o.png"]},
                                       created_at="2026-03-31T10:00:00.000Z",
                                       completed_at="2026-03-31T10:00:15.500Z"), {}, NOW)
    assert done.media_url == "https://cdn.example/o.png" and done.provider_seconds == pytest.approx(15.5)
    assert decide_poll(200, status_doc("FAILED", error="no face found"), {}, NOW).message == "no face found"
    assert "not json" in decide_poll(200, "not json at all", {}, NOW).message


@pytest.mark.parametrize("value,expected", [
    ("12", 12.0), (None, None), ("", None), ("soon", None),
    ("Wed, 15 Jan 2027 08:00:10 GMT", None),  # replaced below with a computed date
])
def test_parse_retry_after(value, expected):
    if value and value.startswith("Wed"):
        import email.utils

        value = email.utils.formatdate(NOW + 30, usegmt=True)
        assert parse_retry_after(value, NOW) == pytest.approx(30, abs=1)
    else:
        assert parse_retry_after(value, NOW) == expected


def test_only_errors_before_sending_are_safe_to_resend():
    refused = requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(
        None, "/x", urllib3.exceptions.NewConnectionError(None, "refused")))
    assert is_safe_to_resend(refused)
    assert is_safe_to_resend(requests.exceptions.ConnectTimeout("connect timed out"))
    assert not is_safe_to_resend(requests.exceptions.ReadTimeout("read timed out"))
    dropped = requests.exceptions.ConnectionError(urllib3.exceptions.ProtocolError(
        "Connection aborted.", ConnectionResetError()))
    assert not is_safe_to_resend(dropped)
    assert not is_safe_to_resend(requests.exceptions.ChunkedEncodingError("broken"))


def test_the_key_only_travels_to_the_providers_own_origin():
    config = ApiConfig(base_url="https://gw.example/codeformer-image-restoration/v1",
                       status_url="https://gw.example/v2/requests/status")
    assert choose_polling_url("https://gw.example/v2/requests/status/r1", "r1", config) == \
        "https://gw.example/v2/requests/status/r1"
    assert choose_polling_url("https://evil.example/steal/r1", "r1", config) == \
        "https://gw.example/v2/requests/status/r1"
    assert choose_polling_url(None, "r1", config) == "https://gw.example/v2/requests/status/r1"


@contextlib.contextmanager
def local_server(handler: type) -> Iterator[str]:
    """A throwaway HTTP server on loopback with `handler`; yields its base URL."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_submits_never_reuse_a_connection():
    """A kept-alive connection the server may be closing would make a submit ambiguous.

    The server here keeps every connection open whatever the client asks, so only the client's
    own refusal to reuse connections can give each submit a new one.
    """
    import http.server

    from daemon.api import ApiClient
    from daemon.config import Secret

    client_ports: list[int] = []

    class KeepAlive(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            client_ports.append(self.client_address[1])
            body = b'{"request_id": "r", "status": "QUEUED"}'
            self.send_response(202)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = False  # ignore the client's Connection: close

        def log_message(self, *args):
            pass

    with local_server(KeepAlive) as base:
        client = ApiClient(ApiConfig(base_url=base, status_url=base + "/status"), Secret("k"))
        answers = [client.submit("http://127.0.0.1:9/x.jpg", {"upscale": 2}) for _ in range(3)]
        client.close()
    assert [a.verdict for a in answers] == [SubmitVerdict.ACCEPTED] * 3
    assert len(set(client_ports)) == 3, "each submit on a connection of its own"


def test_the_key_never_follows_a_redirect():
    """A 3xx from the provider's endpoints is not followed: requests would carry the key header along."""
    import http.server

    from daemon.api import ApiClient
    from daemon.config import Secret

    seen_keys: list[str | None] = []

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            seen_keys.append(self.headers.get("Ocp-Apim-Subscription-Key"))
            if self.command == "POST":
                self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    with local_server(Redirecting) as base:
        client = ApiClient(ApiConfig(base_url=base, status_url=base + "/status"), Secret("the-key-1234"))
        submit = client.submit("http://127.0.0.1:9/x.jpg", {"upscale": 2})
        poll = client.poll(base + "/status/r1")
        client.close()
    assert seen_keys == ["the-key-1234", "the-key-1234"], "one request each, the redirect not followed"
    assert submit.verdict is SubmitVerdict.REJECTED and poll.verdict is PollVerdict.RETRY


def test_a_published_url_quoted_in_an_error_is_not_kept():
    """A presigned URL is a secret: a provider error that quotes it must not carry it into logs."""
    import http.server
    import json as jsonlib

    from daemon.api import ApiClient
    from daemon.config import Secret

    class Quoting(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            sent = jsonlib.loads(self.rfile.read(int(self.headers["Content-Length"])))
            quoted = sent["image"].replace("&", "\\u0026").replace("/", "\\/")  # escaped as some servers do
            body = ('{"error": "Bad Request", "message": "cannot read image %s, which is %s"}'
                    % (quoted, "x" * 300)).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    url = "https://bucket.example/scans/k.jpg?X-Amz-Credential=AKID&X-Amz-Signature=0123abcd"
    with local_server(Quoting) as base:
        client = ApiClient(ApiConfig(base_url=base, status_url=base + "/status"), Secret("the-key-1234"))
        answer = client.submit(url, {"upscale": 2})
        client.close()
    assert answer.verdict is SubmitVerdict.REJECTED
    assert "X-Amz-Signature" not in answer.message and "cannot read image (the published URL)" in answer.message


def test_a_provider_text_quoting_a_published_url_on_a_poll_loses_it():
    from daemon.stages import without_published_url

    key = "Zx3" + "a" * 40 + ".jpg"
    text = f"Could not fetch image https://bucket.example/scans/{key}?X-Amz-Signature=0a1b (HTTP 403)"
    assert without_published_url(text, key) == "Could not fetch image (the published URL) (HTTP 403)"
    assert without_published_url("no face found", key) == "no face found"
