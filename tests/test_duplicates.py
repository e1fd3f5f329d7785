"""No content is paid for twice: identical scans with identical parameters cost one submit."""

from __future__ import annotations

import shutil

from daemon import reports
from daemon.config import config_from_mapping
from daemon.demo import make_photo
from daemon.journal import Journal, JobState
from daemon.service import journal_path

from .conftest import config_mapping, visible_files, wait_for


def pixels(path) -> bytes:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def test_same_image_dropped_before_and_after_the_first_completes_costs_one_submit(
        tmp_path, folders, emulator, make_config, run_daemon, captured_logs):
    emulator.latency = 1.0
    config = make_config()
    run_daemon(config)
    original = make_photo(tmp_path / "scan.jpg", 240, 180, seed=3, format="JPEG")
    shutil.copy(original, folders["inbox"] / "first.jpg")
    wait_for(lambda: emulator.stats()["submits_accepted"] == 1, 10, what="first submit")
    shutil.copy(original, folders["inbox"] / "while in flight.jpg")
    wait_for(lambda: (folders["outbox"] / "while in flight.png").exists(), 20, what="output of the twin")
    shutil.copy(original, folders["inbox"] / "after.jpg")
    wait_for(lambda: (folders["outbox"] / "after.png").exists(), 20, what="output after completion")

    assert emulator.stats()["submits_accepted"] == 1
    outputs = visible_files(folders["outbox"])
    assert [p.name for p in outputs] == ["after.png", "first.png", "while in flight.png"]
    assert len({p.read_bytes() for p in outputs}) == 1
    # the output is placed first, the original archived a moment later
    wait_for(lambda: len(visible_files(folders["archive"])) == 3, 10, what="the last original archived")
    assert visible_files(folders["inbox"]) == []
    duplicates = [e for e in captured_logs if e["event"] == "job.duplicate"]
    assert len(duplicates) == 2
    journal = Journal(journal_path(config), read_only=True)
    assert reports.journal_summary(journal, 0)["duplicates_skipped"] == 2
    journal.close()


def test_two_copies_dropped_at_once_cost_one_submit(tmp_path, folders, emulator, make_config, run_daemon):
    run_daemon(make_config())
    original = make_photo(tmp_path / "scan.jpg", 240, 180, seed=4, format="JPEG")
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(original, tmp_path / name)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).rename(folders["inbox"] / name)
    wait_for(lambda: len(visible_files(folders["outbox"])) == 3, 20, what="three outputs")
    assert emulator.stats()["submits_accepted"] == 1


def test_result_is_fetched_again_when_the_earlier_output_was_taken_away(tmp_path, folders, emulator,
                                                                         make_config, run_daemon):
    run_daemon(make_config())
    original = make_photo(tmp_path / "scan.jpg", 240, 180, seed=5, format="JPEG")
    shutil.copy(original, folders["inbox"] / "one.jpg")
    wait_for(lambda: (folders["outbox"] / "one.png").exists(), 20, what="first output")
    first = pixels(folders["outbox"] / "one.png")
    (folders["outbox"] / "one.png").unlink()  # the user collected it
    shutil.copy(original, folders["inbox"] / "two.jpg")
    wait_for(lambda: (folders["outbox"] / "two.png").exists(), 20, what="second output")
    assert pixels(folders["outbox"] / "two.png") == first  # the same result (each with its own label)
    assert emulator.stats()["submits_accepted"] == 1
    assert emulator.stats()["media_downloads"] == 2


def test_same_scan_with_other_parameters_is_new_work(tmp_path, folders, emulator, run_daemon):
    original = make_photo(tmp_path / "scan.jpg", 240, 180, seed=6, format="JPEG")
    first = run_daemon(config_from_mapping(config_mapping(folders, emulator), tmp_path))
    shutil.copy(original, folders["inbox"] / "one.jpg")
    wait_for(lambda: (folders["outbox"] / "one.png").exists(), 20, what="first output")
    first.stop()
    sharper = config_from_mapping(config_mapping(folders, emulator, restore={"codeformer_fidelity": 0.2}), tmp_path)
    run_daemon(sharper)
    shutil.copy(original, folders["inbox"] / "two.jpg")
    wait_for(lambda: (folders["outbox"] / "two.png").exists(), 20, what="second output")
    assert emulator.stats()["submits_accepted"] == 2
    assert [j["params"]["codeformer_fidelity"] for j in emulator.stats()["jobs"]] == [0.7, 0.2]


def test_a_file_changed_after_it_was_taken_is_new_content(tmp_path, folders, emulator, make_config, run_daemon):
    emulator.latency = 1.0
    config = make_config()
    run_daemon(config)
    make_photo(folders["inbox"] / "scan.jpg", 240, 180, seed=7, format="JPEG")
    wait_for(lambda: emulator.stats()["submits_accepted"] == 1, 10, what="first submit")
    replacement = make_photo(tmp_path / "rescan.jpg", 300, 200, seed=8, format="JPEG").read_bytes()
    (folders["inbox"] / "scan.jpg").write_bytes(replacement)  # the operator rescanned into the same name
    wait_for(lambda: len(visible_files(folders["outbox"])) == 2 and not visible_files(folders["inbox"]), 30,
             what="both contents restored")
    assert emulator.stats()["submits_accepted"] == 2
    assert len(set(emulator.submits_by_content())) == 2
    assert (folders["archive"] / "scan.jpg").read_bytes() == replacement
    from PIL import Image

    sizes = sorted(Image.open(p).size for p in visible_files(folders["outbox"]))
    assert sizes == [(480, 360), (600, 400)]


def test_status_counts_the_ambiguous_window_found_at_restart(tmp_path, folders, emulator, make_config,
                                                             run_daemon):
    config = make_config()
    make_photo(folders["inbox"] / "cut off.jpg", 200, 160, seed=1, format="JPEG")
    folders["state"].mkdir()
    journal = Journal(journal_path(config))
    job = journal.add_job("cut off.jpg", 1, 1, config.restore.as_request())
    job = journal.transition(job, JobState.PUBLISHING)
    journal.transition(job, JobState.SUBMITTING)  # as if killed while the POST was on the wire
    journal.close()

    run_daemon(config)
    record = folders["failed"] / "cut off.jpg.error.json"
    wait_for(record.exists, 10, what="failed record")
    assert "not resent automatically" in record.read_text()
    assert emulator.stats()["submits_received"] == 0
    reader = Journal(journal_path(config), read_only=True)
    assert reports.journal_summary(reader, 0)["ambiguous_at_restart"] == 1
    reader.close()
