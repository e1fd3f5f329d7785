"""What comes back is fit for an archive: run through the real daemon and the emulator, read back with Pillow.

Formats by default and by choice, the scan's metadata carried, the AI label written, black-and-white kept,
blank and unchanged results caught, and content credentials that c2pa.Reader verifies.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageCms

from daemon import reports
from daemon.demo import make_photo
from daemon.journal import Journal
from daemon.service import journal_path

from .conftest import API_KEY, config_mapping, visible_files, wait_for, write_config

LABEL = "compositeWithTrainedAlgorithmicMedia"


def delivered(folders, name: str, timeout: float = 20) -> Path:
    path = folders["outbox"] / name
    wait_for(lambda: path.exists() and not visible_files(folders["inbox"]), timeout, what=f"{name} delivered")
    return path


def auto(make_config, **output):
    return make_config(output={"format": "auto", "grayscale": "auto", **output})


def sepia_jpeg_with_metadata(path: Path, orientation: int = 1) -> bytes:
    """A 300x200 scan with the EXIF, ICC profile, resolution and XMP an archive's scanner writes."""
    image = make_photo(path.with_suffix(".tmp.jpg"), 300, 200, seed=5, format="JPEG")
    with Image.open(image) as im:
        photo = im.convert("RGB")
    exif = Image.Exif()
    exif.update({0x010F: "Epson", 0x0110: "Perfection V850", 0x010E: "Grandmother, 1952", 0x013B: "J. Smith",
                 0x8298: "(c) Example Archive", 0x0112: orientation})
    exif.get_ifd(0x8769)[0x9003] = "1952:06:01 10:00:00"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
           '<dc:description><rdf:Alt><rdf:li xml:lang="x-default">Grandmother on the porch</rdf:li></rdf:Alt>'
           '</dc:description><dc:subject><rdf:Bag><rdf:li>family</rdf:li><rdf:li>1950s</rdf:li></rdf:Bag>'
           '</dc:subject></rdf:Description></rdf:RDF></x:xmpmeta>').encode()
    photo.save(path, "JPEG", quality=92, exif=exif.tobytes(), icc_profile=icc, dpi=(600, 600), xmp=xmp)
    image.unlink()
    return icc


@pytest.mark.parametrize("scan_format, name, expected", [
    ("JPEG", "a.jpg", ("a.jpg", "JPEG")), ("PNG", "b.png", ("b.png", "PNG")), ("TIFF", "c.tif", ("c.tif", "TIFF")),
    ("BMP", "d.bmp", ("d.png", "PNG")),
])
def test_each_scan_comes_back_in_its_own_format_by_default(tmp_path, folders, emulator, make_config, run_daemon,
                                                          scan_format, name, expected):
    run_daemon(auto(make_config))
    make_photo(tmp_path / name, 160, 120, seed=1, format=scan_format)
    (tmp_path / name).rename(folders["inbox"] / name)
    output = delivered(folders, expected[0])
    with Image.open(output) as image:
        assert (image.format, image.size) == (expected[1], (320, 240))


@pytest.mark.parametrize("setting, extension, pil_format", [
    ("jpeg", ".jpg", "JPEG"), ("tiff", ".tif", "TIFF"), ("webp", ".webp", "WEBP"), ("png", ".png", "PNG"),
])
def test_a_configured_format_is_used_for_every_scan(tmp_path, folders, emulator, make_config, run_daemon,
                                                    setting, extension, pil_format):
    run_daemon(auto(make_config, format=setting))
    make_photo(folders["inbox"] / "scan.jpg", 160, 120, seed=2, format="JPEG")
    output = delivered(folders, "scan" + extension)
    with Image.open(output) as image:
        assert image.format == pil_format
    assert [p.name for p in visible_files(folders["outbox"])] == ["scan" + extension]


def test_a_jpeg_scans_metadata_comes_back_with_the_resolution_doubled_and_the_label(
        tmp_path, folders, emulator, make_config, run_daemon):
    icc = sepia_jpeg_with_metadata(tmp_path / "scan.jpg")
    run_daemon(auto(make_config))
    (tmp_path / "scan.jpg").rename(folders["inbox"] / "scan.jpg")
    output = delivered(folders, "scan.jpg")
    with Image.open(output) as image:
        exif = image.getexif()
        assert image.size == (600, 400) and image.info["dpi"] == pytest.approx((1200, 1200), abs=1)
        assert image.info["icc_profile"] == icc
        assert (exif[0x010F], exif[0x0110], exif[0x010E], exif[0x013B], exif[0x8298]) == (
            "Epson", "Perfection V850", "Grandmother, 1952", "J. Smith", "(c) Example Archive")
        assert exif.get_ifd(0x8769)[0x9003] == "1952:06:01 10:00:00"
        assert exif.get(0x0112, 1) == 1
        xmp = image.info["xmp"].decode() if isinstance(image.info["xmp"], bytes) else image.info["xmp"]
    assert "Grandmother on the porch" in xmp and "family" in xmp
    assert LABEL in xmp and "codeformer-daemon" in xmp and "History" in xmp
    assert API_KEY not in xmp and "127.0.0.1" not in xmp


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_rotated_scan_comes_back_upright_once(tmp_path, folders, emulator, make_config, run_daemon, orientation):
    sepia_jpeg_with_metadata(tmp_path / "scan.jpg", orientation=orientation)
    run_daemon(auto(make_config))
    (tmp_path / "scan.jpg").rename(folders["inbox"] / "scan.jpg")
    output = delivered(folders, "scan.jpg")
    with Image.open(output) as image:
        upright = (400, 600) if orientation == 6 else (600, 400)
        assert image.size == upright and image.getexif().get(0x0112, 1) == 1


def chroma(image: Image.Image) -> float:
    """The largest colour spread of any pixel, on a small copy (0: grey)."""
    small = image.convert("RGB").resize((64, 64)).tobytes()
    return max(max(small[i:i + 3]) - min(small[i:i + 3]) for i in range(0, len(small), 3))


def test_gray_and_sepia_scans_come_back_gray_and_sepia_through_a_tinted_result(
        tmp_path, folders, emulator, make_config, run_daemon):
    run_daemon(auto(make_config, format="png"))
    sepia = make_photo(tmp_path / "sepia.jpg", 200, 150, seed=3, format="JPEG")
    with Image.open(sepia) as image:
        image.convert("L").save(tmp_path / "gray.png")
        scan_chroma = chroma(image)
    emulator.inject("outcome_tinted", 2)
    for name in ("gray.png", "sepia.jpg"):
        (tmp_path / name).rename(folders["inbox"] / name)
    gray, toned = delivered(folders, "gray.png"), delivered(folders, "sepia.png")
    with Image.open(gray) as image:
        assert image.mode == "L" or chroma(image) <= 2, "a grey scan comes back grey"
    with Image.open(toned) as image:
        assert chroma(image) <= scan_chroma + 12, "a sepia scan keeps its own tone, not the model's colours"
    assert emulator.stats()["faults"]["outcome_tinted"] == 0


def test_a_colour_scan_is_untouched_by_the_guard(tmp_path, folders, emulator, make_config, run_daemon):
    run_daemon(auto(make_config, format="png"))
    scan = tmp_path / "colour.png"
    Image.radial_gradient("L").convert("RGB").resize((160, 120)).save(scan)
    with Image.open(scan) as image:
        r, g, b = image.split()
        Image.merge("RGB", (r, b.point(lambda v: 255 - v), g)).save(scan)
    scan.rename(folders["inbox"] / "colour.png")
    output = delivered(folders, "colour.png")
    from daemon.emulator import render_output  # what the provider sent back

    with Image.open(folders["archive"] / "colour.png") as original:
        expected = Image.open(io.BytesIO(render_output(original.copy(), 2)))
    with Image.open(output) as image:
        assert image.convert("RGB").tobytes() == expected.convert("RGB").tobytes()


def test_a_blank_result_goes_to_failed_with_the_reason_after_one_submit(
        tmp_path, folders, emulator, make_config, run_daemon):
    emulator.inject("outcome_blank")
    run_daemon(auto(make_config))
    make_photo(folders["inbox"] / "scan.jpg", 160, 120, seed=4, format="JPEG")
    record_path = folders["failed"] / "scan.jpg.error.json"
    wait_for(record_path.exists, 20, what="the blank result refused")
    record = json.loads(record_path.read_text())
    assert record["stage"] == "blank_result" and "the provider returned a blank image" in record["reason"]
    assert emulator.stats()["submits_received"] == 1 and visible_files(folders["outbox"]) == []


@pytest.mark.parametrize("setting", ["deliver", "fail"])
def test_an_unchanged_result_is_delivered_and_flagged_or_failed(tmp_path, folders, emulator, make_config,
                                                                run_daemon, captured_logs, setting):
    emulator.inject("outcome_unchanged")
    config = auto(make_config, unchanged=setting, sidecar=True)
    run_daemon(config)
    make_photo(folders["inbox"] / "scan.jpg", 160, 120, seed=6, format="JPEG")
    if setting == "fail":
        record_path = folders["failed"] / "scan.jpg.error.json"
        wait_for(record_path.exists, 20, what="the unchanged result refused")
        assert json.loads(record_path.read_text())["stage"] == "unchanged_result"
        return
    output = delivered(folders, "scan.jpg")
    sidecar = json.loads((folders["outbox"] / "scan.jpg.json").read_text())
    assert sidecar["unchanged"] is True
    with Image.open(output) as image:
        assert "<cfd:unchanged>True</cfd:unchanged>" in image.info["xmp"].decode() or \
            'cfd:unchanged="True"' in image.info["xmp"].decode()
    assert any(e["event"] == "job.unchanged" for e in captured_logs)
    journal = Journal(journal_path(config), read_only=True)
    wait_for(lambda: reports.journal_summary(journal, 0)["unchanged_delivered"] == 1, 5, what="the count in status")
    journal.close()


# --------------------------------------------------------------------------- content credentials

c2pa = pytest.importorskip("c2pa", reason="the [c2pa] extra is part of the test extras")


def test_outputs_are_signed_and_verify_with_the_scan_as_ingredient(tmp_path, folders, emulator, make_config,
                                                                   run_daemon):
    from .test_output_credentials import SETTINGS, make_ca, station_chain, write_pair

    keys = tmp_path / "keys"
    keys.mkdir()
    certificate, key = write_pair(keys, *station_chain(make_ca()))
    run_daemon(auto(make_config, c2pa={"certificate": str(certificate), "private_key": str(key)}))
    make_photo(folders["inbox"] / "grandmother.jpg", 160, 120, seed=7, format="JPEG")
    output = delivered(folders, "grandmother.jpg")
    with c2pa.Context.from_dict(dict(SETTINGS)) as context, open(output, "rb") as f, \
            c2pa.Reader("image/jpeg", f, context=context) as reader:
        store = json.loads(reader.json())
    manifest = store["manifests"][store["active_manifest"]]
    assert store["validation_state"] == "Valid"
    [ingredient] = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["title"].startswith("job-")


def test_a_self_signed_certificate_is_reported_by_check_and_refused_at_start(tmp_path, folders, emulator):
    from .test_output_credentials import make_ca, station_chain, write_pair

    keys = tmp_path / "keys"
    keys.mkdir()
    certificate, key = write_pair(keys, *station_chain(make_ca(), self_signed=True))
    mapping = config_mapping(folders, emulator, output={"c2pa": {"certificate": str(certificate),
                                                                 "private_key": str(key)}})
    config_path = write_config(tmp_path / "config.yaml", mapping)
    env = {"CODEFORMER_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"}
    check = subprocess.run([sys.executable, "-m", "daemon.cli", "check", "--config", str(config_path)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert check.returncode == 1 and "FAIL  content credentials" in check.stdout and "self-signed" in check.stdout
    run = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(config_path)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode != 0 and "self-signed" in run.stderr

