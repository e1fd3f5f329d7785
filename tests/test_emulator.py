"""The gateway emulator must honour the provider's contract, since the daemon's tests trust it."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from daemon.config import ConfigError
import requests
from PIL import Image

from daemon import emulator as emu_mod
from daemon.emulator import GatewayEmulator

KEY = "emulator-key"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
REQUEST_ID = re.compile(r"^codeformer-image-restoration_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")


def png_bytes(size=(40, 30), mode="RGB", fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=0).save(buffer, format=fmt)
    return buffer.getvalue()


class LocalSite:
    """Serves fixed files to the emulator and records webhook POSTs."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.posts: list[tuple[str, dict]] = []
        self.posted = threading.Condition()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = site.files.get(self.path)
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with site.posted:
                    site.posts.append((self.path, body))
                    site.posted.notify_all()
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def serve(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.url(path)

    def wait_posts(self, count: int, timeout: float = 5.0) -> list[tuple[str, dict]]:
        with self.posted:
            self.posted.wait_for(lambda: len(self.posts) >= count, timeout)
            return list(self.posts)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site():
    local = LocalSite()
    yield local
    local.close()


@pytest.fixture
def emu():
    with GatewayEmulator(latency=0.05) as gateway:
        yield gateway


@pytest.fixture
def image_url(site):
    return site.serve("/scan.png", png_bytes())


def submit(gateway, body, key=KEY, headers=None):
    sent = {"Ocp-Apim-Subscription-Key": key} if key is not None else {}
    sent.update(headers or {})
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{gateway.base_url}/codeformer/generate", data=data,
                         headers={"Content-Type": "application/json", **sent}, timeout=5)


def poll(gateway, request_id, key=KEY):
    headers = {"Ocp-Apim-Subscription-Key": key} if key is not None else {}
    return requests.get(f"{gateway.status_url}/{request_id}", headers=headers, timeout=5)


def submit_ok(gateway, url, **params) -> str:
    response = submit(gateway, {"image": url, **params})
    assert response.status_code == 202, response.text
    return response.json()["request_id"]


def final_document(gateway, request_id, timeout=5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        document = poll(gateway, request_id).json()
        if document["status"] in ("COMPLETED", "FAILED", "ERROR"):
            return document
        time.sleep(0.02)
    raise AssertionError(f"{request_id} did not finish")


def job_stats(gateway, request_id) -> dict:
    return next(j for j in gateway.stats()["jobs"] if j["request_id"] == request_id)


# ---------------------------------------------------------------- happy path


def test_happy_path_submit_poll_download(site):
    served = png_bytes((40, 30))
    url = site.serve("/scan.png", served)
    with GatewayEmulator(latency=0.3) as gateway:
        response = submit(gateway, {"image": url, "upscale": 3})
        assert response.status_code == 202
        accepted = response.json()
        assert set(accepted) == {"request_id", "status", "polling_url"}
        assert REQUEST_ID.match(accepted["request_id"])
        assert accepted["status"] == "QUEUED"
        assert accepted["polling_url"] == f"{gateway.status_url}/{accepted['request_id']}"

        first = requests.get(accepted["polling_url"], headers={"Ocp-Apim-Subscription-Key": KEY},
                             timeout=5).json()
        assert first["status"] == "PROCESSING"
        assert first["output"] is None and first["completed_at"] is None

        done = final_document(gateway, accepted["request_id"])
        assert set(done) == {"request_id", "status", "model_id", "error", "output",
                             "created_at", "updated_at", "completed_at"}
        assert done["status"] == "COMPLETED" and done["error"] is None
        assert done["model_id"] == "codeformer-image-restoration"
        media_url = f"{gateway.url}/media/{accepted['request_id']}/output.png"
        assert done["output"] == {"media_url": [media_url], "media_type": "image/png"}
        for name in ("created_at", "updated_at", "completed_at"):
            assert ISO.match(done[name]), done[name]

        media = requests.get(media_url, timeout=5)  # no key: it is a CDN
        assert media.status_code == 200
        assert media.headers["Content-Type"] == "image/png"
        assert int(media.headers["Content-Length"]) == len(media.content)
        output = Image.open(io.BytesIO(media.content))
        assert output.format == "PNG" and output.size == (120, 90)

        stats = gateway.stats()
        job = job_stats(gateway, accepted["request_id"])
        assert job["fetched_sha256"] == hashlib.sha256(served).hexdigest()
        assert job["fetched_size"] == len(served)
        assert job["image_url"] == url and job["key_ok"] is True
        assert job["params"] == {"codeformer_fidelity": 0.5, "background_enhance": True,
                                 "face_upsample": True, "upscale": 3}
        assert job["submitted_at"] <= job["started_at"] < job["finished_at"]
        assert job["finished_at"] - job["started_at"] >= 0.3
        assert job["polls"] >= 2 and stats["polls"] >= 2
        assert stats["submits_received"] == stats["submits_accepted"] == 1
        assert stats["media_downloads"] == 1 and stats["rejected"] == {}
        assert gateway.submits_by_content() == {hashlib.sha256(served).hexdigest(): 1}


@pytest.mark.parametrize("mode, fmt, expected", [
    ("RGB", "PNG", "RGB"), ("RGBA", "PNG", "RGBA"), ("L", "PNG", "L"),
    ("P", "GIF", "RGB"), ("CMYK", "JPEG", "RGB"), ("I;16", "PNG", "L"),
])
def test_output_keeps_sensible_modes(mode, fmt, expected):
    decoded = emu_mod.decode_image(png_bytes((5, 4), mode, fmt))
    output = Image.open(io.BytesIO(emu_mod.render_output(decoded, 2)))
    assert output.mode == expected and output.size == (10, 8)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    decoded = emu_mod.decode_image(png_bytes((2, 2), "I;16"))
    decoded.putpixel((0, 0), 65535)
    decoded.putpixel((1, 0), 32768)
    output = Image.open(io.BytesIO(emu_mod.render_output(decoded, 1, "unchanged")))  # no face stand-in
    assert [output.getpixel((x, 0)) for x in range(2)] == [255, 128]


# ---------------------------------------------------------------- rejections


def test_missing_wrong_and_revoked_keys(emu, image_url):
    denied = {"statusCode": 401, "message": "Access denied due to missing or invalid subscription key."}
    for key in (None, "wrong-key"):
        response = submit(emu, {"image": image_url}, key=key)
        assert response.status_code == 401 and response.json() == denied
    request_id = submit_ok(emu, image_url)
    assert poll(emu, request_id, key=None).status_code == 401
    assert poll(emu, request_id, key="wrong-key").status_code == 401

    emu.revoked_keys.add(KEY)
    response = submit(emu, {"image": image_url})
    assert response.status_code == 403 and response.json()["error"] == "Forbidden"
    assert poll(emu, request_id).status_code == 403
    stats = emu.stats()
    assert stats["rejected"] == {"401": 2, "403": 1}
    assert stats["submits_received"] == 4 and stats["submits_accepted"] == 1


@pytest.mark.parametrize("body, field", [
    ({"codeformer_fidelity": 1.5}, "codeformer_fidelity"),
    ({"codeformer_fidelity": True}, "codeformer_fidelity"),
    ({"upscale": 9}, "upscale"),
    ({"upscale": 2.5}, "upscale"),
    ({"upscale": True}, "upscale"),
    ({"background_enhance": "yes"}, "background_enhance"),
    ({"face_upsample": 1}, "face_upsample"),
    ({"image": "ftp://x"}, "image"),
    ({"image": None}, "image"),
    ({"webhook": "not a url"}, "webhook"),
    ({"webhook_events_filter": ["finished"]}, "webhook_events_filter"),
])
def test_invalid_parameters_are_400_naming_the_field(emu, image_url, body, field):
    response = submit(emu, {"image": image_url, **body})
    assert response.status_code == 400
    assert response.json()["error"] == "Bad Request"
    assert field in response.json()["message"]
    assert emu.stats()["jobs"] == []


@pytest.mark.parametrize("raw, word", [(b'{"upscale": 2}', "image"), (b"{not json", "JSON"),
                                       (b"[1, 2]", "object"), (b"", "JSON")])
def test_missing_image_and_bad_json_are_400(emu, raw, word):
    response = submit(emu, raw)
    assert response.status_code == 400 and word in response.json()["message"]


def test_unknown_keys_are_ignored(emu, image_url):
    request_id = submit_ok(emu, image_url, seed=7)
    assert "seed" not in job_stats(emu, request_id)["params"]


def test_disabled_model_is_400(emu, image_url):
    emu.model_disabled = True
    response = submit(emu, {"image": image_url})
    assert response.status_code == 400
    assert response.json() == {"error": "Model not found",
                               "message": "Model 'codeformer-image-restoration' not found or is disabled"}
    emu.model_disabled = False
    submit_ok(emu, image_url)


def test_balance_is_spent_and_system_errors_are_refunded(emu, image_url):
    emu.balance = 2
    submit_ok(emu, image_url)
    submit_ok(emu, image_url)
    response = submit(emu, {"image": image_url})
    assert response.status_code == 402
    assert response.json() == {"error": "Insufficient Balance",
                               "message": "Your wallet does not have enough balance."}
    assert emu.wait_idle(5)
    assert emu.stats()["balance"] == 0

    emu.balance = 1
    emu.inject("outcome_error")
    errored = submit_ok(emu, image_url)
    assert emu.stats()["balance"] == 0
    assert final_document(emu, errored)["status"] == "ERROR"
    assert emu.stats()["balance"] == 1  # refunded

    emu.inject("outcome_failed")
    failed = submit_ok(emu, image_url)
    assert final_document(emu, failed)["status"] == "FAILED"
    assert emu.stats()["balance"] == 0  # a model failure is charged
    assert submit(emu, {"image": image_url}).status_code == 402
    assert emu.stats()["rejected"] == {"402": 2}


def test_rate_limit_answers_429_with_retry_after(emu, image_url):
    emu.rate_limit = 0.5
    submit_ok(emu, image_url)
    response = submit(emu, {"image": image_url})
    assert response.status_code == 429
    assert response.json()["error"] == "Too Many Requests"
    assert response.headers["Retry-After"] == "2"

    emu.rate_limit = 2  # half a second apart: room for a loaded machine to send the second one within it
    time.sleep(0.51)
    submit_ok(emu, image_url)
    response = submit(emu, {"image": image_url})
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    time.sleep(0.51)
    submit_ok(emu, image_url)
    assert emu.stats()["rejected"] == {"429": 2}


def test_checks_run_in_the_documented_order(emu, image_url):
    emu.model_disabled, emu.balance = True, 0
    emu.inject("submit_500")
    assert submit(emu, {"image": image_url}, key="bad").status_code == 401
    assert submit(emu, b"{bad").status_code == 500
    assert submit(emu, b"{bad").status_code == 400
    assert submit(emu, {"image": image_url}).status_code == 400
    emu.model_disabled = False
    assert submit(emu, {"image": image_url}).status_code == 402
    emu.balance, emu.rate_limit = 1, 0.5
    submit_ok(emu, image_url)
    assert submit(emu, {"image": image_url}).status_code == 429  # before the empty wallet


# ---------------------------------------------------------------- processing


def test_max_concurrent_keeps_extra_jobs_queued_in_order(site, image_url):
    with GatewayEmulator(latency=0.15, max_concurrent=1) as gateway:
        ids = [submit_ok(gateway, image_url) for _ in range(3)]
        assert [poll(gateway, i).json()["status"] for i in ids] == ["PROCESSING", "QUEUED", "QUEUED"]
        assert gateway.peak_unfinished == 3  # queued ones count: the client had three in flight
        assert gateway.wait_idle(5)
        jobs = [job_stats(gateway, i) for i in ids]
        assert all(j["status"] == "COMPLETED" for j in jobs)
        assert jobs[0]["finished_at"] <= jobs[1]["started_at"]
        assert jobs[1]["finished_at"] <= jobs[2]["started_at"]

        gateway.latency = 5
        ids = [submit_ok(gateway, image_url) for _ in range(3)]
        assert [poll(gateway, i).json()["status"] for i in ids] == ["PROCESSING", "QUEUED", "QUEUED"]
        gateway.max_concurrent = 0  # raising the limit releases the queue at once
        assert [poll(gateway, i).json()["status"] for i in ids] == ["PROCESSING"] * 3


def test_injected_server_errors(emu, image_url):
    emu.inject("submit_500")
    response = submit(emu, {"image": image_url})
    assert response.status_code == 500 and response.json()["error"] == "Internal Server Error"
    request_id = submit_ok(emu, image_url)
    assert final_document(emu, request_id)["status"] == "COMPLETED"

    emu.inject("poll_500", count=2)
    assert [poll(emu, request_id).status_code for _ in range(3)] == [500, 500, 200]

    media_url = f"{emu.url}/media/{request_id}/output.png"
    emu.inject("media_500")
    assert requests.get(media_url, timeout=5).status_code == 500
    assert requests.get(media_url, timeout=5).status_code == 200
    stats = emu.stats()
    assert stats["rejected"] == {"500": 1} and stats["media_downloads"] == 1
    with pytest.raises(ValueError):
        emu.inject("disk_full")


def test_injected_malformed_answers_and_a_held_back_submit(emu, image_url):
    emu.hang_seconds = 1.0
    emu.inject("submit_timeout")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{emu.base_url}/codeformer/generate", json={"image": image_url},
                      headers={"Ocp-Apim-Subscription-Key": KEY}, timeout=(2, 0.3))
    assert emu.stats()["submits_accepted"] == 1  # accepted and charged although the answer was lost

    request_id = submit_ok(emu, image_url)
    emu.inject("poll_garbage")
    garbage = poll(emu, request_id)
    assert garbage.status_code == 200 and garbage.text.startswith("<html>")
    assert final_document(emu, request_id)["status"] == "COMPLETED"

    media_url = f"{emu.url}/media/{request_id}/output.png"
    emu.inject("media_garbage")
    assert requests.get(media_url, timeout=5).content.startswith(b"<html>")
    assert requests.get(media_url, timeout=5).content.startswith(b"\x89PNG")

    emu.inject("outcome_bad_media_url")
    odd = submit_ok(emu, image_url)
    document = final_document(emu, odd)
    assert document["status"] == "COMPLETED" and document["output"]["media_url"] == ["file:///etc/passwd"]


@pytest.mark.parametrize("kind, status, error", [
    ("outcome_failed", "FAILED", "Injected failure: face restoration failed"),
    ("outcome_error", "ERROR", "Injected system error"),
])
def test_injected_outcomes(emu, image_url, kind, status, error):
    emu.inject(kind)
    request_id = submit_ok(emu, image_url)
    document = final_document(emu, request_id)
    assert (document["status"], document["error"], document["output"]) == (status, error, None)
    assert ISO.match(document["completed_at"])
    assert requests.get(f"{emu.url}/media/{request_id}/output.png", timeout=5).status_code == 404
    later = submit_ok(emu, image_url)
    assert final_document(emu, later)["status"] == "COMPLETED"  # the fault was used up


def test_unfetchable_and_undecodable_inputs_fail(emu, site):
    missing = submit_ok(emu, site.url("/nowhere.png"))
    document = final_document(emu, missing)
    assert document["status"] == "FAILED" and document["error"] == "Could not fetch image: HTTP 404"
    assert job_stats(emu, missing)["fetched_sha256"] is None

    junk = b"this is not an image"
    broken = submit_ok(emu, site.serve("/broken.png", junk))
    document = final_document(emu, broken)
    assert document["status"] == "FAILED" and "decode" in document["error"]
    assert job_stats(emu, broken)["fetched_sha256"] == hashlib.sha256(junk).hexdigest()
    assert emu.submits_by_content() == {hashlib.sha256(junk).hexdigest(): 1}


def test_unknown_ids_and_paths_are_404(emu):
    response = poll(emu, "codeformer-image-restoration_nope")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found", "message": "Request not found"}
    assert requests.get(f"{emu.url}/media/nope/output.png", timeout=5).status_code == 404
    response = requests.get(f"{emu.url}/somewhere", timeout=5)
    assert response.status_code == 404 and response.json()["error"] == "Not Found"
    assert requests.post(f"{emu.url}/somewhere", json={}, timeout=5).status_code == 404


def test_stop_is_quick_and_removes_outputs(site, image_url):
    gateway = GatewayEmulator(latency=0.01).start()
    output_dir = gateway._output_dir
    submit_ok(gateway, image_url)
    assert gateway.wait_idle(5) and os.listdir(output_dir)
    gateway.latency = 30
    slow = submit_ok(gateway, image_url)
    begun = time.monotonic()
    gateway.stop()
    assert time.monotonic() - begun < 2
    # Interrupted, not abandoned (stop gives up joining after STOP_JOIN_SECONDS, which is within the 2 s above).
    assert f"emulator-{slow}" not in [t.name for t in threading.enumerate()], "the 30 s job is still running"
    assert not os.path.exists(output_dir)


# ---------------------------------------------------------------- admin and webhooks


def test_admin_endpoints(emu, image_url):
    submit_ok(emu, image_url)
    assert emu.wait_idle(5)
    over_http = requests.get(f"{emu.url}/_emulator/stats", timeout=5).json()
    assert over_http["submits_accepted"] == 1 and over_http["jobs"][0]["status"] == "COMPLETED"

    settings = {"latency": 0.01, "max_concurrent": 2, "balance": 3, "rate_limit": 50,
                "model_disabled": True, "revoked_keys": ["old"], "hang_seconds": 2, "fetch_delay": 0.5,
                "drop_webhooks": True}
    response = requests.post(f"{emu.url}/_emulator/settings", json=settings, timeout=5)
    assert response.status_code == 200 and response.json() == settings
    assert (emu.latency, emu.max_concurrent, emu.balance, emu.rate_limit, emu.model_disabled,
            emu.revoked_keys, emu.hang_seconds, emu.fetch_delay, emu.drop_webhooks) == (
        0.01, 2, 3, 50, True, {"old"}, 2, 0.5, True)
    for bad in ({"latency": -1}, {"colour": "red"}, {"max_concurrent": 1.5}):
        assert requests.post(f"{emu.url}/_emulator/settings", json=bad, timeout=5).status_code == 400

    emu.model_disabled = False
    response = requests.post(f"{emu.url}/_emulator/faults", json={"kind": "submit_500", "count": 2},
                             timeout=5)
    assert response.status_code == 200
    assert [submit(emu, {"image": image_url}).status_code for _ in range(3)] == [500, 500, 202]
    for bad in ({"kind": "meteor"}, {"kind": "poll_500", "count": -1}, [1]):
        assert requests.post(f"{emu.url}/_emulator/faults", json=bad, timeout=5).status_code == 400


def test_webhook_receives_the_final_document(emu, site, image_url):
    by_header = submit(emu, {"image": image_url},
                       headers={"X-Webhook-URL": site.url("/hook/header")}).json()["request_id"]
    by_body = submit_ok(emu, image_url, webhook=site.url("/hook/body"),
                        webhook_events_filter=["completed"])
    silent = submit_ok(emu, image_url, webhook=site.url("/hook/silent"), webhook_events_filter=["start"])
    assert emu.wait_idle(5)
    posts = dict(site.wait_posts(2))
    assert set(posts) == {"/hook/header", "/hook/body"}
    assert posts["/hook/header"]["request_id"] == by_header
    assert posts["/hook/body"]["request_id"] == by_body
    assert posts["/hook/body"] == poll(emu, by_body).json()
    assert posts["/hook/header"]["status"] == "COMPLETED"
    assert poll(emu, silent).json()["status"] == "COMPLETED"  # filtered out, not forgotten


def test_unreachable_webhook_does_not_break_the_job(emu, image_url):
    request_id = submit_ok(emu, image_url, webhook="http://127.0.0.1:9/hook")
    assert final_document(emu, request_id)["status"] == "COMPLETED"
    assert emu.wait_idle(5)


# ---------------------------------------------------------------- pure helpers and CLI


def test_pure_helpers():
    assert emu_mod.iso_timestamp(0.5) == "1970-01-01T00:00:00.500Z"
    assert emu_mod.retry_after_seconds(None, 1.0, 1.0) is None
    assert emu_mod.retry_after_seconds(0.25, 10.0, 11.5) == 3
    assert emu_mod.retry_after_seconds(4, 10.0, 10.3) is None
    assert emu_mod.parse_listen("0.0.0.0:8787") == ("0.0.0.0", 8787)
    with pytest.raises(ConfigError, match="--listen"):
        GatewayEmulator("localhost")
    assert emu_mod.validate_generate_body({"image": "https://h/x.png", "upscale": 8,
                                           "codeformer_fidelity": 0}) is None


def test_cli_arguments_and_run_until_signal():
    parser = argparse.ArgumentParser()
    emu_mod.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.listen, args.api_key, args.balance, args.rate_limit) == \
        ("127.0.0.1:8787", "emulator-key", None, None)
    assert "does NOT restore faces" in parser.format_help()

    process = subprocess.Popen(
        [sys.executable, "-m", "daemon.emulator", "--listen", "127.0.0.1:0", "--latency", "0.01"],
        stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        base_url = re.search(r"base_url=(\S+)", line).group(1)
        assert "status_url=http://127.0.0.1:" in line and "emulator-key" in line
        response = requests.post(f"{base_url}/codeformer/generate", json={"image": "http://127.0.0.1:9/x"},
                                 headers={"Ocp-Apim-Subscription-Key": "emulator-key"}, timeout=5)
        assert response.status_code == 202
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        process.kill()
        process.stdout.close()
