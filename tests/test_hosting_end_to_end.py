"""The real daemon and the emulator with each remote adapter: S3 (moto), command (a stand-in for rclone)
and WebDAV (wsgidav). The emulator fetches every scan through the URL the adapter made, as the provider
does; afterwards nothing is left in the storage, and no log line holds a signature or a secret."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

from daemon.demo import make_photo
from daemon.hosting import new_key

from .conftest import API_KEY, config_mapping, visible_files, wait_for, write_config
from .hosting_fixtures import (DAV_PASSWORD, S3_SECRET_KEY, aws_sandbox, command_settings,  # noqa: F401
                               dav_server, folder_server, moto_s3, s3_credentials, s3_settings, webdav_settings)

SECRETS = ("X-Amz-Signature", "Signature=", S3_SECRET_KEY, DAV_PASSWORD, API_KEY)


def assert_no_secrets(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a log line holds {secret[:12]}…"


def drop(folders: dict[str, Path], tmp_path: Path, names: list[str]) -> dict[str, str]:
    """Scans written elsewhere, then renamed into the inbox; their sha256 by name."""
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    digests = {}
    for seed, name in enumerate(names):
        photo = make_photo(staging / name, 200 + seed * 8, 150, seed=seed, format="JPEG")
        digests[name] = hashlib.sha256(photo.read_bytes()).hexdigest()
        photo.rename(folders["inbox"] / name)
    return digests


def wait_restored(folders: dict[str, Path], names: list[str], timeout: float = 30) -> None:
    outputs = [folders["outbox"] / Path(name).with_suffix(".png") for name in names]
    wait_for(lambda: all(p.exists() for p in outputs) and len(visible_files(folders["archive"])) == len(names),
             timeout, what="every scan restored and archived")


def fetched_by_url(emulator) -> dict[str, str]:
    return {job["fetched_sha256"]: job["image_url"] for job in emulator.stats()["jobs"]}


# --------------------------------------------------------------------------- S3


def test_s3_scans_travel_through_presigned_urls_and_leave_nothing_behind(
        tmp_path, folders, emulator, make_config, run_daemon, captured_logs, moto_s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENVCHAIN000001")  # the standard chain: environment variables
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    bucket = moto_s3.new_bucket()
    run_daemon(make_config(hosting={"adapter": "s3", "s3": s3_settings(moto_s3, bucket)}))
    names = ["portrait 1958.jpg", "wedding.jpg", "school class.jpg"]
    digests = drop(folders, tmp_path, names)
    wait_restored(folders, names)

    urls = fetched_by_url(emulator)
    assert set(urls) == set(digests.values()), "the provider fetched exactly the scans' bytes"
    for url in urls.values():
        assert url.startswith(f"{moto_s3.endpoint}/{bucket}/scans/") and "X-Amz-Signature=" in url
        assert not any(Path(name).stem.split()[0] in url for name in names)
    wait_for(lambda: moto_s3.keys(bucket) == [], 5, what="every object deleted")
    assert [e["adapter"] for e in captured_logs if e.get("event") == "file.published"] == ["s3"] * 3
    assert_no_secrets(json.dumps(captured_logs, default=str))


def test_s3_after_sigkill_between_upload_and_completion_the_jobs_finish_and_the_bucket_empties(
        tmp_path, folders, emulator, daemon_process, moto_s3):
    emulator.latency = 2.0
    emulator.max_concurrent = 1  # the second scan is fetched only after the first finishes: after the kill
    bucket = moto_s3.new_bucket()
    mapping = config_mapping(folders, emulator, hosting={"adapter": "s3", "s3": s3_settings(moto_s3, bucket)},
                             shutdown_timeout=5)
    config_path = write_config(tmp_path / "config.yaml", mapping)
    env = {"CREDENTIALS_DIRECTORY": str(s3_credentials(tmp_path / "credentials"))}  # the systemd way
    proc = daemon_process(config_path, env=env)
    proc.wait_ready()
    names = ["first.jpg", "second.jpg"]
    digests = drop(folders, tmp_path, names)
    wait_for(lambda: sum(e.get("event") == "job.submitted" for e in proc.events()) == 2, 20, what="both submitted")
    assert len(moto_s3.keys(bucket)) == 2
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(10)

    orphan = f"scans/{new_key('.jpg')}"  # as a crash of some earlier run could leave
    moto_s3.put(bucket, orphan)
    moto_s3.put(bucket, "scans/README.txt")  # not the daemon's: never touched
    proc = daemon_process(config_path, env=env)
    proc.wait_ready(count=2)
    wait_restored(folders, names)
    wait_for(lambda: moto_s3.keys(bucket) == ["scans/README.txt"], 5, what="the bucket emptied of scans")

    assert set(fetched_by_url(emulator)) == set(digests.values())
    assert emulator.stats()["submits_accepted"] == 2, "resumed, not submitted again"
    events = proc.events()
    assert sum(e.get("event") == "job.resumed" for e in events) == 2
    assert [e["orphans_unpublished"] for e in events if e.get("event") == "recover.cleaned"] == [1]
    assert proc.terminate() == 0
    assert_no_secrets(proc.log_path.read_text())


def test_s3_bucket_missing_stops_the_start_with_the_reason(tmp_path, folders, emulator, daemon_process, moto_s3):
    mapping = config_mapping(folders, emulator, hosting={"adapter": "s3",
                                                         "s3": s3_settings(moto_s3, "bucket-that-is-not-there")})
    proc = daemon_process(write_config(tmp_path / "config.yaml", mapping),
                          env={"CREDENTIALS_DIRECTORY": str(s3_credentials(tmp_path / "credentials"))})
    assert proc.proc.wait(30) == 1
    text = proc.log_path.read_text()
    assert "cannot start: hosting.s3.bucket" in text and "'bucket-that-is-not-there' does not exist" in text
    assert_no_secrets(text)


# --------------------------------------------------------------------------- command


def test_command_publishes_through_a_program_and_removes_afterwards(
        tmp_path, folders, emulator, make_config, run_daemon, captured_logs, folder_server):
    settings = command_settings(folder_server, url_template=folder_server.url + "/{key}")
    run_daemon(make_config(hosting={"adapter": "command", "command": settings}))
    names = ["one.jpg", "two.jpg"]
    digests = drop(folders, tmp_path, names)
    wait_restored(folders, names)
    urls = fetched_by_url(emulator)
    assert set(urls) == set(digests.values())
    assert all(url.startswith(folder_server.url + "/") and "one" not in url and "two" not in url
               for url in urls.values())
    wait_for(lambda: list(folder_server.folder.iterdir()) == [], 5, what="the remote folder emptied")
    assert_no_secrets(json.dumps(captured_logs, default=str))


def test_command_failures_end_in_failed_with_the_reason(
        tmp_path, folders, emulator, make_config, run_daemon, captured_logs, folder_server):
    settings = command_settings(folder_server, timeout=1)  # URL from the output: "silent" prints none
    run_daemon(make_config(api={"max_attempts": 2}, hosting={"adapter": "command", "command": settings}))
    expected = {
        "exit1.jpg": ["exited with status 1", "stderr: standin: uploading ... standin: remote refused the upload: "
                                              "quota exceeded"],
        "hang.jpg": ["did not finish within 1 s and was killed"],
        "silent.jpg": ["printed no http(s) URL on its last line (got nothing)"],
    }
    drop(folders, tmp_path, list(expected))
    records = {name: folders["failed"] / (name + ".error.json") for name in expected}
    wait_for(lambda: all(p.exists() for p in records.values()), 30, what="three error records")
    for name, says in expected.items():
        record = json.loads(records[name].read_text())
        assert record["stage"] == "attempts_exhausted" and record["submit_attempts"] == 2, record
        assert record["reason"].startswith("gave up after 2 attempts; last error: publish failed: "
                                           "hosting.command.publish: "), record["reason"]
        for text in says:
            assert text in record["reason"], record["reason"]
        assert (folders["failed"] / name).exists()
    assert emulator.stats()["submits_received"] == 0, "nothing was submitted without a URL"
    assert [p.name for p in folder_server.folder.iterdir()] == [], "the silent upload was removed again"
    assert_no_secrets(json.dumps(captured_logs, default=str))


# --------------------------------------------------------------------------- WebDAV


def test_webdav_scans_are_put_served_and_deleted(
        tmp_path, folders, emulator, make_config, run_daemon, captured_logs, dav_server, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "webdav_password").write_text(DAV_PASSWORD + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    run_daemon(make_config(hosting={"adapter": "webdav", "webdav": webdav_settings(dav_server)}))
    names = ["attic box 3.jpg", "attic box 4.jpg"]
    digests = drop(folders, tmp_path, names)
    wait_restored(folders, names)
    urls = fetched_by_url(emulator)
    assert set(urls) == set(digests.values())
    assert all(url.startswith(dav_server.public.url + "/") and "attic" not in url for url in urls.values())
    wait_for(lambda: list(dav_server.folder.iterdir()) == [], 5, what="the WebDAV folder emptied")
    assert_no_secrets(json.dumps(captured_logs, default=str))
