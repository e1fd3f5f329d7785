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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .. import __version__
from ..config import OutputConfig
from ..outbox import finish_temp, temporary_file
from ..preflight import is_environment_fault
from .encode import EXTENSIONS, encode
from .guard import judge
from .label import Provenance, label_xmp, sidecar_record
from .metadata import ScanMetadata, choose_format, read_scan_metadata

MODEL_ID = "codeformer-image-restoration"
"""The provider's model, as its request ids and URLs name it."""

GUARD_SIDE = 512
"""The scan is decoded at about this size for the guard: its judgements look at tones and regions,
never at fine detail, and a full decode of a 600 dpi scan would cost a small box dearly."""


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


def open_result(path: Path, cap: int) -> Image.Image:
    """The result, fully decoded, once its header proves it within `cap`; BadResult otherwise.

    A result too large to decode is refused once, with the reason, instead of being fetched again
    and again; one that does not decode may be a broken transfer and is worth fetching again.
    """
    try:
        image = Image.open(path)
        try:
            width, height = image.size
            if width * height > cap:
                raise BadResult(f"the result is {width}x{height} = {width * height} pixels, over the cap of "
                                f"{cap} (preflight.max_pixels times upscale squared)", retryable=False)
            image.load()  # a full decode: proof the bytes on disk are a whole image (and the file is closed)
        except BaseException:
            image.close()
            raise
        return image  # not a copy: a second full-size image would double the peak memory of a delivery
    except BadResult:
        raise
    except OSError as exc:
        if is_environment_fault(exc):
            raise  # our own disk failing, not the result: the scheduler keeps the job
        raise BadResult(f"the result is not a readable image: {exc}", retryable=True) from None
    except (SyntaxError, ValueError) as exc:
        raise BadResult(f"the result is not a readable image: {exc}", retryable=True) from None


def read_scan(scan: Path | None) -> tuple[Image.Image | None, ScanMetadata | None]:
    """The scan, upright and decoded at about GUARD_SIDE, and its metadata; (None, None) if it is gone."""
    if scan is None:
        return None, None
    try:
        metadata = read_scan_metadata(scan)
        with Image.open(scan) as image:
            image.draft("RGB", (GUARD_SIDE, GUARD_SIDE))  # JPEG decodes at 1/2..1/8 scale: far cheaper
            return ImageOps.exif_transpose(image), metadata  # a new, loaded image: it outlives the file
    except FileNotFoundError:
        return None, None


@contextlib.contextmanager
def rendered(result_path: Path, directory: Path, origin: Origin, settings: OutputConfig, cap: int, *,
             title: str = "", c2pa_key: Path | None = None,
             now: datetime | None = None) -> Iterator[tuple[Path, OutputFacts]]:
    """The finished output as a temporary file in `directory`, with what was made; removed unless claimed.

    Raises BadResult for a result that is unreadable, too large, blank, or (with
    `output.unchanged: fail`) only the scan resized.
    """
    result = open_result(result_path, cap)
    scan, metadata = read_scan(origin.scan)
    verdict = judge(scan, result, grayscale=settings.grayscale) if scan is not None else None
    if verdict is not None and verdict.blank:
        raise BadResult("the provider returned a blank image (it was paid; `codeformer-daemon retry` sends it "
                        "again)", retryable=False, kind="blank_result")
    unchanged = verdict is not None and verdict.unchanged
    if unchanged and settings.unchanged == "fail":
        raise BadResult("the provider returned the scan only resized: no face was found or restored "
                        "(output.unchanged: fail)", retryable=False, kind="unchanged_result")
    image = verdict.image if verdict is not None else result
    tone = verdict.tone if verdict is not None else "unknown"
    fmt = choose_format(settings.format, metadata.format if metadata else None)
    provenance = Provenance(
        software=f"codeformer-daemon {__version__}", model=MODEL_ID, params=dict(origin.params),
        request_id=origin.request_id, scan_sha256=origin.scan_sha256,
        restored_at=(now or datetime.now(timezone.utc)).isoformat(timespec="seconds"), unchanged=unchanged,
        guard=guard_notes(tone, settings.grayscale))
    kept = metadata if settings.keep_metadata else None
    xmp = label_xmp(kept.xmp if kept else None, provenance if settings.label else None)
    facts = OutputFacts(format=fmt, extension=EXTENSIONS[fmt], unchanged=unchanged, tone=tone,
                        labelled=settings.label,
                        # credentials name the scan as their parent: without it (gone) none are made
                        signed=settings.c2pa.certificate is not None and origin.scan is not None,
                        sidecar=sidecar_record(provenance) if settings.sidecar else None)
    with temporary_file(directory) as (encoded, f):
        encode(image, f, fmt, metadata=kept, xmp=xmp, jpeg_quality=settings.jpeg_quality,
               tiff_compression=settings.tiff_compression)
        finish_temp(f)
        if not facts.signed:
            yield encoded, facts
            return
        with temporary_file(directory) as (signed, g):
            g.close()
            _sign(encoded, signed, fmt, settings, c2pa_key, origin, title or "restored")
            yield signed, facts


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
