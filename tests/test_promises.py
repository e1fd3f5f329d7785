"""The promises where they are weakest: no double payment, no stuck slot, no result adopted by mistake.

Each test drives the real daemon (or its real stages) against the emulator on loopback, with real
files and a real journal, into one of the corners where a promise used to break.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from daemon import stages
from daemon.api import ApiClient
from daemon.config import Secret
from daemon.demo import make_photo
from daemon.context import Context
from daemon.hosting import BuiltinHost, CommandHost
from daemon.journal import Job, Journal, JobState
from daemon.outbox import Folders
from daemon.retry import POSSIBLY_PAID
from daemon.service import Service, journal_path

from .conftest import API_KEY, visible_files, wait_for
from .hosting_fixtures import command_settings, folder_server  # noqa: F401 - fixture

PARAMS_KEYS = ("codeformer_fidelity", "background_enhance", "face_upsample", "upscale")


def error_record(folders: dict[str, Path], name: str) -> dict:
    return json.loads((folders["failed"] / f"{name}.error.json").read_text(encoding="utf-8"))


def stage_context(config, journal: Journal, host) -> Context:
    """The Context the service builds, from the same real parts."""
    f = config.folders
    return Context(config=config, journal=journal, host=host, api=ApiClient(config.api, Secret(API_KEY)),
                   folders=Folders(f.outbox, f.archive, f.failed), inbox=f.inbox, staging=config.state_dir / "staging")


def add_job(journal: Journal, inbox: Path, name: str, config) -> Job:
    st = (inbox / name).stat()
    return journal.add_job(name, st.st_size, st.st_mtime_ns, config.restore.as_request())


# --------------------------------------------------------------------------- a twin done during a slow publish


def test_a_twin_done_while_the_other_copy_is_published_slowly_is_reused_with_one_submit(
        tmp_path, folders, emulator, make_config, folder_server, monkeypatch):  # noqa: F811
    monkeypatch.setenv("STANDIN_SLOW_SECONDS", "6")
    config = make_config(hosting={"adapter": "command", "command": command_settings(folder_server)})
    original = make_photo(tmp_path / "scan.jpg", 240, 180, seed=21, format="JPEG")
    for name in ("a.jpg", "b slow.jpg"):  # identical bytes; the stand-in uploads "slow" names slowly
        (folders["inbox"] / name).write_bytes(original.read_bytes())
    journal = Journal(journal_path(config))
    host = CommandHost(config.hosting.command)
    ctx = stage_context(config, journal, host)
    first = add_job(journal, folders["inbox"], "a.jpg", config)
    second = add_job(journal, folders["inbox"], "b slow.jpg", config)

    slow = threading.Thread(target=stages.launch, args=(ctx, journal.transition(second, JobState.PUBLISHING)))
    slow.start()
    wait_for(lambda: journal.get(second.id).hosted_key, 10, what="the slow copy to start publishing")
    stages.launch(ctx, journal.transition(first, JobState.PUBLISHING))  # looks before the slow one submits
    assert emulator.stats()["submits_accepted"] == 1
    while journal.get(first.id).state is JobState.SUBMITTED:
        stages.poll(ctx, journal.get(first.id))
        time.sleep(0.1)
    stages.deliver(ctx, journal.get(first.id))  # the scheduler's next step once the provider completed
    assert journal.get(first.id).state is JobState.DONE
    assert slow.is_alive(), "the twin must finish while the other copy is still being published"

    slow.join(30)
    done = journal.get(second.id)
    assert done.state is JobState.DONE and done.duplicate_of == first.id
    assert emulator.stats()["submits_received"] == 1, "one submit in all"
    outputs = visible_files(folders["outbox"])
    assert [p.name for p in outputs] == ["a.png", "b slow.png"]
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    assert list(folder_server.folder.iterdir()) == [], "the slow copy was unpublished"
    journal.close()


# --------------------------------------------------------------------------- backoff never blocks newer work


def test_pending_jobs_backing_off_do_not_keep_newer_files_from_their_slots(
        tmp_path, folders, emulator, make_config, run_daemon):
    config = make_config(api={"max_in_flight": 2})
    journal = Journal(journal_path(config))
    for n in (1, 2):  # the two oldest jobs wait out a long backoff (a 5xx, a twin, a missing inbox ...)
        make_photo(folders["inbox"] / f"old{n}.jpg", 200, 150, seed=n, format="JPEG")
        job = add_job(journal, folders["inbox"], f"old{n}.jpg", config)
        journal.update(job, not_before=time.time() + 3600, last_error="HTTP 503: busy")
    journal.close()

    run_daemon(config)
    make_photo(folders["inbox"] / "new.jpg", 200, 150, seed=3, format="JPEG")
    wait_for(lambda: (folders["archive"] / "new.jpg").exists(), 10, what="the newer file restored and archived")
    assert (folders["outbox"] / "new.png").exists()
    assert emulator.stats()["submits_received"] == 1
    assert sorted(p.name for p in visible_files(folders["inbox"])) == ["old1.jpg", "old2.jpg"]


# --------------------------------------------------------------------------- a job the provider forgot


def test_a_job_whose_status_answers_404_past_job_timeout_frees_its_slot_and_is_explained(
        tmp_path, folders, emulator, make_config, run_daemon, captured_logs):
    emulator.latency = 30.0
    config = make_config(api={"max_in_flight": 1, "job_timeout": 2.0, "poll_interval": 0.1})
    run_daemon(config)
    make_photo(folders["inbox"] / "forgotten.jpg", 200, 150, seed=4, format="JPEG")
    wait_for(lambda: emulator.stats()["submits_accepted"] == 1, 10, what="the first submit")
    [job] = emulator.stats()["jobs"]
    emulator.forget(job["request_id"])  # purged at the provider: its status is 404 from now on
    emulator.latency = 0.2
    make_photo(folders["inbox"] / "next.jpg", 200, 150, seed=5, format="JPEG")

    wait_for(lambda: (folders["failed"] / "forgotten.jpg.error.json").exists(), 15, what="the forgotten job explained")
    record = error_record(folders, "forgotten.jpg")
    assert record["stage"] == "lost_at_provider" and record["stage"] in POSSIBLY_PAID
    assert "no longer knows this job" in record["reason"] and "may have been paid" in record["reason"]
    wait_for(lambda: (folders["outbox"] / "next.png").exists(), 15, what="the next file through the freed slot")
    assert emulator.stats()["submits_received"] == 2


def test_a_job_whose_polls_get_no_answer_at_all_is_never_given_up(
        tmp_path, folders, emulator, make_config, run_daemon):
    """No answer is no word from the provider: the job may be finished and paid for (issue 5's rule)."""
    emulator.latency = 30.0
    config = make_config(api={"max_in_flight": 1, "job_timeout": 1.0, "poll_interval": 0.1,
                              "connect_timeout": 0.2})
    daemon = run_daemon(config)
    make_photo(folders["inbox"] / "a.jpg", 200, 150, seed=6, format="JPEG")
    ctx = daemon.service.scheduler.ctx
    # The emulator counts the submit before it answers; the job is SUBMITTED once the answer is recorded.
    [job] = wait_for(lambda: ctx.journal.jobs_in(JobState.SUBMITTED), 10, what="the submit recorded")
    ctx.api.config = type(ctx.api.config)(**{**ctx.api.config.__dict__, "status_url": "http://127.0.0.1:9"})
    ctx.journal.update(job, polling_url="http://127.0.0.1:9/v2/requests/status/x")  # nothing listens there
    daemon.wait_for_passes(0.5)  # a poll sent before the move has its answer by now
    status_before = emulator.stats()["polls"]
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert ctx.journal.get(job.id).state is JobState.SUBMITTED
        time.sleep(0.1)
    assert not (folders["failed"] / "a.jpg.error.json").exists()
    assert emulator.stats()["polls"] == status_before


# --------------------------------------------------------------------------- a result too large to decode


def test_a_result_over_the_pixel_cap_is_fetched_once_and_failed_with_the_reason(
        tmp_path, folders, emulator, make_config, run_daemon):
    config = make_config(preflight={"max_pixels": 40_000})  # 200x150 scans pass; 2x results up to 160,000 px
    emulator.inject("outcome_oversized")  # 8x instead of 2x: 1600x1200
    run_daemon(config)
    make_photo(folders["inbox"] / "big.jpg", 200, 150, seed=7, format="JPEG")
    wait_for(lambda: (folders["failed"] / "big.jpg.error.json").exists(), 15, what="the oversized result refused")
    record = error_record(folders, "big.jpg")
    assert "1600x1200" in record["reason"] and "over the cap of 160000" in record["reason"]
    assert emulator.stats()["media_downloads"] == 1 and emulator.stats()["submits_received"] == 1
    assert visible_files(folders["outbox"]) == []


def test_results_are_checked_against_the_cap_before_they_are_decoded(tmp_path):
    from daemon.output.pipeline import BadResult, result_header

    path = tmp_path / "huge.png"
    Image.new("L", (20_000, 20_000)).save(path, optimize=False, compress_level=9)  # 400 Mpx, a few hundred KB
    with pytest.raises(BadResult) as refused:
        result_header(path, cap=1_000_000)
    assert not refused.value.retryable and "20000x20000" in str(refused.value)


# --------------------------------------------------------------------------- an unexpected error while publishing


class PublishesThenRaises(BuiltinHost):
    """A host that stores the file and then fails unexpectedly, the way an SDK may raise after its upload."""

    def __init__(self, *args, failures: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failures = failures
        self.failed_keys: list[str] = []
        self.unpublished: list[str] = []

    def publish(self, key, path, content_type):
        url = super().publish(key, path, content_type)
        if len(self.failed_keys) < self.failures:
            self.failed_keys.append(key)
            raise RuntimeError("the SDK tripped over its own response after the upload")
        return url

    def unpublish(self, key):
        self.unpublished.append(key)
        super().unpublish(key)


def test_an_unexpected_error_during_publishing_unpublishes_before_the_job_waits(
        tmp_path, folders, emulator, make_config, captured_logs):
    config = make_config()
    host = PublishesThenRaises("127.0.0.1:0", failures=2)
    service = Service(config, Secret(API_KEY), host=host)
    service.start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        make_photo(folders["inbox"] / "a.jpg", 200, 150, seed=8, format="JPEG")
        wait_for(lambda: (folders["outbox"] / "a.png").exists(), 30, what="the file restored after two errors")
        assert len(host.failed_keys) == 2
        assert set(host.failed_keys) <= set(host.unpublished), "a failed publish must not stay served"
        assert sum(e["event"] == "job.stage_error" for e in captured_logs) == 2
        wait_for(lambda: host.published_count() == 0, 5, what="nothing left published")
    finally:
        service.stop()
        thread.join(30)


# --------------------------------------------------------------------------- two scans with one stem, and a crash


def png_bytes(color: tuple[int, int, int]) -> bytes:
    """A small result of its own colour, with a gradient (a single colour would be refused as blank)."""
    image = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    buffer = io.BytesIO()
    Image.blend(image, Image.new("RGB", image.size, color), 0.5).save(buffer, "PNG")
    return buffer.getvalue()


def crashed_while_placing(config, folders, name: str, media_url: str, result: bytes) -> None:
    """A job the provider finished, whose output name and result hash were recorded, then a crash."""
    journal = Journal(journal_path(config))
    job = add_job(journal, folders["inbox"], name, config)
    for state in (JobState.PUBLISHING, JobState.SUBMITTING, JobState.SUBMITTED):
        job = journal.transition(job, state)
    journal.transition(job, JobState.DOWNLOADING, media_url=media_url, request_id=f"req-{job.id}",
                       output_path=str(folders["outbox"] / (Path(name).stem + ".png")),
                       output_sha256=hashlib.sha256(result).hexdigest())
    journal.close()


def test_after_a_crash_a_job_never_adopts_an_output_another_job_placed_under_its_recorded_name(
        tmp_path, folders, emulator, make_config, run_daemon, folder_server):  # noqa: F811
    """scan.jpg recorded scan.png and crashed before placing it; scan.tif's result took the name meanwhile."""
    config = make_config()
    own_result, other_result = png_bytes((200, 30, 30)), png_bytes((30, 30, 200))
    (folder_server.folder / "result.png").write_bytes(own_result)
    make_photo(folders["inbox"] / "scan.jpg", 200, 150, seed=9, format="JPEG")
    folders["outbox"].mkdir()
    (folders["outbox"] / "scan.png").write_bytes(other_result)

    crashed_while_placing(config, folders, "scan.jpg", f"{folder_server.url}/result.png", own_result)

    run_daemon(config)
    wait_for(lambda: (folders["archive"] / "scan.jpg").exists(), 15, what="the job finished")
    assert (folders["outbox"] / "scan.png").read_bytes() == other_result, "the other job's output is untouched"
    with Image.open(folders["outbox"] / "scan-1.png") as mine, Image.open(io.BytesIO(own_result)) as expected:
        assert mine.convert("RGB").tobytes() == expected.convert("RGB").tobytes(), "its own result, under a free name"


def test_a_result_placed_before_a_crash_is_adopted_without_fetching_it_again(
        tmp_path, folders, emulator, make_config, run_daemon, folder_server):  # noqa: F811
    config = make_config()
    own_result = png_bytes((10, 200, 10))
    make_photo(folders["inbox"] / "scan.jpg", 200, 150, seed=10, format="JPEG")
    folders["outbox"].mkdir()
    (folders["outbox"] / "scan.png").write_bytes(own_result)
    crashed_while_placing(config, folders, "scan.jpg", f"{folder_server.url}/gone.png", own_result)

    run_daemon(config)
    wait_for(lambda: (folders["archive"] / "scan.jpg").exists(), 15, what="the job finished")
    assert [p.name for p in visible_files(folders["outbox"])] == ["scan.png"]


# --------------------------------------------------------------------------- the daemon's own copy gone


def test_a_provider_failure_to_fetch_while_the_daemons_copy_was_gone_sends_the_scan_back_not_to_failed(
        tmp_path, folders, emulator, make_config, run_daemon, captured_logs):
    emulator.fetch_delay = 1.5
    config = make_config()
    run_daemon(config)
    make_photo(folders["inbox"] / "a.jpg", 200, 150, seed=11, format="JPEG")
    wait_for(lambda: emulator.stats()["submits_accepted"] == 1, 10, what="the first submit")
    staging = config.state_dir / "staging"
    [pinned] = list(staging.iterdir())
    pinned.unlink()  # the published copy is gone before the provider fetches it
    emulator.fetch_delay = 0.0
    wait_for(lambda: (folders["outbox"] / "a.png").exists(), 30, what="the scan restored on a second submit")
    jobs = emulator.stats()["jobs"]
    assert [j["status"] for j in jobs] == ["FAILED", "COMPLETED"] and emulator.stats()["submits_received"] == 2
    assert visible_files(folders["failed"]) == []
    retried = [e for e in captured_logs if e["event"] == "job.retry_later"]
    # Counted as an attempt: the accepted submit was the first, this is the second.
    assert len(retried) == 1 and "unavailable" in retried[0]["reason"] and retried[0]["attempt"] == 2


def test_a_failed_fetch_while_the_built_in_host_was_down_for_a_restart_sends_the_scan_back(
        tmp_path, folders, emulator, make_config, run_daemon):
    """The provider came for the scan while the daemon restarted: nothing was serving it then."""
    config = make_config()
    scan = make_photo(folders["inbox"] / "a.jpg", 200, 150, seed=12, format="JPEG")
    staging = config.state_dir / "staging"
    staging.mkdir(parents=True)
    pinned = staging / "job-1-a.jpg"
    pinned.write_bytes(scan.read_bytes())  # the pin is intact: only the server was missing
    answer = ApiClient(config.api, Secret(API_KEY)).submit("http://127.0.0.1:9/gone.jpg", config.restore.as_request())
    wait_for(lambda: emulator.stats()["jobs"][0]["status"] == "FAILED", 10, what="the provider's failed fetch")

    journal = Journal(journal_path(config))
    job = add_job(journal, folders["inbox"], "a.jpg", config)
    for state in (JobState.PUBLISHING, JobState.SUBMITTING):
        job = journal.transition(job, state)
    journal.transition(job, JobState.SUBMITTED, request_id=answer.request_id, hosted_key="k" * 43 + ".jpg",
                       polling_url=f"{emulator.status_url}/{answer.request_id}", upload_path=str(pinned),
                       sha256=hashlib.sha256(scan.read_bytes()).hexdigest(), submitted_at=time.time() - 60)
    journal.close()

    run_daemon(config)
    wait_for(lambda: (folders["outbox"] / "a.png").exists(), 20, what="the scan restored on a second submit")
    assert visible_files(folders["failed"]) == []
    assert [j["status"] for j in emulator.stats()["jobs"]] == ["FAILED", "COMPLETED"]
