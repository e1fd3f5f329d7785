"""From the provider's bytes to the file the outbox gets: checked, judged, encoded once, labelled, signed.

Each decision lives in a small module beside this one (guard, metadata, label, encode, credentials);
this one runs them in order over temporary files in the outbox folder, so nothing half-made is ever
visible there. The result's size is checked from its header before a pixel is decoded; the image is
encoded exactly once, with the scan's metadata and the label; content credentials are added last,
because re-saving a signed file with Pillow would drop them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from .. import __version__, memory
from ..config import OutputConfig
from ..outbox import finish_temp, temporary_file
from ..preflight import decode_need, is_environment_fault
from .encode import EXTENSIONS, MODES, encode
from .guard import GRAY_MODES, judge
from .label import Provenance, label_xmp, sidecar_record
from .metadata import ScanMetadata, choose_format, read_scan_metadata

MODEL_ID = "codeformer-image-restoration"
"""The provider's model, as its request ids and URLs name it."""

GUARD_SIDE = 512
"""The scan is decoded at about this size for the guard: its judgements look at tones and regions,
never at fine detail, and a full decode of a 600 dpi scan would cost a small box dearly."""

UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
"""EXIF orientation -> the transpose that makes the pixels upright (as ImageOps.exif_transpose)."""

TIFF_BYTES_PER_PIXEL = 3
"""A TIFF is built in memory before it is written: compressed, in up to three copies, about 3 bytes a
pixel measured on noisy 25-35 Mpx scans. JPEG, PNG and WebP stream from the image instead."""
WORKING_BYTES_PER_PIXEL = 1
"""The guard's strips and samples and the encoder's buffers, measured at under a byte a pixel."""


class BadResult(Exception):
    """The provider's result is not fit to deliver; `retryable` says whether fetching it again may help.

    `kind` names the failure for failed/ and `status`: download_failed (unreadable, too large),
    blank_result, unchanged_result.
    """

    def __init__(self, reason: str, *, retryable: bool, kind: str = "download_failed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.kind = kind


@dataclass(frozen=True)
class Origin:
    """Where a result came from, for the guard, the metadata and the label."""

    scan: Path | None
    """The original scan (its pinned copy); None when it is gone (the result is delivered bare)."""
    scan_sha256: str
    request_id: str | None
    params: dict[str, Any]


@dataclass(frozen=True)
class OutputFacts:
    """What was made, for the log, `status`, the sidecar and the file's name."""

    format: str
    extension: str
    unchanged: bool
    tone: str
    labelled: bool
    signed: bool
    sidecar: dict[str, Any] | None = field(default=None, compare=False)


def pixel_cap(max_pixels: int, params: dict[str, Any]) -> int:
    """The most pixels a result may have: what preflight lets in, times the requested upscale squared."""
    upscale = params.get("upscale", 1)
    return max_pixels * max(1, int(upscale) if isinstance(upscale, (int, float)) else 1) ** 2


def result_header(path: Path, cap: int) -> Image.Image:
    """The result opened (its header read, no pixel decoded) and proved within `cap`; BadResult otherwise.

    A result too large to decode is refused once, with the reason, instead of being fetched again
    and again; one that does not open may be a broken transfer and is worth fetching again.
    """
    with _unreadable_result():
        image = Image.open(path)
    width, height = image.size
    if width * height > cap:
        image.close()
        raise BadResult(f"the result is {width}x{height} = {width * height} pixels, over the cap of "
                        f"{cap} (preflight.max_pixels times upscale squared)", retryable=False)
    return image


def load_result(image: Image.Image) -> None:
    """Decode the opened result in full: proof the bytes on disk are a whole image (the file is closed)."""
    try:
        with _unreadable_result():
            image.load()
    except BaseException:
        image.close()
        raise


@contextlib.contextmanager
def _unreadable_result() -> Iterator[None]:
    """Pillow's errors for a result that does not decode, as a BadResult worth fetching again."""
    try:
        yield
    except OSError as exc:
        if is_environment_fault(exc):
            raise  # our own disk failing, not the result: the scheduler keeps the job
        raise BadResult(f"the result is not a readable image: {exc}", retryable=True) from None
    except (SyntaxError, ValueError) as exc:
        raise BadResult(f"the result is not a readable image: {exc}", retryable=True) from None


def open_scan(scan: Path | None) -> tuple[Image.Image | None, ScanMetadata | None]:
    """The scan opened for the guard (a JPEG drafted to about GUARD_SIDE) and its metadata; (None, None) if gone."""
    if scan is None:
        return None, None
    try:
        metadata = read_scan_metadata(scan)
        image = Image.open(scan)
    except FileNotFoundError:
        return None, None
    image.draft("RGB", (GUARD_SIDE, GUARD_SIDE))  # JPEG decodes at 1/2..1/8 scale: far cheaper
    return image, metadata


def guard_view(image: Image.Image, orientation: int) -> Image.Image:
    """The opened scan decoded, reduced to about GUARD_SIDE and made upright; the full decode is closed.

    What a JPEG's draft does while decoding, done after it for every other format (a TIFF decodes
    only in full): the guard holds a small image, never a second full-size one.
    """
    image.load()
    factor = min(image.size) // GUARD_SIDE
    small = image.resize((-(-image.width // factor), -(-image.height // factor)), Image.BOX) if factor >= 2 else image
    if orientation in UPRIGHT:
        small = small.transpose(UPRIGHT[orientation])
    if small is not image:
        image.close()
    return small


def rendering_need(result: Image.Image, scan_mode: str | None, settings: OutputConfig, fmt: str) -> int:
    """Bytes the result's decode holds at its peak with what the guard and the encoder add, from its header.

    The guard restores a tone over the result itself where the modes agree; it makes a new image for
    an RGB result of a grey scan (L, 1 byte a pixel) or a grey result of a toned scan (RGB, 4 bytes).
    The encoder converts a mode the format cannot hold (4 bytes at most) or builds a TIFF in memory.
    """
    new_image = 0
    if settings.grayscale == "auto" and scan_mode is not None:
        grey_scan = scan_mode in GRAY_MODES
        new_image = (1 if grey_scan else 0) if result.mode in ("RGB", "RGBA") else (0 if grey_scan else 4)
    converts = MODES.get(fmt, {}).get(result.mode, "RGB") != result.mode
    encoder = TIFF_BYTES_PER_PIXEL if fmt == "TIFF" else 4 if converts else 0
    return memory.image_bytes(result.size, result.mode) + result.width * result.height * (
        new_image + encoder + WORKING_BYTES_PER_PIXEL)


@contextlib.contextmanager
def rendered(result_path: Path, directory: Path, origin: Origin, settings: OutputConfig, cap: int, *,
             title: str = "", c2pa_key: Path | None = None, now: datetime | None = None,
             preview: Callable[[Image.Image], object] | None = None) -> Iterator[tuple[Path, OutputFacts]]:
    """The finished output as a temporary file in `directory`, with what was made; removed unless claimed.

    Raises BadResult for a result that is unreadable, too large, blank, or (with
    `output.unchanged: fail`) only the scan resized. `preview`: see `render`.
    """
    with temporary_file(directory) as (encoded, f):
        facts = render(result_path, f, origin, settings, cap, now=now, preview=preview)
        finish_temp(f)
        if not facts.signed:
            yield encoded, facts
            return
        with temporary_file(directory) as (signed, g):
            g.close()
            _sign(encoded, signed, facts.format, settings, c2pa_key, origin, title or "restored")
            yield signed, facts


def render(result_path: Path, out: BinaryIO, origin: Origin, settings: OutputConfig, cap: int, *,
           now: datetime | None = None, preview: Callable[[Image.Image], object] | None = None) -> OutputFacts:
    """Decode, judge and encode the result into `out`, holding the decode budget from the first decode
    to the last byte encoded; every image is closed before the budget is given back. The budget is the
    larger of the scan's decode (at its draft size) and the result's (see `rendering_need`).

    `preview`, if given, is called with the delivered image (upright) once it is encoded, so a
    preview never decodes the result again; it must not raise, nor ask for the budget."""
    result = result_header(result_path, cap)
    images = [result]
    try:
        scan, metadata = open_scan(origin.scan)
        if scan is not None:
            images.append(scan)
        fmt = choose_format(settings.format, metadata.format if metadata else None)
        need = rendering_need(result, scan.mode if scan else None, settings, fmt)
        if scan is not None:  # decoded first, and reduced before the result is decoded
            need = max(need, decode_need(scan, False, metadata.size))
        with memory.BUDGET.hold(need, "output"):
            try:
                return _judge_and_encode(result, scan, metadata, fmt, out, origin, settings, images, now, preview)
            finally:
                _close(images)  # before the budget is given back: their memory goes with it
    finally:
        _close(images)  # also when the scan could not be opened


def _close(images: list[Image.Image]) -> None:
    """Free each image's pixels now, whoever still refers to it (a traceback, a verdict)."""
    for image in images:
        image.close()


def _judge_and_encode(result: Image.Image, scan: Image.Image | None, metadata: ScanMetadata | None, fmt: str,
                      out: BinaryIO, origin: Origin, settings: OutputConfig, images: list[Image.Image],
                      now: datetime | None, preview: Callable[[Image.Image], object] | None = None) -> OutputFacts:
    """The rendering proper, under the budget; every image it makes is added to `images` to be closed."""
    if scan is not None:
        scan = guard_view(scan, metadata.orientation)
        images.append(scan)
    load_result(result)
    verdict = judge(scan, result, grayscale=settings.grayscale, in_place=True) if scan is not None else None
    if verdict is not None and verdict.blank:
        raise BadResult("the provider returned a blank image (it was paid; `codeformer-daemon retry` sends it "
                        "again)", retryable=False, kind="blank_result")
    if verdict is not None:
        images.append(verdict.image)
    unchanged = verdict is not None and verdict.unchanged
    if unchanged and settings.unchanged == "fail":
        raise BadResult("the provider returned the scan only resized: no face was found or restored "
                        "(output.unchanged: fail)", retryable=False, kind="unchanged_result")
    image = verdict.image if verdict is not None else result
    if image is not result:
        result.close()  # the guard made the image to deliver: the result's memory goes before the encode
    tone = verdict.tone if verdict is not None else "unknown"
    provenance = Provenance(
        software=f"codeformer-daemon {__version__}", model=MODEL_ID, params=dict(origin.params),
        request_id=origin.request_id, scan_sha256=origin.scan_sha256,
        restored_at=(now or datetime.now(timezone.utc)).isoformat(timespec="seconds"), unchanged=unchanged,
        guard=guard_notes(tone, settings.grayscale))
    kept = metadata if settings.keep_metadata else None
    xmp = label_xmp(kept.xmp if kept else None, provenance if settings.label else None)
    encode(image, out, fmt, metadata=kept, xmp=xmp, jpeg_quality=settings.jpeg_quality,
           tiff_compression=settings.tiff_compression)
    if preview is not None:
        preview(image)
    return OutputFacts(format=fmt, extension=EXTENSIONS[fmt], unchanged=unchanged, tone=tone,
                       labelled=settings.label,
                       # credentials name the scan as their parent: without it (gone) none are made
                       signed=settings.c2pa.certificate is not None and origin.scan is not None,
                       sidecar=sidecar_record(provenance) if settings.sidecar else None)


def guard_notes(tone: str, grayscale: str) -> tuple[str, ...]:
    """What the guard did, in words for the label and the log."""
    if grayscale == "auto" and tone in ("gray", "toned"):
        return (f"colour invented by the model removed: the scan is {tone}",)
    return ()


def _sign(source: Path, dest: Path, fmt: str, settings: OutputConfig, key: Path | None, origin: Origin,
          title: str) -> None:
    from .credentials import sign  # the [c2pa] extra: imported only when a certificate is configured

    if key is None:
        raise ValueError("output.c2pa.certificate is set but no private key was resolved")
    os.unlink(dest)  # the signer writes a new file
    sign(source, dest, fmt, certificate=settings.c2pa.certificate, private_key=key,
         timestamp_url=settings.c2pa.timestamp_url, ingredient=origin.scan,
         ingredient_format=_mime(origin.scan), software=f"codeformer-daemon {__version__}", title=title)
    with open(dest, "rb+") as f:
        finish_temp(f)


def _mime(path: Path | None) -> str:
    if path is None:
        return "image/png"
    with Image.open(path) as image:
        return Image.MIME.get(image.format or "", "application/octet-stream")
