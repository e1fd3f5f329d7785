"""The emulator's outcomes: a normal result that differs visibly from a plain resize, CodeFormer's known
bad results on demand (tinted, blank, unchanged), upright pixels, and a bare PNG, as the provider sends.

The last tests hand each outcome to the output guard, so the two halves agree on what each one is.
"""

from __future__ import annotations

import io
import struct
import tempfile
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageChops, ImageCms, ImageStat, PngImagePlugin

from daemon import emulator as emu_mod
from daemon.demo import make_photo
from daemon.emulator import GatewayEmulator, central_box, render_output
from daemon.output.guard import is_blank, is_unchanged, judge, scan_tone

from .test_emulator import emu, final_document, site, submit_ok  # noqa: F401 - fixtures


def photo(size=(160, 200), seed=3) -> Image.Image:
    with tempfile.TemporaryDirectory() as folder:
        with Image.open(make_photo(Path(folder) / "scan.png", *size, seed=seed)) as image:
            image.load()
            return image.copy()


def rendered(image: Image.Image, upscale: int = 2, outcome: str = "restored") -> Image.Image:
    return Image.open(io.BytesIO(render_output(image, upscale, outcome)))


def plain(image: Image.Image, upscale: int = 2) -> Image.Image:
    return image.resize((image.width * upscale, image.height * upscale), Image.LANCZOS)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunks(data: bytes) -> list[str]:
    """The chunk types of a PNG file, in order."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        chunks.append(kind.decode("ascii"))
        offset += 12 + length
    return chunks


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return max(ImageStat.Stat(ImageChops.difference(a, b)).mean)


# ---------------------------------------------------------------- rendering


def test_the_normal_result_differs_from_a_plain_resize_in_the_centre_only():
    scan = photo()
    result, resize = rendered(scan), plain(scan)
    assert result.size == resize.size and result.mode == "RGB"
    box = central_box(result.size)
    assert mean_difference(result.crop(box), resize.crop(box)) > 5  # visibly: a raised contrast
    outside = Image.new("L", result.size, 255)
    outside.paste(0, box)
    masked = [Image.composite(image, Image.new("RGB", image.size), outside) for image in (result, resize)]
    assert masked[0].tobytes() == masked[1].tobytes()  # the rest is the resize, pixel for pixel


def test_the_normal_result_is_the_same_for_the_same_scan():
    scan = photo()
    assert render_output(scan, 2) == render_output(scan.copy(), 2)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_unchanged_is_a_plain_resize(mode):
    scan = photo().convert(mode)
    result = rendered(scan, 3, "unchanged")
    assert result.mode == mode and result.tobytes() == plain(scan, 3).tobytes()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_blank_is_all_black_at_the_size_of_a_normal_result(mode):
    scan = photo().convert(mode)
    result = rendered(scan, 2, "blank")
    assert result.size == rendered(scan).size
    assert result.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_tinted_gives_a_gray_scan_colour_and_a_green_patch_on_the_face():
    scan = photo().convert("L")
    result = rendered(scan, 2, "tinted")
    assert result.mode == "RGB" and result.size == (scan.width * 2, scan.height * 2)
    red, green, blue = result.split()
    assert mean_difference(red, blue) > 15  # a cast over everything
    corner = (0, 0, result.width // 8, result.height // 8)
    assert ImageStat.Stat(red.crop(corner)).mean[0] > ImageStat.Stat(blue.crop(corner)).mean[0] + 15
    face = central_box(result.size, part=3)
    r, g, b = (ImageStat.Stat(band.crop(face)).mean[0] for band in (red, green, blue))
    assert g > r + 20 and g > b + 20  # the green patch
    luminance = result.convert("L")
    assert mean_difference(luminance, rendered(scan)) < 25  # still the same picture underneath


def test_tinted_keeps_transparency():
    scan = photo().convert("RGBA")
    scan.putalpha(128)
    result = rendered(scan, 2, "tinted")
    assert result.mode == "RGBA" and result.getchannel("A").getextrema() == (128, 128)


def test_an_unknown_outcome_is_refused():
    with pytest.raises(ValueError, match="outcome"):
        render_output(photo(), 2, "sepia")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
@pytest.mark.parametrize("outcome", ["restored", "unchanged", "tinted"])
def test_a_sideways_scan_comes_back_upright(fmt, outcome):
    """Orientation 6: stored rotated, to be turned 90 degrees clockwise to stand up, as a camera writes."""
    upright = Image.new("RGB", (60, 40), (20, 20, 20))
    upright.paste((250, 30, 30), (0, 0, 20, 13))  # a red mark at the top left
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    scan = emu_mod.decode_image(encoded(stored, fmt, exif=exif.tobytes()))
    if fmt != "TIFF":  # Pillow 13 turns a TIFF upright as it loads it; the result must not be turned again
        assert scan.size == (40, 60)
    result = rendered(scan, 2, outcome)
    assert result.size == (120, 80)
    red, _, blue = result.convert("RGB").split()
    assert red.getpixel((10, 8)) > 180 and blue.getpixel((10, 8)) < 120  # top left: the mark, once turned
    assert red.getpixel((110, 8)) < 120 and red.getpixel((10, 72)) < 120


def test_a_scan_already_upright_is_not_turned():
    upright = Image.new("RGB", (60, 40), (20, 20, 20))
    upright.paste((250, 30, 30), (0, 0, 20, 13))
    exif = Image.Exif()
    exif[0x0112] = 1
    result = rendered(emu_mod.decode_image(encoded(upright, "JPEG", exif=exif.tobytes())), 2, "unchanged")
    assert result.size == (120, 80) and result.getpixel((10, 8))[0] > 180


def test_the_result_is_a_bare_png_whatever_the_scan_carries():
    scan = photo()
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "ScanCo", "Flatbed 9000", 1  # Make, Model, Orientation
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    text = PngImagePlugin.PngInfo()
    text.add_text("Description", "Grandmother, 1952")
    text.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    sources = {
        "JPEG": encoded(scan, "JPEG", exif=exif.tobytes(), icc_profile=icc, dpi=(600, 600)),
        "PNG": encoded(scan, "PNG", exif=exif.tobytes(), icc_profile=icc, dpi=(600, 600), pnginfo=text),
        "TIFF": encoded(scan, "TIFF", exif=exif.tobytes(), icc_profile=icc, dpi=(600, 600)),
    }
    for fmt, data in sources.items():
        decoded = emu_mod.decode_image(data)
        assert decoded.info.get("icc_profile") == icc, fmt  # the scan did carry them
        for outcome in emu_mod.OUTCOMES:
            output = render_output(decoded, 2, outcome)
            assert set(png_chunks(output)) == {"IHDR", "IDAT", "IEND"}, (fmt, outcome, png_chunks(output))
            with Image.open(io.BytesIO(output)) as image:
                assert dict(image.getexif()) == {} and "dpi" not in image.info, (fmt, outcome)
        assert decoded.info.get("icc_profile") == icc, fmt  # and still does: the scan was not altered


def test_a_transparent_colour_becomes_alpha_not_a_trns_chunk():
    scan = photo().convert("RGB")
    data = encoded(scan, "PNG", transparency=(0, 0, 0))
    output = render_output(emu_mod.decode_image(data), 2)
    assert "tRNS" not in png_chunks(output) and Image.open(io.BytesIO(output)).mode == "RGBA"


def test_the_png_is_written_fast():
    """compress_level 1, so the emulator does not eat the CPU the benchmark measures the daemon on."""
    data = render_output(photo((320, 400)), 2)
    start = data.index(b"IDAT") + 4
    header = data[start:start + 2]  # the zlib stream's header: FLEVEL (0 = fastest) in the top two bits
    assert header[0] & 0x0F == 8 and header[1] >> 6 == 0, header.hex()


# ---------------------------------------------------------------- over HTTP, by injected faults


def download(gateway: GatewayEmulator, request_id: str) -> bytes:
    document = final_document(gateway, request_id)
    assert document["status"] == "COMPLETED", document
    media = requests.get(document["output"]["media_url"][0], timeout=5)
    assert media.status_code == 200
    return media.content


def job_outcome(gateway: GatewayEmulator, request_id: str) -> str:
    return next(j["outcome"] for j in gateway.stats()["jobs"] if j["request_id"] == request_id)


@pytest.mark.parametrize("kind, outcome", [("outcome_tinted", "tinted"), ("outcome_blank", "blank"),
                                           ("outcome_unchanged", "unchanged")])
def test_each_outcome_fault_renders_once_and_is_charged(emu, site, kind, outcome):
    assert kind in emu_mod.FAULT_KINDS
    scan = photo().convert("L")
    data = encoded(scan, "PNG")
    url = site.serve("/scan.png", data)
    emu.balance = 2
    emu.inject(kind)
    faulty = submit_ok(emu, url)
    assert download(emu, faulty) == render_output(scan, 2, outcome)
    assert job_outcome(emu, faulty) == outcome
    normal = submit_ok(emu, url)
    assert download(emu, normal) == render_output(scan, 2)  # the fault was used up
    assert job_outcome(emu, normal) == "restored"
    assert emu.stats()["balance"] == 0  # both paid for, as the provider charges a bad result


def test_outcome_faults_are_taken_one_per_job(emu, site):
    url = site.serve("/scan.png", encoded(photo(), "PNG"))
    emu.inject("outcome_unchanged")
    emu.inject("outcome_blank")
    first, second, third = (submit_ok(emu, url) for _ in range(3))
    assert emu.wait_idle(5)
    assert sorted(job_outcome(emu, r) for r in (first, second, third)) == ["blank", "restored", "unchanged"]


def test_blank_with_oversized_is_blank_at_the_oversized_size(emu, site):
    scan = photo((40, 50))
    url = site.serve("/scan.png", encoded(scan, "PNG"))
    emu.inject("outcome_oversized")
    emu.inject("outcome_blank")
    with Image.open(io.BytesIO(download(emu, submit_ok(emu, url)))) as result:
        factor = 2 * emu_mod.OVERSIZE_FACTOR
        assert result.size == (40 * factor, 50 * factor) and result.getextrema()[0] == (0, 0)


def test_faults_endpoint_accepts_the_outcome_kinds(emu):
    for kind in ("outcome_tinted", "outcome_blank", "outcome_unchanged"):
        response = requests.post(f"{emu.url}/_emulator/faults", json={"kind": kind, "count": 2}, timeout=5)
        assert response.status_code == 200
    assert {k: v for k, v in emu.stats()["faults"].items() if v} == {
        "outcome_tinted": 2, "outcome_blank": 2, "outcome_unchanged": 2}


# ---------------------------------------------------------------- what the guard makes of them


@pytest.mark.parametrize("scan_mode, outcome, blank, unchanged, tone", [
    ("RGB", "restored", False, False, "toned"),
    ("RGB", "unchanged", False, True, "toned"),
    ("RGB", "blank", True, False, "toned"),
    ("RGB", "tinted", False, False, "toned"),
    ("L", "restored", False, False, "gray"),
    ("L", "unchanged", False, True, "gray"),
    ("L", "blank", True, False, "gray"),
    ("L", "tinted", False, False, "gray"),
])
def test_the_guard_recognises_each_outcome(scan_mode, outcome, blank, unchanged, tone):
    scan = photo((320, 400)).convert(scan_mode)
    result = rendered(scan, 2, outcome)
    verdict = judge(scan, result, grayscale="auto")
    assert (verdict.blank, verdict.unchanged, verdict.tone) == (blank, unchanged, tone)
    assert is_blank(result) is blank and is_unchanged(scan, result) is unchanged
    if outcome == "tinted":
        assert scan_tone(verdict.image) == tone  # the invented colour is gone again


def test_a_colour_scan_through_the_normal_outcome_is_untouched_by_the_guard():
    scan = photo((320, 400))
    colour = Image.merge("RGB", (scan.getchannel("B"), scan.getchannel("R"), scan.getchannel("G")))
    colour.paste((30, 60, 200), (0, 0, 320, 80))  # a blue sky over a green-tinged portrait
    colour.paste((200, 30, 40), (0, 320, 320, 400))  # a red coat
    assert scan_tone(colour) == "color"
    result = rendered(colour)
    verdict = judge(colour, result, grayscale="auto")
    assert verdict.image is result and not verdict.unchanged and not verdict.blank
