"""Settings by folder: profiles, the folders' codeformer.yaml files, and automatic upscale.

The decisions (which pattern fits, which factor, what a folder file may say) are tables; the rest
runs the real daemon against the emulator on loopback and reads what the emulator was sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from daemon import profiles
from daemon.cli import render_status
from daemon.config import ConfigError, OutputConfig, config_from_mapping, load_config
from daemon.journal import Journal
from daemon.profiles import (FolderSettings, Held, Settings, choose_upscale, glob_matches, output_config,
                             parse_folder_file, resolve_upscale)
from daemon.reports import status_report
from daemon.service import journal_path
from daemon.watcher import InboxWatcher

from .conftest import ManualClock, config_mapping, drop_scan, visible_files, wait_for, write_config

TOP = {"codeformer_fidelity": 0.7, "background_enhance": False, "face_upsample": True, "upscale": 2}
"""The restore section tests/conftest.py configures."""


# --------------------------------------------------------------------------- tables

GLOBS = [
    ("portraits/**", "portraits/a.jpg", True),
    ("portraits/**", "portraits/x/y.jpg", True),
    ("portraits/**", "portraits-old/a.jpg", False),
    ("portraits/**", "a.jpg", False),
    ("*.tif", "scan.tif", True),
    ("*.tif", "album/scan.tif", False),
    ("**/*.tif", "scan.tif", True),
    ("**/*.tif", "a/b/scan.tif", True),
    ("albums/*/cover.jpg", "albums/1960/cover.jpg", True),
    ("albums/*/cover.jpg", "albums/1960/x/cover.jpg", False),
    ("albums/**/cover.jpg", "albums/cover.jpg", True),
    ("albums/**/cover.jpg", "albums/1960/x/cover.jpg", True),
    ("Portraits/**", "portraits/A.JPG", True),          # case is ignored
    ("*.TIF", "scan.tif", True),
    ("/portraits/**", "portraits/a.jpg", True),         # a leading / is the inbox itself
    ("portraits/", "portraits/x/a.jpg", True),          # a trailing / is everything below
    ("scan?.jpg", "scan1.jpg", True),
    ("scan?.jpg", "scan12.jpg", False),
    ("[ab]*.jpg", "b-side.jpg", True),
    ("[!ab]*.jpg", "b-side.jpg", False),
    ("a*b", "ax/yb", False),                            # * never crosses a folder
    ("photo (1).jpg", "photo (1).jpg", True),           # regex characters are plain text
    ("**", "any/thing/at/all.jpg", True),
]


@pytest.mark.parametrize("pattern,rel_path,expected", GLOBS, ids=[f"{p} ~ {r}" for p, r, _ in GLOBS])
def test_glob_matching(pattern, rel_path, expected):
    assert glob_matches(pattern, rel_path) is expected


FACTORS = [
    # width, height, max_upscale, max_output_megapixels, factor
    (10_000, 5_000, 4, 60, 1),      # 50 Mpx: even 2x would be 200 Mpx
    (1_600, 1_250, 4, 60, 4),       # 2 Mpx: 4x is 32 Mpx
    (1_600, 1_250, 8, 60, 5),       # 5x is 50 Mpx, 6x would be 72
    (3_000, 2_000, 4, 60, 3),       # 6 Mpx: 3x is 54, 4x would be 96
    (100, 100, 1, 60, 1),           # max_upscale 1
    (40_000, 40_000, 4, 60, 1),     # never below 1
    (2_000, 2_000, 4, 64, 4),       # exactly at the limit counts as within it
]


@pytest.mark.parametrize("width,height,max_upscale,max_mpx,factor", FACTORS)
def test_choose_upscale(width, height, max_upscale, max_mpx, factor):
    assert choose_upscale(width, height, max_upscale, max_mpx) == factor


def test_resolve_upscale_replaces_the_rule_by_the_factor_and_leaves_fixed_factors_alone():
    auto = {**TOP, "upscale": "auto", "max_upscale": 4, "max_output_megapixels": 60.0}
    assert resolve_upscale(auto, 1_600, 1_250) == {**TOP, "upscale": 4}
    assert resolve_upscale(auto, 10_000, 5_000) == {**TOP, "upscale": 1}
    assert resolve_upscale(TOP, 10_000, 5_000) == TOP


FOLDER_FILES = [
    ("restore:\n  upscale: 9\n", "portraits/codeformer.yaml: restore.upscale: 9 is out of range, allowed 1 to 8"),
    ("restore:\n  upscale: big\n", "portraits/codeformer.yaml: restore.upscale: expected 1 to 8 or auto, got 'big'"),
    ("restore:\n  fidelity: 0.5\n", "portraits/codeformer.yaml: restore.fidelity: unknown key"),
    ("budget:\n  daily_limit: 3\n", "portraits/codeformer.yaml: budget: unknown key (allowed here: restore, output)"),
    ("output:\n  format: gif\n", "portraits/codeformer.yaml: output.format: unknown value 'gif'"),
    ("output:\n  c2pa: {certificate: /x}\n", "portraits/codeformer.yaml: output.c2pa: set only in the top-level"),
    ("restore: [1, 2]\n", "portraits/codeformer.yaml: restore: expected a mapping of keys, got list"),
    ("- restore\n", "portraits/codeformer.yaml: expected a mapping with restore: and output:, got list"),
    ("restore:\n  upscale: 2\n    face_upsample: true\n", "portraits/codeformer.yaml: not valid YAML ("),
]


@pytest.mark.parametrize("text,error", FOLDER_FILES, ids=[e.split(": ", 1)[1][:40] for _, e in FOLDER_FILES])
def test_an_invalid_folder_file_is_named_with_its_key(text, error):
    with pytest.raises(ConfigError) as raised:
        parse_folder_file(text, "portraits/codeformer.yaml")
    assert str(raised.value).startswith(error)


def test_a_valid_folder_file_keeps_only_the_keys_it_sets():
    parsed = parse_folder_file("restore:\n  upscale: AUTO\noutput:\n  format: jpeg\n", "a/codeformer.yaml")
    assert (parsed.restore, parsed.output) == ({"upscale": "AUTO"}, {"format": "jpeg"})
    assert parse_folder_file("", "codeformer.yaml").restore == {}  # an empty file changes nothing


PROFILE_ERRORS = [
    ([{"match": "a/**"}, {"match": "b/**", "restore": {"upscale": 9}}],
     "profiles[1].restore.upscale: 9 is out of range, allowed 1 to 8"),
    ([{"match": "a/**", "restore": {"max_upscale": 0}}], "profiles[0].restore.max_upscale: 0 is out of range"),
    ([{"match": "a/**", "restore": {"upscal": 2}}], "profiles[0].restore.upscal: unknown key"),
    ([{"match": "a/**", "output": {"jpeg_quality": 101}}], "profiles[0].output.jpeg_quality: 101 is out of range"),
    ([{"match": "a/**", "output": {"c2pa": {}}}], "profiles[0].output.c2pa: set only in the top-level"),
    ([{"restore": {"upscale": 1}}], "profiles[0].match: required key is missing"),
    ([{"match": "a/**", "fidelity": 0.5}], "profiles[0].fidelity: unknown key"),
    ([{"match": "a/**", "restore": 2}], "profiles[0].restore: expected a mapping of keys"),
    ({"match": "a/**"}, "profiles: expected a list of profiles"),
]


@pytest.mark.parametrize("value,error", PROFILE_ERRORS, ids=[e[:40] for _, e in PROFILE_ERRORS])
def test_profile_errors_name_the_profile_and_its_key(tmp_path, folders, emulator, value, error):
    with pytest.raises(ConfigError) as raised:
        config_from_mapping(config_mapping(folders, emulator, profiles=value), tmp_path)
    assert str(raised.value).startswith(error)


def test_top_level_upscale_accepts_auto_and_its_limits(tmp_path, folders, emulator):
    config = config_from_mapping(config_mapping(folders, emulator, restore={"upscale": "auto"}), tmp_path)
    assert config.restore.as_request() == {**TOP, "upscale": "auto", "max_upscale": 4, "max_output_megapixels": 60.0}
    for restore, error in (({"upscale": 9}, "restore.upscale: 9 is out of range, allowed 1 to 8"),
                           ({"upscale": "most"}, "restore.upscale: expected 1 to 8 or auto, got 'most'"),
                           ({"max_upscale": 9}, "restore.max_upscale: 9 is out of range, allowed 1 to 8"),
                           ({"max_output_megapixels": 0}, "restore.max_output_megapixels: 0.0 is out of range, "
                                                          "allowed 1 to 10000")):
        with pytest.raises(ConfigError) as raised:
            config_from_mapping(config_mapping(folders, emulator, restore=restore), tmp_path)
        assert str(raised.value) == error


def test_a_profile_error_stops_the_daemon_before_it_touches_a_file(tmp_path, folders, emulator):
    scan = drop_scan(folders, "b/scan.jpg")
    before = scan.read_bytes()
    mapping = config_mapping(folders, emulator, profiles=[{"match": "a/**"}, {"match": "b/**",
                                                                             "restore": {"upscale": 9}}])
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config",
                             str(write_config(tmp_path / "config.yaml", mapping))],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "CODEFORMER_API_KEY": "k"})
    assert result.returncode == 2
    assert "profiles[1].restore.upscale: 9 is out of range, allowed 1 to 8" in result.stderr
    assert scan.read_bytes() == before and not folders["state"].exists()


def test_output_config_takes_what_the_job_recorded_over_the_current_settings():
    current = OutputConfig(format="png", jpeg_quality=90)
    assert output_config(None, current) is current
    assert output_config({"format": "jpeg", "gone_key": 1}, current) == OutputConfig(format="jpeg", jpeg_quality=90)


# --------------------------------------------------------------------------- folder files, read through a cache


def write_settings(path: Path, text: str, age: float = 60.0) -> Path:
    """A folder file last written `age` seconds ago (a younger one may still be being written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_a_burst_reads_a_folder_file_once_and_an_edit_is_seen_at_once(folders, make_config, monkeypatch):
    reads: list[str] = []
    real = profiles.parse_folder_file
    monkeypatch.setattr(profiles, "parse_folder_file", lambda text, rel: reads.append(rel) or real(text, rel))
    config = make_config(profiles=[{"match": "album/**", "name": "album", "restore": {"codeformer_fidelity": 0.2}}])
    settings_file = write_settings(folders["inbox"] / "album" / "codeformer.yaml", "restore: {upscale: 3}\n")
    folder_settings = FolderSettings(folders["inbox"])
    burst = [f"album/scan{i:03d}.jpg" for i in range(500)]

    first = folder_settings.settings_for(config, burst)
    again = folder_settings.settings_for(config, burst[:10] + ["top.jpg"])
    assert reads == ["album/codeformer.yaml"]
    assert first["album/scan000.jpg"] == again["album/scan001.jpg"] == Settings(
        "album + album/codeformer.yaml", {**TOP, "codeformer_fidelity": 0.2, "upscale": 3},
        profiles.output_settings(config.output))
    assert again["top.jpg"].profile is None and again["top.jpg"].params == TOP

    write_settings(settings_file, "restore: {upscale: 1}\n", age=30.0)
    assert folder_settings.settings_for(config, ["album/new.jpg"])["album/new.jpg"].params["upscale"] == 1
    assert reads == ["album/codeformer.yaml"] * 2

    write_settings(settings_file, "restore: {upscale: 4}\n", age=0.0)  # just written: may be half written
    held = folder_settings.settings_for(config, ["album/new.jpg"])
    assert held == {"album/new.jpg": Held("album/codeformer.yaml", None)}
    assert folder_settings.problems == {}


def test_held_back_files_come_back_every_two_seconds_and_at_once_when_a_settings_file_changes(tmp_path):
    inbox = tmp_path / "inbox"
    settings_file = write_settings(inbox / "album" / "codeformer.yaml", "restore: {upscale: 9}\n")
    clock, woken = ManualClock(), threading.Event()
    watcher = InboxWatcher(inbox, settle_seconds=0.25, rescan_seconds=1000, wake=woken.set, clock=clock,
                           mode="events")

    def taken(at: float) -> list:
        clock.now = at
        return watcher.take_settled()

    def change(action) -> None:
        woken.clear()
        action()
        assert woken.wait(5), "no event"
        time.sleep(0.2)  # the rest of the burst of events

    watcher.start()
    try:
        assert taken(0.0) == []  # the start-up scan: the settings file is never a candidate
        change(lambda: (inbox / "album" / "a.jpg").write_bytes(b"a scan"))
        assert taken(0.5) == []
        first = taken(1.0)
        assert [s.rel_path for s in first] == ["album/a.jpg"]
        watcher.hold_back(first)
        assert taken(2.5) == []
        again = taken(3.0)  # two seconds on, without a stat of it
        assert [s.rel_path for s in again] == ["album/a.jpg"]
        watcher.hold_back(again)
        change(lambda: settings_file.write_text("restore: {upscale: 1}\n"))
        fixed = taken(3.5)  # at once: it may be fixed
        assert [s.rel_path for s in fixed] == ["album/a.jpg"]
        watcher.hold_back(fixed)
        change(lambda: (inbox / "album" / "a.jpg").unlink())
        assert taken(6.0) == [] and taken(9.0) == []  # gone: never offered again
    finally:
        watcher.stop()


# --------------------------------------------------------------------------- the daemon


def sent_params(emulator, journal_file: Path) -> dict[str, dict]:
    """rel_path -> the params the emulator received for it."""
    by_request = {j["request_id"]: j["params"] for j in emulator.stats()["jobs"]}
    journal = Journal(journal_file, read_only=True)
    try:
        return {job.rel_path: by_request[job.request_id]
                for job in journal.read_jobs("SELECT * FROM jobs WHERE request_id IS NOT NULL")}
    finally:
        journal.close()


def jobs_by_path(journal_file: Path) -> dict:
    journal = Journal(journal_file, read_only=True)
    try:
        return {job.rel_path: job for job in journal.read_jobs("SELECT * FROM jobs ORDER BY id")}
    finally:
        journal.close()


def status_json(config_path: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--config", str(config_path), "--json"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_two_folders_with_different_profiles_get_different_parameters(folders, emulator, make_config, run_daemon,
                                                                      captured_logs):
    config = make_config(profiles=[
        {"match": "portraits/**", "name": "portraits", "restore": {"codeformer_fidelity": 0.9, "upscale": 1}},
        {"match": "large-format/**", "restore": {"upscale": 1, "background_enhance": True},
         "output": {"format": "jpeg"}},
        {"match": "portraits/**", "name": "never used", "restore": {"upscale": 4}},  # the first match wins
    ])
    run_daemon(config)
    drop_scan(folders, "portraits/anna.jpg", seed=1)
    drop_scan(folders, "large-format/map.jpg", seed=2)
    drop_scan(folders, "snapshot.jpg", seed=3)
    outputs = [folders["outbox"] / name for name in ("portraits/anna.png", "large-format/map.jpg", "snapshot.png")]
    wait_for(lambda: all(p.exists() for p in outputs) and len(visible_files(folders["archive"])) == 3, 30,
             what="three outputs")

    assert sent_params(emulator, journal_path(config)) == {
        "portraits/anna.jpg": {**TOP, "codeformer_fidelity": 0.9, "upscale": 1},
        "large-format/map.jpg": {**TOP, "upscale": 1, "background_enhance": True},
        "snapshot.jpg": TOP,
    }
    jobs = jobs_by_path(journal_path(config))
    assert {rel: job.profile for rel, job in jobs.items()} == {
        "portraits/anna.jpg": "portraits", "large-format/map.jpg": "large-format/**", "snapshot.jpg": None}
    assert jobs["large-format/map.jpg"].output_settings["format"] == "jpeg"
    assert jobs["snapshot.jpg"].output_settings["format"] == "png"
    detected = {e["rel_path"]: e["profile"] for e in captured_logs if e["event"] == "file.detected"}
    assert detected == {"portraits/anna.jpg": "portraits", "large-format/map.jpg": "large-format/**",
                        "snapshot.jpg": None}


def test_folder_files_override_the_profile_deeper_ones_first(folders, emulator, make_config, run_daemon):
    inbox = folders["inbox"]
    write_settings(inbox / "portraits" / "codeformer.yaml", "restore:\n  upscale: 1\n  codeformer_fidelity: 0.5\n")
    write_settings(inbox / "portraits" / "bw" / "codeformer.yaml",
                   "restore:\n  codeformer_fidelity: 0.3\noutput:\n  format: jpeg\n")
    config = make_config(profiles=[{"match": "portraits/**", "name": "portraits",
                                    "restore": {"codeformer_fidelity": 0.9, "upscale": 3}}])
    run_daemon(config)
    drop_scan(folders, "portraits/anna.jpg", seed=1)
    drop_scan(folders, "portraits/bw/ben.jpg", seed=2)
    outputs = [folders["outbox"] / "portraits" / "anna.png", folders["outbox"] / "portraits" / "bw" / "ben.jpg"]
    wait_for(lambda: all(p.exists() for p in outputs), 30, what="both outputs")

    assert sent_params(emulator, journal_path(config)) == {
        "portraits/anna.jpg": {**TOP, "codeformer_fidelity": 0.5, "upscale": 1},  # over the profile's 0.9 and 3
        "portraits/bw/ben.jpg": {**TOP, "codeformer_fidelity": 0.3, "upscale": 1},  # the deeper file's 0.3
    }
    jobs = jobs_by_path(journal_path(config))
    assert jobs["portraits/anna.jpg"].profile == "portraits + portraits/codeformer.yaml"
    assert jobs["portraits/bw/ben.jpg"].profile == ("portraits + portraits/codeformer.yaml + "
                                                   "portraits/bw/codeformer.yaml")
    with Image.open(outputs[1]) as delivered:  # the folder file's output: section, not the top level's png
        assert delivered.format == "JPEG"


def test_an_invalid_folder_file_holds_its_files_until_it_is_fixed(tmp_path, folders, emulator, run_daemon,
                                                                  captured_logs):
    config_path = write_config(tmp_path / "config.yaml", config_mapping(folders, emulator))
    config = load_config(config_path)
    daemon = run_daemon(config)
    settings_file = write_settings(folders["inbox"] / "portraits" / "codeformer.yaml", "restore:\n  upscale: 9\n")
    held = [drop_scan(folders, "portraits/anna.jpg", seed=1), drop_scan(folders, "portraits/deep/ben.jpg", seed=2)]
    drop_scan(folders, "other.jpg", seed=3)
    wait_for(lambda: (folders["outbox"] / "other.png").exists(), 20, what="the file outside its scope")
    reason = "portraits/codeformer.yaml: restore.upscale: 9 is out of range, allowed 1 to 8"
    wait_for(lambda: any(e["event"] == "settings.invalid" for e in captured_logs), 10, what="settings.invalid")
    daemon.wait_for_passes(5)  # the held files are offered again every two seconds meanwhile

    invalid = [e for e in captured_logs if e["event"] == "settings.invalid"]
    assert [(e["file"], e["reason"], e["level"]) for e in invalid] == [("portraits/codeformer.yaml", reason, "error")]
    assert all(path.exists() for path in held) and visible_files(folders["failed"]) == []
    assert set(jobs_by_path(journal_path(config))) == {"other.jpg"}  # held files are not journalled
    status = status_json(config_path)
    assert status["settings_invalid"] == {"portraits/codeformer.yaml": reason}
    human = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--config", str(config_path)],
                           capture_output=True, text=True, timeout=30).stdout
    assert f"folder settings invalid: {reason}" in human

    write_settings(settings_file, "restore:\n  upscale: 1\n", age=0.0)  # fixed, in place, as an editor does
    outputs = [folders["outbox"] / "portraits" / "anna.png", folders["outbox"] / "portraits" / "deep" / "ben.png"]
    wait_for(lambda: all(p.exists() for p in outputs), 20, what="the held files, once fixed")
    sent = sent_params(emulator, journal_path(config))
    assert sent["portraits/anna.jpg"]["upscale"] == sent["portraits/deep/ben.jpg"]["upscale"] == 1
    assert any(e["event"] == "settings.valid" and e["file"] == "portraits/codeformer.yaml" for e in captured_logs)
    wait_for(lambda: status_json(config_path)["settings_invalid"] == {}, 10, what="status cleared")
    assert visible_files(folders["failed"]) == [] and settings_file.exists()


@pytest.mark.parametrize("mode", ["events", "polling"])
def test_the_folder_file_is_never_taken_archived_or_moved(folders, emulator, make_config, run_daemon, mode):
    inbox = folders["inbox"]
    top = write_settings(inbox / "codeformer.yaml", "restore:\n  codeformer_fidelity: 0.6\n")
    album = write_settings(inbox / "album" / "codeformer.yaml", "output:\n  format: png\n")
    config = make_config(watch={"settle_seconds": 0.3, "rescan_seconds": 1, "mode": mode})
    daemon = run_daemon(config)
    drop_scan(folders, "album/good.jpg", seed=1)
    (inbox / "album" / "broken.jpg").write_bytes(b"not an image at all")
    wait_for(lambda: len(visible_files(folders["archive"])) == 1 and len(visible_files(folders["failed"])) == 2, 30,
             what="one archived, one failed (with its .error.json)")
    album.write_text("output:\n  format: png\n  label: true\n", encoding="utf-8")  # an edit is an event, not a scan
    daemon.wait_for_passes(2.5)  # rescans every second meanwhile

    assert top.read_text() == "restore:\n  codeformer_fidelity: 0.6\n" and album.exists()
    for name in ("archive", "failed", "outbox"):
        assert not [p for p in folders[name].rglob("codeformer.yaml*")], name
    assert sorted(jobs_by_path(journal_path(config))) == ["album/broken.jpg", "album/good.jpg"]
    record = json.loads((folders["failed"] / "album" / "broken.jpg.error.json").read_text())
    assert record["profile"] == "codeformer.yaml + album/codeformer.yaml"  # error records show the settings
    assert record["params"] == {**TOP, "codeformer_fidelity": 0.6}
    shown = render_status(status_report(daemon.service.journal, time.time()))
    assert "album/broken.jpg: not an image" in shown
    assert "[codeformer.yaml + album/codeformer.yaml: upscale 2, fidelity 0.6]" in shown


def big_jpeg(folders, name: str, size: tuple[int, int]) -> Path:
    """A solid-colour JPEG, cheap to make and to check at any size, renamed into the inbox."""
    staged = folders["inbox"].parent / f".{name}"
    Image.new("RGB", size, (150, 120, 100)).save(staged, "JPEG", quality=60)
    target = folders["inbox"] / name
    staged.rename(target)
    return target


def test_auto_upscale_sends_1_for_a_50_mpx_scan_and_4_for_a_2_mpx_one(tmp_path, folders, emulator, run_daemon,
                                                                      captured_logs):
    emulator.fetch_delay = 300  # the provider accepts both and never gets to rendering 50 Mpx
    config_path = write_config(tmp_path / "config.yaml", config_mapping(
        folders, emulator, restore={"upscale": "auto", "max_output_megapixels": 60}))
    config = load_config(config_path)
    assert config.preflight.max_pixels >= 10_000 * 5_000 and config.restore.max_upscale == 4
    run_daemon(config)
    big_jpeg(folders, "large print.jpg", (10_000, 5_000))
    big_jpeg(folders, "snapshot.jpg", (1_600, 1_250))
    # The emulator counts a submit before it answers; the request id is in the journal once the answer is.
    sent = wait_for(lambda: (found := sent_params(emulator, journal_path(config))) and len(found) == 2 and found,
                    60, what="both submits recorded")
    assert sent == {"large print.jpg": {**TOP, "upscale": 1}, "snapshot.jpg": {**TOP, "upscale": 4}}
    jobs = jobs_by_path(journal_path(config))
    assert {rel: job.params for rel, job in jobs.items()} == sent  # recorded, and only the provider's keys sent
    chosen = {e["rel_path"]: (e["upscale"], e["width"], e["height"]) for e in captured_logs
              if e["event"] == "job.upscale_chosen"}
    assert chosen == {"large print.jpg": (1, 10_000, 5_000), "snapshot.jpg": (4, 1_600, 1_250)}
    shown = {row["file"]: row["params"]["upscale"] for row in status_json(config_path)["in_flight"]}
    assert shown == {"large print.jpg": 1, "snapshot.jpg": 4}
    human = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--config", str(config_path)],
                           capture_output=True, text=True, timeout=30).stdout
    assert "snapshot.jpg: submitted QUEUED" in human and "[upscale 4, fidelity 0.7]" in human


def test_auto_upscale_is_delivered_and_twins_compare_the_chosen_factor(folders, emulator, make_config, run_daemon):
    write_settings(folders["inbox"] / "fixed" / "codeformer.yaml", "restore:\n  upscale: 2\n")
    config = make_config(restore={"upscale": "auto", "max_output_megapixels": 1})
    run_daemon(config)
    first = drop_scan(folders, "a.jpg", seed=5, size=(400, 300))  # 0.12 Mpx: 2x is 0.48, 3x would be 1.08
    content = first.read_bytes()
    wait_for(lambda: (folders["outbox"] / "a.png").exists() and (folders["archive"] / "a.jpg").exists(), 20,
             what="the first output")
    with Image.open(folders["outbox"] / "a.png") as output:
        assert output.size == (800, 600)
    (folders["inbox"].parent / ".again").write_bytes(content)  # the same scan where upscale is a fixed 2
    os.rename(folders["inbox"].parent / ".again", folders["inbox"] / "fixed" / "again.jpg")
    wait_for(lambda: (folders["outbox"] / "fixed" / "again.png").exists(), 20, what="the second output")
    assert emulator.stats()["submits_accepted"] == 1  # the same content and the same factor: paid once
    jobs = jobs_by_path(journal_path(config))
    assert jobs["fixed/again.jpg"].duplicate_of == jobs["a.jpg"].id
    assert jobs["a.jpg"].params == jobs["fixed/again.jpg"].params == {**TOP, "upscale": 2}


def test_the_dashboard_shows_an_invalid_folder_file_escaped(folders, emulator, make_config, run_daemon):
    daemon = run_daemon(make_config(dashboard={"listen": "127.0.0.1:0"}))
    write_settings(folders["inbox"] / "<b>album</b>" / "codeformer.yaml", "restore:\n  upscale: 9\n")
    drop_scan(folders, "<b>album</b>/a.jpg")
    wait_for(lambda: daemon.service.journal.get_meta(profiles.SETTINGS_META), 10, what="the problem recorded")
    page = requests.get(daemon.service.dashboard.url + "/live", timeout=10)
    assert page.status_code == 200
    assert ("Folder settings invalid: &lt;b&gt;album&lt;/b&gt;/codeformer.yaml: restore.upscale: 9 is out of range, "
            "allowed 1 to 8") in " ".join(page.text.split())
    assert "<b>album" not in page.text
