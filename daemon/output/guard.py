"""The output guard: catch what CodeFormer is known to get wrong before a result reaches the outbox.

Three faults its users report again and again: black-and-white and sepia photos come back tinted, or
with green/red patches on faces (sczhou/CodeFormer #32, #121, #238); some results are all black
(#222); and a photo in which no face was found comes back merely resized, though it was paid for.
Each check is a pure decision on the decoded, upright scan and the provider's result. They look at
small downscaled copies, so a Raspberry Pi pays milliseconds, not seconds, and use Pillow alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageChops, ImageFilter, ImageStat

Tone = Literal["color", "gray", "toned"]

SAMPLE_SIDE = 256
"""Blankness is judged on a copy at most this long on its long side: it is a global fact."""
CHROMA_SIDE = 128
"""Tone is judged on a copy at most this long: its distinct colours are counted one by one, and a
print's tone is the same at any size."""
GRAY_MAX_CHROMA = 4.0
"""A neutral scan: 99% of its pixels are within this chroma (distance from grey in Cb/Cr, 0-181)."""
TONED_MAX_CHROMA = 32.0
"""A toned print: 95% of its pixels within this chroma. A strong sepia measures about 26, yellowed
paper about 18, a colour photograph usually 40 or more."""
FAINT_CHROMA = 8.0
"""Below this (at the 95th percentile) any hue counts as toned: it is scanner noise, not colour."""
TONED_MIN_COHERENCE = 0.9
"""Above FAINT_CHROMA a toned print has one hue everywhere: the chroma-weighted mean direction of
its colours is at least this long (1 = a single hue). A muted colour photo has several hues."""
BLANK_MAX_STDDEV = 1.5
"""A result whose every band varies less than this (levels, on the small copy) shows nothing."""
COMPARE_SIDE = 512
"""The scan and the result are compared at the scan's size, but no larger than this."""
COMPARE_GRID = 16
"""The comparison is made in COMPARE_GRID x COMPARE_GRID regions, so a changed face is not averaged away."""
COMPARE_BLUR = 1.0
"""Both sides are blurred this much (pixels) first: resampling loses the finest grain, a face is larger."""
UNCHANGED_TOLERANCE = 2
"""A region is unchanged when its mean luminance difference is at most this many levels (0-255)."""
RESTORE_ROWS = 64
"""Rows of the result restored at a time (see `restore_tone`): a few MB of intermediates for a 35 Mpx result."""
GRAYSCALE_SETTINGS = ("auto", "off")
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass(frozen=True)
class ChromaProfile:
    """How far a scan's colours are from grey: percentiles of chroma and how single-hued they are."""

    p95: float
    p99: float
    coherence: float
    """Length of the chroma-weighted mean hue direction: 1 for a single hue, near 0 for many."""


@dataclass(frozen=True)
class GuardVerdict:
    """What the guard found, and the image to deliver (tone restored when asked; None when blank)."""

    blank: bool
    unchanged: bool
    tone: Tone
    image: Image.Image | None


# ---------------------------------------------------------------- helpers


def eight_bit(image: Image.Image) -> Image.Image:
    """The image in a mode the checks can read: 16-bit and float grey scaled to L, palettes expanded."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit values span 0-65535; Pillow's own convert("L") would clip them at 255.
        return image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if image.mode == "1":
        return image.convert("L")
    if image.mode in ("P", "PA", "La", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGBA" if image.mode in ("PA", "La", "RGBa") or "transparency" in image.info
                             else "RGB")
    return image


def colour_only(image: Image.Image) -> Image.Image:
    """The image without its alpha band: transparency is not what the guard judges."""
    image = eight_bit(image)
    if image.mode == "LA":
        return image.getchannel("L")
    return image.convert("RGB") if image.mode == "RGBA" else image


def sample(image: Image.Image, side: int = SAMPLE_SIDE) -> Image.Image:
    """A copy at most `side` on its long side; averaging (BOX) also calms scanner noise.

    Made in one step from the image (never a full-size copy first): a whole-number reduction, then
    the last resampling on what is left.
    """
    image = colour_only(image)
    return image.resize(fit(image.size, side), Image.BOX, reducing_gap=2.0)


def fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    """`size` scaled down, keeping its aspect, so that its long side is at most `side`."""
    factor = min(1.0, side / max(size))
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def chroma_profile(image: Image.Image) -> ChromaProfile:
    """The chroma statistics of an RGB image, on a small copy, counted per distinct (Cb, Cr) pair."""
    _, cb, cr = sample(image, CHROMA_SIDE).convert("RGB").convert("YCbCr").split()
    # Pillow counts the distinct pairs in C; there are a few thousand at most, cheap to sort here.
    pairs = Image.merge("LA", (cb, cr)).getcolors(256 * 256) or []
    total = sum(n for n, _ in pairs)
    rows = sorted((math.hypot(b - 128, r - 128), b - 128, r - 128, n) for n, (b, r) in pairs)
    percentiles, seen = {}, 0
    for chroma, _, _, n in rows:
        seen += n
        for share in (0.95, 0.99):
            if share not in percentiles and seen >= share * total:
                percentiles[share] = chroma
    weight = sum(chroma * n for chroma, _, _, n in rows)
    mean_cb = sum(b * n for _, b, _, n in rows)
    mean_cr = sum(r * n for _, _, r, n in rows)
    coherence = math.hypot(mean_cb, mean_cr) / weight if weight else 1.0
    return ChromaProfile(percentiles[0.95], percentiles[0.99], coherence)


def tone_of(profile: ChromaProfile) -> Tone:
    """The decision behind scan_tone, on numbers: gray, then toned (faint, or strong but single-hued)."""
    if profile.p99 <= GRAY_MAX_CHROMA:
        return "gray"
    if profile.p95 <= FAINT_CHROMA:
        return "toned"
    if profile.p95 <= TONED_MAX_CHROMA and profile.coherence >= TONED_MIN_COHERENCE:
        return "toned"
    return "color"


# ---------------------------------------------------------------- the decisions


def scan_tone(scan: Image.Image) -> Tone:
    """Whether a scan is neutral grey, a toned monochrome print (sepia, cyanotype, yellowed), or colour."""
    if scan.mode in GRAY_MODES:
        return "gray"
    return tone_of(chroma_profile(scan))


def is_blank(result: Image.Image) -> bool:
    """True for an all-black, all-white or single-colour result: every band is flat (CodeFormer #222)."""
    stats = ImageStat.Stat(sample(result))
    return all(stddev <= BLANK_MAX_STDDEV for stddev in stats.stddev)


def is_unchanged(scan: Image.Image, result: Image.Image) -> bool:
    """True when the result is only the scan resized: every region's luminance matches the scan's.

    Compared region by region, never on a global average, so a result that changed only its faces
    (a small part of the picture) counts as changed. Both sides are blurred slightly, because a
    resize up and back down loses the finest grain of any scan.
    """
    size = fit(scan.size, COMPARE_SIDE)
    # Luminance first, then a whole-number reduction before the last resampling: a large result
    # costs a box average over its bytes once, not a LANCZOS kernel over every pixel.
    seen = luminance(scan).resize(size, Image.LANCZOS, reducing_gap=2.0)
    got = luminance(result).resize(size, Image.LANCZOS, reducing_gap=1.0)
    blur = ImageFilter.GaussianBlur(COMPARE_BLUR)
    difference = ImageChops.difference(seen.filter(blur), got.filter(blur))
    grid = (min(COMPARE_GRID, size[0]), min(COMPARE_GRID, size[1]))
    regions = difference.resize(grid, Image.BOX)  # each pixel: one region's mean difference
    return max(regions.getextrema()) <= UNCHANGED_TOLERANCE


def luminance(image: Image.Image) -> Image.Image:
    return colour_only(image).convert("L")


def restore_tone(scan: Image.Image, result: Image.Image, tone: Tone, *, in_place: bool = False) -> Image.Image:
    """The result without the colour the model invented; a colour scan's result is returned as it is.

    gray: the result's luminance, as L when the scan is L (so a grey ICC profile still fits), else
    as RGB with R=G=B. toned: the result's luminance with the scan's own colour, upsampled.
    The result's alpha band, if any, is kept. Made RESTORE_ROWS rows at a time: the steps'
    full-size intermediates would triple the memory of a large result. `in_place`: written over
    the result itself where the mode allows (the caller's own decode, not looked at again).
    """
    if tone == "color":
        return result
    result = eight_bit(result)
    alpha = result.mode in ("RGBA", "LA")
    grey = tone == "gray" and scan.mode in GRAY_MODES
    mode = ("LA" if alpha else "L") if grey else ("RGBA" if alpha else "RGB")
    restored = result if in_place and result.mode == mode else Image.new(mode, result.size)
    # Only the two colour bands are upsampled: a tone varies slowly, and this is the costly step.
    colour = colour_only(scan).convert("RGB").convert("YCbCr").split()[1:] if tone == "toned" else ()
    width, height = result.size
    for top in range(0, height, RESTORE_ROWS):
        box = (0, top, width, min(height, top + RESTORE_ROWS))
        rows = result.crop(box)
        luma = luminance(rows)
        if tone == "gray":
            made = luma if grey else Image.merge("RGB", (luma, luma, luma))
        else:  # each strip resampled from the whole band in the full image's geometry: no seams
            cb, cr = (band.resize(rows.size, Image.BILINEAR,
                                  box=(0, top * band.height / height, band.width, box[3] * band.height / height))
                      for band in colour)
            made = Image.merge("YCbCr", (luma, cb, cr)).convert("RGB")
        if alpha:
            made.putalpha(rows.getchannel("A"))
        restored.paste(made, box)
    return restored


def judge(scan: Image.Image, result: Image.Image, *, grayscale: str, in_place: bool = False) -> GuardVerdict:
    """Every check in order: a blank result is never delivered; unchanged is flagged; tone restored.

    `grayscale` is the output.grayscale setting: "auto" restores a gray or toned scan's tone, "off"
    delivers the model's colours as they came. `in_place`: see `restore_tone`.
    """
    if grayscale not in GRAYSCALE_SETTINGS:
        raise ValueError(f"grayscale must be one of {', '.join(GRAYSCALE_SETTINGS)}, not {grayscale!r}")
    tone = scan_tone(scan)
    if is_blank(result):
        return GuardVerdict(blank=True, unchanged=False, tone=tone, image=None)
    unchanged = is_unchanged(scan, result)
    image = restore_tone(scan, result, tone, in_place=in_place) if grayscale == "auto" else result
    return GuardVerdict(blank=False, unchanged=unchanged, tone=tone, image=image)
