"""Before/after previews for the dashboard: written by the real daemon, small, upright, never a job's undoing.

End to end through the emulator: both previews after a delivery, the before one for a scan the provider
failed, none with the dashboard off, a broken thumbnails folder that costs only the previews. Beside
that, on real files: the sweep, what `open_preview` refuses, and what a preview costs in decoding.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from daemon import memory
from daemon.demo import make_photo
from daemon.journal import JobState
from daemon.preflight import check_image
from daemon.previews import (PREVIEW_SIDE, copy_preview, open_preview, preview_path, previews_folder,
                             sweep_previews, wanted, write_preview)

from .conftest import visible_files, wait_for

ON = {"listen": "127.0.0.1:0"}


def drop(tmp_path: Path, folders, name: str, width: int, height: int, fmt: str, seed: int = 1, **save) -> Path:
    """Make a scan beside the inbox and rename it in whole, as scanning software does."""
    made = make_photo(tmp_path / name, width, height, seed=seed, format=fmt)
    if save:
        with Image.open(made) as image:
            image.convert("RGB").save(made, fmt, **save)
    return made.rename(folders["inbox"] / name)


def job_of(daemon, name: str):
    jobs = daemon.service.journal.read_jobs("SELECT * FROM jobs WHERE rel_path = ?", (name,))
    return jobs[0] if jobs else None


def finished(daemon, name: str, state: JobState = JobState.DONE):
    return wait_for(lambda: (job := job_of(daemon, name)) is not None and job.state is state and job,
                    what=f"{name} {state.value}")


def opened(folders, job_id: int, kind: str) -> Image.Image:
    path = preview_path(previews_folder(folders["state"]), job_id, kind)
    image = Image.open(path)
    image.load()
    return image


def written(logs, job_id: int, kind: str) -> list[dict]:
    return [e for e in logs if e.get("event") == "preview.written" and e["job_id"] == job_id and e["kind"] == kind]


# --------------------------------------------------------------------------- end to end


def test_a_delivered_scan_has_a_before_and_an_after_preview_512_on_its_long_side(
        tmp_path, folders, emulator, make_config, run_daemon, captured_logs):
    daemon = run_daemon(make_config(dashboard=ON))  # upscale 2: a 2400x1800 result
    drop(tmp_path, folders, "big.jpg", 1200, 900, "JPEG")
    job = finished(daemon, "big.jpg")
    for kind in ("before", "after"):
        with opened(folders, job.id, kind) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (512, 384))
    # The JPEG sent as it is was only drafted by preflight: its preview is read from the file; the
    # delivered result is made into one in memory, never decoded again.
    assert [e["source"] for e in written(captured_logs, job.id, "before")] == ["file"]
    assert [e["source"] for e in written(captured_logs, job.id, "after")] == ["memory"]


def test_a_scan_smaller_than_a_preview_keeps_its_size(tmp_path, folders, emulator, make_config, run_daemon,
                                                      captured_logs):
    daemon = run_daemon(make_config(dashboard=ON, restore={"upscale": 1}))
    drop(tmp_path, folders, "small.png", 300, 200, "PNG")
    job = finished(daemon, "small.png")
    for kind in ("before", "after"):
        with opened(folders, job.id, kind) as image:
            assert (image.format, image.size) == ("JPEG", (300, 200))
    # A PNG is decoded in full by preflight: that decode makes the preview.
    assert [e["source"] for e in written(captured_logs, job.id, "before")] == ["memory"]


def test_previews_of_a_rotated_scan_are_upright(tmp_path, folders, emulator, make_config, run_daemon):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 600x400, seen 400x600
    daemon = run_daemon(make_config(dashboard=ON))
    drop(tmp_path, folders, "turned.jpg", 600, 400, "JPEG", exif=exif.tobytes())
    job = finished(daemon, "turned.jpg")
    with opened(folders, job.id, "before") as before, opened(folders, job.id, "after") as after:
        assert before.size == (341, 512)
        assert after.size == (341, 512)  # the result is upright already: not turned a second time


def test_a_16_bit_grey_scan_is_previewed_from_preflights_own_decode_in_mid_grey(
        tmp_path, folders, emulator, make_config, run_daemon, captured_logs):
    daemon = run_daemon(make_config(dashboard=ON))
    Image.new("I;16", (800, 600), 32768).save(tmp_path / "grey.tif")
    (tmp_path / "grey.tif").rename(folders["inbox"] / "grey.tif")
    job = wait_for(lambda: (job := job_of(daemon, "grey.tif")) is not None and job.upload_path and job,
                   what="grey.tif checked")
    wait_for(lambda: written(captured_logs, job.id, "before"), what="its before preview")
    with opened(folders, job.id, "before") as image:
        assert image.size == (512, 384)
        assert 120 <= image.convert("L").getpixel((256, 192)) <= 136  # 32768 / 256, not clipped to white
    assert [e["source"] for e in written(captured_logs, job.id, "before")] == ["memory"]


def test_a_scan_the_provider_failed_has_its_before_preview_only(tmp_path, folders, emulator, make_config,
                                                                run_daemon):
    emulator.inject("outcome_failed")
    daemon = run_daemon(make_config(dashboard=ON))
    drop(tmp_path, folders, "failing.jpg", 640, 480, "JPEG")
    job = finished(daemon, "failing.jpg", JobState.FAILED)
    assert job.error_kind == "provider_failed"
    with opened(folders, job.id, "before") as image:
        assert image.size == (512, 384)
    assert not preview_path(previews_folder(folders["state"]), job.id, "after").exists()


@pytest.mark.parametrize("dashboard", [{"listen": None}, {"listen": "127.0.0.1:0", "thumbnails": False}])
def test_no_previews_are_written_with_the_dashboard_or_its_thumbnails_off(tmp_path, folders, emulator, make_config,
                                                                         run_daemon, dashboard):
    daemon = run_daemon(make_config(dashboard=dashboard))
    drop(tmp_path, folders, "plain.jpg", 640, 480, "JPEG")
    finished(daemon, "plain.jpg")
    assert not previews_folder(folders["state"]).exists()


def test_a_preview_that_cannot_be_written_never_fails_the_job(tmp_path, folders, emulator, make_config, run_daemon,
                                                              captured_logs):
    folders["state"].mkdir()
    previews_folder(folders["state"]).write_text("a file where the folder should be")
    daemon = run_daemon(make_config(dashboard=ON))
    drop(tmp_path, folders, "kept.jpg", 640, 480, "JPEG")
    job = finished(daemon, "kept.jpg")
    assert [p.name for p in visible_files(folders["outbox"])] == ["kept.png"]
    failures = [e for e in captured_logs if e.get("event") == "preview.failed"]
    assert sorted(e["kind"] for e in failures) == ["after", "before"]
    assert all(e["job_id"] == job.id and e["level"] == "warning" and e["error"] for e in failures)


def test_a_reused_result_gets_a_copy_of_its_twins_after_preview(tmp_path, folders, emulator, make_config,
                                                                run_daemon):
    daemon = run_daemon(make_config(dashboard=ON))
    drop(tmp_path, folders, "first.jpg", 640, 480, "JPEG", seed=7)
    twin = finished(daemon, "first.jpg")
    (tmp_path / "second.jpg").write_bytes((folders["archive"] / "first.jpg").read_bytes())
    (tmp_path / "second.jpg").rename(folders["inbox"] / "second.jpg")
    job = finished(daemon, "second.jpg")
    assert job.duplicate_of == twin.id  # its output is a copy of the twin's: nothing was decoded for it
    thumbnails = previews_folder(folders["state"])
    assert preview_path(thumbnails, job.id, "after").read_bytes() == preview_path(thumbnails, twin.id,
                                                                                  "after").read_bytes()
    assert preview_path(thumbnails, job.id, "before").exists()


# --------------------------------------------------------------------------- on real files


def test_the_sweep_removes_old_previews_of_finished_jobs_only(tmp_path):
    folder = tmp_path / "thumbnails"
    folder.mkdir()
    now = time.time()
    old, recent = now - 10 * 86400, now - 60
    files = {"1-before.jpg": old, "1-after.jpg": old,  # finished, old: removed
             "2-before.jpg": recent,  # finished, recent: kept
             "3-before.jpg": old,  # unfinished: kept however old
             "4-after.jpg": old,  # unknown to the journal: removed
             ".preview-0123456789abcdef.tmp": old,  # a temporary left by a crash: removed
             ".preview-fedcba9876543210.tmp": recent,  # perhaps being written now: kept
             "notes.txt": old, "01-before.jpg": old, "5-middle.jpg": old}  # not ours: kept
    for name, mtime in files.items():
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (mtime, mtime))
    asked: list[int] = []

    def is_finished(job_id: int) -> bool:
        asked.append(job_id)
        return job_id != 3

    assert sweep_previews(folder, is_finished, older_than=now - 7 * 86400) == 4
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".preview-fedcba9876543210.tmp", "01-before.jpg", "2-before.jpg", "3-before.jpg", "5-middle.jpg",
         "notes.txt"])
    assert sorted(asked) == [1, 3, 4]  # once per job, and only about old previews
    assert sweep_previews(tmp_path / "missing", is_finished, now) == 0


def test_open_preview_serves_only_its_own_regular_files(tmp_path):
    folder = tmp_path / "thumbnails"
    outside = tmp_path / "outbox-scan.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    assert write_preview(Image.new("RGB", (40, 30), (200, 10, 10)), folder, 7, "after") == folder / "7-after.jpg"
    with open_preview(folder, 7, "after") as f:
        assert f.read(3) == b"\xff\xd8\xff"
    os.symlink(outside, folder / "8-before.jpg")  # planted, pointing outside
    os.mkfifo(folder / "9-before.jpg")
    (folder / "10-before.jpg").mkdir()
    for job_id, kind in [(8, "before"), (9, "before"), (10, "before"), (11, "before"), (7, "before"),
                         ("7", "after"), ("../outbox-scan", "after"), (7.0, "after"), (True, "after"),
                         (0, "after"), (-7, "after"), (7, "../7-after"), (7, "thumb"), (7, "")]:
        assert open_preview(folder, job_id, kind) is None, (job_id, kind)
    for job_id, kind in [("7", "after"), (True, "after"), (0, "after"), (7, "side")]:
        with pytest.raises(ValueError):
            preview_path(folder, job_id, kind)


def test_a_jpeg_is_previewed_from_a_drafted_decode_under_the_budget(tmp_path):
    scan = make_photo(tmp_path / "scan.png", 4096, 3072, seed=2, format="PNG")
    with Image.open(scan) as image:
        image.convert("RGB").save(tmp_path / "scan.jpg", quality=90)
    held: list[tuple[str, int]] = []
    memory.BUDGET.listener = lambda event, need: held.append((event, need))
    try:
        made = write_preview(tmp_path / "scan.jpg", tmp_path / "thumbnails", 1, "before")
    finally:
        memory.BUDGET.listener = None
    with Image.open(made) as image:
        assert image.size == (PREVIEW_SIDE, 384)
    granted = [need for event, need in held if event == "granted"]
    assert granted == [512 * 384 * 4]  # 1/8 scale, RGB held in 4 bytes: not 4096 x 3072 x 4


def test_an_image_in_memory_is_previewed_without_asking_the_budget(tmp_path):
    """Preflight and the output call back while they hold the budget: asking again could wait for ever."""
    image = Image.new("RGB", (2000, 1500), (90, 120, 150))
    done: list[Path | None] = []
    with memory.BUDGET.hold(memory.BUDGET.capacity, "test"):
        worker = threading.Thread(target=lambda: done.append(write_preview(image, tmp_path, 3, "after")))
        worker.start()
        worker.join(10)
    assert done == [tmp_path / "3-after.jpg"]
    assert image.size == (2000, 1500) and image.getpixel((0, 0)) == (90, 120, 150)  # the caller's, untouched


def test_preflight_hands_its_full_decodes_to_the_preview_and_not_its_drafts(tmp_path):
    seen: dict[str, list[tuple[str, tuple[int, int]]]] = {}
    for name, fmt, mode in [("a.tif", "TIFF", "RGB"), ("b.png", "PNG", "RGB"), ("c.jpg", "JPEG", "RGB"),
                            ("d.tif", "TIFF", "I;16")]:
        path = tmp_path / name
        Image.new(mode, (1600, 1200), 3000).save(path, fmt)
        calls = seen.setdefault(name, [])
        check_image(path, tmp_path / "staging", name.split(".")[0], max_pixels=10 ** 8,
                    preview=lambda image, calls=calls: calls.append((image.mode, image.size)))
    assert seen == {"a.tif": [("RGB", (1600, 1200))], "b.png": [("RGB", (1600, 1200))], "c.jpg": [],
                    "d.tif": [("I;16", (1600, 1200))]}


def test_a_before_preview_is_made_again_only_when_the_scan_changed_since(tmp_path, folders, make_config):
    config = make_config(dashboard=ON)
    scan = tmp_path / "scan.jpg"
    Image.new("RGB", (64, 48)).save(scan)
    task = wanted(config, 5, "before", unless_newer_than=scan)
    task(scan)
    task(Image.new("RGB", (64, 48), (255, 0, 0)))  # a task is carried out once: the first copy wins
    with opened(folders, 5, "before") as image:
        assert image.getpixel((32, 24))[0] < 20
    assert wanted(config, 5, "before", unless_newer_than=scan) is None
    later = time.time() + 5
    os.utime(scan, (later, later))  # written to again
    assert wanted(config, 5, "before", unless_newer_than=scan) is not None
    assert wanted(make_config(dashboard={"listen": None}), 5, "before") is None


def test_copying_a_twins_preview_needs_one_to_copy(tmp_path):
    folder = tmp_path / "thumbnails"
    assert copy_preview(folder, 1, 2, "after") is None
    write_preview(Image.new("RGB", (20, 20)), folder, 1, "after")
    assert copy_preview(folder, 1, 2, "after") == folder / "2-after.jpg"
    assert (folder / "2-after.jpg").read_bytes() == (folder / "1-after.jpg").read_bytes()


def test_an_image_is_turned_by_its_exif_orientation_unless_it_is_upright_already(tmp_path):
    """The delivered result is upright already; an EXIF orientation it may carry from the provider is ignored."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.new("RGB", (600, 400), (30, 60, 90))
    stored.info["exif"] = exif.tobytes()
    with Image.open(write_preview(stored, tmp_path, 1, "before")) as turned:
        assert turned.size == (341, 512)
    with Image.open(write_preview(stored, tmp_path, 1, "after", upright=True)) as kept:
        assert kept.size == (512, 341)
