"""The output guard's decisions, by table, on synthetic scans and results made with Pillow.

Scans: the demo's sepia portrait, the same in neutral grey (L and R=G=B RGB), cyanotype and
yellowed-paper versions, a colour portrait and a muted colour one. Results: plain resizes, resizes
with a region changed, results tinted the way CodeFormer tints black-and-white photos (a warm cast
and a green patch on the face), and blank ones.
"""

from __future__ import annotations

import functools
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter, ImageOps, ImageStat

from daemon.demo import make_photo
from daemon.output.guard import (UNCHANGED_TOLERANCE, ChromaProfile, GuardVerdict, chroma_profile, is_blank,
                                 is_unchanged, judge, restore_tone, scan_tone, tone_of)

SIZE = (320, 400)


# ---------------------------------------------------------------- scans


@functools.cache
def _sepia() -> Image.Image:
    with tempfile.TemporaryDirectory() as folder:
        with Image.open(make_photo(Path(folder) / "sepia.png", *SIZE, seed=7)) as image:
            image.load()
            return image.copy()


def sepia_scan() -> Image.Image:
    """The demo's old photo: a sepia portrait with grain."""
    return _sepia().copy()


def gray_scan() -> Image.Image:
    return sepia_scan().convert("L")


def gray_rgb_scan() -> Image.Image:
    return gray_scan().convert("RGB")


def gray_jpeg_scan() -> Image.Image:
    """A grey scan a scanner saved as an RGB JPEG: chroma noise, nothing more."""
    buffer = io.BytesIO()
    noise = Image.effect_noise((SIZE[0] + 20, SIZE[1]), 6).convert("L")  # shifted per band: not grey
    noisy = Image.merge("RGB", [ImageChops.add(band, noise.crop((i * 7, 0, i * 7 + SIZE[0], SIZE[1])), 1, -128)
                                for i, band in enumerate(gray_rgb_scan().split())])
    noisy.save(buffer, "JPEG", quality=80)
    return Image.open(buffer)


def cyanotype_scan() -> Image.Image:
    return ImageOps.colorize(gray_scan(), (20, 40, 90), (230, 240, 250))


def yellowed_scan() -> Image.Image:
    return ImageOps.colorize(gray_scan(), (30, 28, 20), (250, 240, 200))


def colour_scan() -> Image.Image:
    """A colour portrait: blue sky, green grass, a red coat, skin, grain."""
    width, height = SIZE
    image = Image.new("RGB", SIZE, (90, 140, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, height * 2 // 3, width, height], fill=(60, 150, 60))
    draw.ellipse([40, height // 2, width - 40, height + 60], fill=(190, 30, 40))
    draw.ellipse([100, 90, 220, 250], fill=(225, 180, 150))
    draw.ellipse([130, 150, 145, 160], fill=(60, 110, 170))
    draw.ellipse([175, 150, 190, 160], fill=(60, 110, 170))
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    return Image.blend(image, Image.effect_noise(SIZE, 40).convert("RGB"), 0.1)


def muted_colour_scan() -> Image.Image:
    """A faded colour photo: low chroma, but many hues (not one tone)."""
    return Image.blend(colour_scan(), colour_scan().convert("L").convert("RGB"), 0.75)


def skin_only_colour_scan() -> Image.Image:
    """Strong colour of one hue: chroma well above a sepia's."""
    return ImageOps.colorize(gray_scan(), (60, 20, 0), (255, 200, 140))


# ---------------------------------------------------------------- results


def resized(scan: Image.Image, factor: float = 2, resample: int = Image.LANCZOS) -> Image.Image:
    return scan.resize((round(scan.width * factor), round(scan.height * factor)), resample)


def centre(size: tuple[int, int], part: int) -> tuple[int, int, int, int]:
    width, height = size
    return width // part, height // part, width - width // part, height - height // part


def touched(image: Image.Image, change: Callable[[Image.Image], Image.Image], part: int = 3) -> Image.Image:
    """`change` applied to the central region only (1/9 of the area for part=3), as a face restoration would."""
    image = image.copy()
    box = centre(image.size, part)
    image.paste(change(image.crop(box)), box)
    return image


def sharper(region: Image.Image) -> Image.Image:
    return ImageEnhance.Contrast(region.filter(ImageFilter.UnsharpMask(4, 200, 0))).enhance(1.3)


def tinted(scan: Image.Image) -> Image.Image:
    """What CodeFormer does to a black-and-white photo: a warm cast everywhere, a green patch on the face."""
    cast = Image.merge("RGB", [band.point(lambda v, f=f, o=o: min(255, round(v * f + o)))
                               for band, (f, o) in zip(resized(scan).convert("RGB").split(),
                                                       ((0.9, 30), (0.95, 8), (0.75, 0)))])
    return touched(cast, lambda face: Image.blend(face, Image.new("RGB", face.size, (40, 200, 60)), 0.4))


def sixteen_bit(image: Image.Image) -> Image.Image:
    return image.convert("I").point(lambda v: v * 256).convert("I;16")


def darker(image: Image.Image) -> Image.Image:
    return image.point(lambda v: v // 8)


def with_alpha(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    return image


# ---------------------------------------------------------------- measures


def chroma_at(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[float, float]:
    """Mean (Cb, Cr) offsets from grey within `box`."""
    _, cb, cr = image.convert("RGB").crop(box).convert("YCbCr").split()
    return ImageStat.Stat(cb).mean[0] - 128, ImageStat.Stat(cr).mean[0] - 128


def bands_equal(image: Image.Image) -> bool:
    red, green, blue = image.convert("RGB").split()
    return (ImageChops.difference(red, green).getextrema() == (0, 0)
            and ImageChops.difference(green, blue).getextrema() == (0, 0))


def luma_difference(a: Image.Image, b: Image.Image) -> float:
    return max(ImageStat.Stat(ImageChops.difference(a.convert("L"), b.convert("L"))).mean)


# ---------------------------------------------------------------- tone


@pytest.mark.parametrize("scan, tone", [
    (gray_scan, "gray"),
    (lambda: gray_scan().convert("LA"), "gray"),
    (lambda: sixteen_bit(gray_scan()), "gray"),
    (gray_rgb_scan, "gray"),
    (gray_jpeg_scan, "gray"),
    (lambda: gray_rgb_scan().convert("P", palette=Image.Palette.ADAPTIVE), "gray"),  # a palette of greys
    (sepia_scan, "toned"),
    (lambda: with_alpha(sepia_scan()), "toned"),
    (cyanotype_scan, "toned"),
    (yellowed_scan, "toned"),
    (colour_scan, "color"),
    (muted_colour_scan, "color"),
    (skin_only_colour_scan, "color"),
    (lambda: colour_scan().convert("CMYK"), "color"),
])
def test_scan_tone(scan, tone):
    assert scan_tone(scan()) == tone, chroma_profile(scan().convert("RGB"))


@pytest.mark.parametrize("p95, p99, coherence, tone", [
    (0.0, 0.0, 1.0, "gray"),
    (3.0, 4.0, 0.1, "gray"),          # scanner noise of any hue
    (3.0, 4.5, 0.1, "toned"),         # a little more than noise: faint, any hue
    (8.0, 12.0, 0.2, "toned"),
    (8.5, 12.0, 0.2, "color"),        # past faint, many hues: a muted colour photo
    (26.0, 27.0, 0.99, "toned"),      # strong sepia
    (32.0, 40.0, 0.9, "toned"),
    (32.5, 40.0, 0.99, "color"),      # one hue, but as strong as a colour photo's
    (20.0, 25.0, 0.89, "color"),
    (60.0, 75.0, 0.87, "color"),
])
def test_tone_decision(p95, p99, coherence, tone):
    assert tone_of(ChromaProfile(p95, p99, coherence)) == tone


def test_tone_is_judged_on_a_small_copy():
    big = resized(sepia_scan(), 10)  # 3200 x 4000: the profile is that of the small scan
    assert abs(chroma_profile(big).p95 - chroma_profile(sepia_scan()).p95) < 2
    assert scan_tone(big) == "toned"


def test_a_gray_scan_comes_back_gray_from_a_tinted_result():
    scan, result = gray_scan(), tinted(gray_scan())
    assert not bands_equal(result)
    for each_scan, mode in ((scan, "L"), (gray_rgb_scan(), "RGB")):
        restored = restore_tone(each_scan, result, "gray")
        assert restored.mode == mode and restored.size == result.size
        assert bands_equal(restored)
        assert luma_difference(restored, result) < 0.5  # the model's detail is kept, only colour goes


def test_a_toned_scan_keeps_its_own_tone_not_the_models():
    scan, result = sepia_scan(), tinted(sepia_scan())
    patch = centre(result.size, 3)
    scan_patch = centre(scan.size, 3)
    assert chroma_at(result, patch)[0] - chroma_at(scan, scan_patch)[0] < -10 or \
        abs(chroma_at(result, patch)[1] - chroma_at(scan, scan_patch)[1]) > 10  # the green patch is there

    restored = restore_tone(scan, result, "toned")
    assert restored.mode == "RGB" and restored.size == result.size
    for got, want in zip(chroma_at(restored, patch), chroma_at(scan, scan_patch)):
        assert abs(got - want) < 2, (chroma_at(restored, patch), chroma_at(scan, scan_patch))
    profile, original = chroma_profile(restored), chroma_profile(scan)
    assert abs(profile.p95 - original.p95) < 3 and profile.coherence > 0.95
    assert luma_difference(restored, result) < 1.5  # the result's luminance, the scan's colour
    assert scan_tone(restored) == "toned"


def test_a_colour_scan_is_never_touched():
    result = tinted(colour_scan())
    assert restore_tone(colour_scan(), result, "color") is result
    verdict = judge(colour_scan(), result, grayscale="auto")
    assert verdict.tone == "color" and verdict.image is result


def test_alpha_is_kept_when_the_tone_is_restored():
    result = with_alpha(tinted(gray_scan()))
    for scan, mode in ((gray_scan(), "LA"), (sepia_scan(), "RGBA")):
        restored = restore_tone(scan, result, scan_tone(scan))
        assert restored.mode == mode
        assert restored.getchannel("A").tobytes() == result.getchannel("A").tobytes()


# ---------------------------------------------------------------- blank


@pytest.mark.parametrize("result, blank", [
    (lambda: Image.new("RGB", (640, 800)), True),
    (lambda: Image.new("RGB", (640, 800), (255, 255, 255)), True),
    (lambda: Image.new("RGB", (640, 800), (30, 120, 200)), True),
    (lambda: Image.new("L", (640, 800)), True),
    (lambda: Image.new("I;16", (64, 80)), True),
    (lambda: Image.new("RGBA", (64, 80), (0, 0, 0, 255)), True),
    (lambda: ImageChops.add(Image.new("RGB", (640, 800), (10, 10, 10)),
                            Image.effect_noise((640, 800), 2).convert("RGB"), 1, -128), True),  # flat, faint noise
    (lambda: resized(sepia_scan()), False),
    (lambda: darker(resized(sepia_scan())), False),     # a dark but real photo: 0-31 of 255
    (lambda: darker(resized(gray_scan())), False),
    (lambda: touched(Image.new("RGB", (640, 800)), lambda r: resized(sepia_scan()).resize(r.size), 5), False),
    (lambda: Image.linear_gradient("L").resize((640, 800)), False),
    (lambda: Image.merge("RGB", (Image.new("L", (64, 80)), Image.linear_gradient("L").resize((64, 80)),
                                 Image.new("L", (64, 80)))), False),  # one band alone shows something
    (lambda: sixteen_bit(resized(gray_scan())), False),  # 16-bit: scaled to 8 bits, not clipped to white
])
def test_is_blank(result, blank):
    assert is_blank(result()) is blank


def test_a_dark_photo_is_dark_indeed():
    """The dark case above is darker than most scans anyone would send."""
    assert darker(resized(sepia_scan())).getextrema()[0][1] <= 31


# ---------------------------------------------------------------- unchanged


def grain_scan() -> Image.Image:
    """Film grain at pixel level: a plain resize up and back down cannot give it back exactly."""
    return Image.blend(gray_rgb_scan(), Image.effect_noise(SIZE, 60).convert("RGB"), 0.4)


def small_face_changed(image: Image.Image) -> Image.Image:
    """One small face (1/100 of the picture) restored: sharper and lighter, nothing else."""
    image = image.copy()
    width, height = image.size
    box = (width // 2, height // 3, width // 2 + width // 10, height // 3 + height // 10)
    image.paste(image.crop(box).filter(ImageFilter.UnsharpMask(3, 250, 0)).point(lambda v: min(255, v + 20)), box)
    return image


@pytest.mark.parametrize("scan, result, unchanged", [
    (sepia_scan, lambda s: resized(s), True),
    (sepia_scan, lambda s: resized(s, 4), True),
    (sepia_scan, lambda s: resized(s, 2.5), True),
    (sepia_scan, lambda s: resized(s, 2, Image.BICUBIC), True),     # another resampler than ours
    (gray_scan, lambda s: resized(s), True),
    (colour_scan, lambda s: resized(s).convert("RGBA"), True),
    (grain_scan, lambda s: resized(s), True),
    (lambda: resized(sepia_scan(), 4), lambda s: resized(s, 2), True),  # a large scan: compared at a capped size
    (sepia_scan, lambda s: touched(resized(s), sharper), False),
    (sepia_scan, lambda s: touched(resized(s), lambda r: ImageEnhance.Contrast(r).enhance(1.3), 4), False),
    (colour_scan, lambda s: touched(resized(s), sharper), False),
    (grain_scan, lambda s: touched(resized(s), sharper), False),
    (sepia_scan, lambda s: small_face_changed(resized(s)), False),
    (sepia_scan, lambda s: resized(s).point(lambda v: min(255, v + 8)), False),
    (sepia_scan, lambda s: tinted(s), False),
    (sepia_scan, lambda s: resized(s.transpose(Image.ROTATE_180)), False),
])
def test_is_unchanged(scan, result, unchanged):
    scan = scan()
    assert is_unchanged(scan, result(scan)) is unchanged


def test_unchanged_is_decided_by_region_not_on_average():
    """The small-face change averages out below the tolerance over the picture, yet is seen."""
    scan = sepia_scan()
    result = small_face_changed(resized(scan))
    whole = ImageStat.Stat(ImageChops.difference(scan.convert("L"), result.convert("L").resize(scan.size))).mean[0]
    assert whole < UNCHANGED_TOLERANCE
    assert not is_unchanged(scan, result)


# ---------------------------------------------------------------- judge


@pytest.mark.parametrize("scan, result, grayscale, expected", [
    (sepia_scan, lambda s: Image.new("RGB", (640, 800)), "auto", (True, False, "toned", None)),
    (colour_scan, lambda s: Image.new("RGB", (640, 800), (255, 255, 255)), "off", (True, False, "color", None)),
    (gray_scan, lambda s: resized(s), "auto", (False, True, "gray", "L")),
    (gray_rgb_scan, tinted, "auto", (False, False, "gray", "RGB R=G=B")),
    (gray_rgb_scan, tinted, "off", (False, False, "gray", "as it came")),
    (sepia_scan, tinted, "auto", (False, False, "toned", "RGB")),
    (sepia_scan, lambda s: resized(s), "auto", (False, True, "toned", "RGB")),
    (colour_scan, lambda s: touched(resized(s), sharper), "auto", (False, False, "color", "as it came")),
])
def test_judge(scan, result, grayscale, expected):
    scan = scan()
    result = result(scan)
    verdict = judge(scan, result, grayscale=grayscale)
    assert isinstance(verdict, GuardVerdict)
    blank, unchanged, tone, image = expected
    assert (verdict.blank, verdict.unchanged, verdict.tone) == (blank, unchanged, tone)
    if image is None:
        assert verdict.image is None
    elif image == "as it came":
        assert verdict.image is result
    else:
        assert verdict.image.mode == image.split()[0] and verdict.image.size == result.size
        if image.endswith("R=G=B"):
            assert bands_equal(verdict.image)


def test_judge_refuses_an_unknown_setting():
    with pytest.raises(ValueError, match="grayscale"):
        judge(gray_scan(), resized(gray_scan()), grayscale="on")

