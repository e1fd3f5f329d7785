"""A dropped scan comes back restored: the real daemon, the real watcher and the emulator on loopback."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

from PIL import Image

from daemon.demo import make_photo
from daemon.emulator import render_output
from daemon.journal import Journal, JobState
from daemon.service import journal_path

from .conftest import API_KEY, visible_files, wait_for

EXPECTED_PARAMS = {"codeformer_fidelity": 0.7, "background_enhance": False, "face_upsample": True, "upscale": 2}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_output(original: Path, upscale: int) -> Image.Image:
    """What the emulator makes of exactly these pixels: the input resized by `upscale`, its centre touched."""
    with Image.open(original) as image:
        return Image.open(io.BytesIO(render_output(image.convert("RGB"), upscale)))


def write_slowly(path: Path, data: bytes, chunks: int, pause: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    step = len(data) // chunks + 1
    with open(path, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
            f.flush()
            time.sleep(pause)


def test_dropped_scans_come_back_restored(tmp_path, folders, emulator, make_config, run_daemon):
    config = make_config()
    daemon = run_daemon(config)
    inbox = folders["inbox"]
    staging = tmp_path / "elsewhere"
    staging.mkdir()

    def photo(name: str, seed: int, fmt: str, size=(320, 400)) -> bytes:
        return make_photo(staging / name, *size, seed=seed, format=fmt).read_bytes()

    originals = {
        "portrait.jpg": photo("p.jpg", 1, "JPEG"),
        "album 1960s/wedding.png": photo("w.png", 2, "PNG"),
        "famille/école été.tif": photo("e.tif", 3, "TIFF"),
        "moved in.jpg": photo("moved in.jpg", 4, "JPEG", (300, 200)),
        "deep/a/b/slow scan.jpg": photo("slow.jpg", 5, "JPEG", (360, 240)),
    }
    snapshot = {rel: tmp_path / "copies" / rel for rel in originals}
    for rel, data in originals.items():
        snapshot[rel].parent.mkdir(parents=True, exist_ok=True)
        snapshot[rel].write_bytes(data)
    dropped = list(originals)

    for rel in ("portrait.jpg", "album 1960s/wedding.png", "famille/école été.tif"):  # as a scanner does
        target = inbox / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / (target.name + ".part")).write_bytes(originals[rel])
        os.rename(target.parent / (target.name + ".part"), target)
    os.rename(staging / "moved in.jpg", inbox / "moved in.jpg")  # moved in from elsewhere on the disk
    write_slowly(inbox / "deep" / "a" / "b" / "slow scan.jpg", originals["deep/a/b/slow scan.jpg"],
                 chunks=8, pause=0.12)  # written in place, slower than the settle time in total

    outputs = {rel: folders["outbox"] / Path(rel).with_suffix(".png") for rel in dropped}
    wait_for(lambda: all(p.exists() for p in outputs.values())
             and len(visible_files(folders["archive"])) == len(dropped), 30, what="all outputs and archives")

    for rel, output in outputs.items():
        with Image.open(output) as image:
            assert image.format == "PNG", rel
            with Image.open(snapshot[rel]) as original:
                assert image.size == (original.width * 2, original.height * 2), rel
            assert image.convert("RGB").tobytes() == reference_output(snapshot[rel], 2).tobytes(), rel
        assert (folders["archive"] / rel).read_bytes() == originals[rel], rel

    assert visible_files(folders["inbox"]) == []
    assert sorted(visible_files(folders["outbox"])) == sorted(outputs.values())  # exactly once each
    assert visible_files(folders["failed"]) == []

    stats = emulator.stats()
    assert stats["submits_accepted"] == len(dropped) == stats["submits_received"]
    assert all(job["key_ok"] for job in stats["jobs"])
    assert all(job["params"] == EXPECTED_PARAMS for job in stats["jobs"])
    fetched = sorted(job["fetched_sha256"] for job in stats["jobs"])
    direct = {hashlib.sha256(originals[rel]).hexdigest() for rel in dropped if not rel.endswith(".tif")}
    assert direct <= set(fetched), "JPEG and PNG scans are published byte for byte"
    assert all(count == 1 for count in emulator.submits_by_content().values())
    daemon.stop()
    assert daemon.clean


def test_files_already_in_the_inbox_at_start_up_are_processed(folders, emulator, make_config, run_daemon):
    for i in range(3):
        make_photo(folders["inbox"] / f"old-{i}.jpg", 200, 160, seed=i, format="JPEG")
    run_daemon(make_config())
    wait_for(lambda: len(visible_files(folders["outbox"])) == 3, 20, what="3 outputs")
    assert emulator.stats()["submits_accepted"] == 3


def test_half_written_file_is_not_published_before_it_is_complete(tmp_path, folders, emulator, make_config,
                                                                   run_daemon):
    config = make_config(watch={"settle_seconds": 0.3})
    daemon = run_daemon(config)
    watcher = daemon.service.watcher
    data = make_photo(tmp_path / "whole.jpg", 400, 300, seed=9, format="JPEG").read_bytes()
    target = folders["inbox"] / "scanning.jpg"
    with open(target, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        # The daemon has seen the half, and its loop ran past the settle time: still open for writing, untaken.
        wait_for(lambda: "scanning.jpg" in watcher._tracker, 5, what="the watcher to see the file")
        daemon.wait_for_passes()  # every event of the writes so far drained
        daemon.wait_for_passes(config.watch.settle_seconds)
        assert "scanning.jpg" in watcher._tracker, "taken while still open for writing"
        assert daemon.service.journal.active_jobs_for(["scanning.jpg"]) == {}
        assert emulator.stats()["submits_received"] == 0
        f.write(data[len(data) // 2:])
    wait_for(lambda: (folders["outbox"] / "scanning.png").exists(), 20, what="output")
    [job] = emulator.stats()["jobs"]
    assert job["fetched_sha256"] == hashlib.sha256(data).hexdigest()
    assert visible_files(folders["failed"]) == []


def test_a_job_submitted_before_a_stop_resumes_polling_and_is_never_submitted_again(
        folders, emulator, make_config, run_daemon, captured_logs):
    emulator.latency = 2.0
    from .conftest import free_port

    config = make_config(hosting={"adapter": "builtin", "builtin": {"listen": f"127.0.0.1:{free_port()}"}})
    first = run_daemon(config)
    make_photo(folders["inbox"] / "one.jpg", 200, 160, seed=1, format="JPEG")
    wait_for(lambda: emulator.stats()["submits_accepted"] == 1, 10, what="the submit")
    first.stop()
    journal = Journal(journal_path(config))
    [job] = journal.jobs_in(JobState.SUBMITTED)
    journal.close()
    assert not (folders["outbox"] / "one.png").exists()

    run_daemon(config)
    wait_for(lambda: (folders["outbox"] / "one.png").exists(), 20, what="output after restart")
    assert emulator.stats()["submits_accepted"] == 1
    resumed = [e for e in captured_logs if e["event"] == "job.resumed"]
    assert [e["request_id"] for e in resumed] == [job.request_id]


def test_the_key_never_appears_in_logs_state_or_outbox(tmp_path, folders, emulator, daemon_process):
    from .conftest import config_mapping, write_config

    mapping = config_mapping(folders, emulator)
    config_path = write_config(tmp_path / "config.yaml", mapping)
    proc = daemon_process(config_path)
    proc.wait_ready()
    make_photo(folders["inbox"] / "good.jpg", 200, 160, seed=1, format="JPEG")
    (folders["inbox"] / "bad.jpg").write_text("this is not an image, whatever its name says")
    wait_for(lambda: (folders["outbox"] / "good.png").exists()
             and (folders["failed"] / "bad.jpg.error.json").exists(), 20, what="one output and one failure")
    assert proc.terminate() == 0

    logs = proc.log_path.read_bytes()
    assert b"job.submitted" in logs and b"job.failed" in logs  # the logs are really there to search
    places = [proc.log_path] + [p for folder in ("state", "outbox", "failed", "archive")
                                for p in folders[folder].rglob("*") if p.is_file()]
    assert len(places) > 4
    leaks = [str(p) for p in places if API_KEY.encode() in p.read_bytes()]
    assert leaks == []
