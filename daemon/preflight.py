"""Preflight: is this file an image the provider can take? Decided by content, before any money is spent.

JPEG and PNG in 8-bit RGB, greyscale or palette are published as they are, byte for byte. Anything
Pillow can read but the provider may not take (TIFF, BMP, WebP, CMYK, 16-bit, ...) is converted to an
upload-safe PNG in the staging folder. Everything else is rejected with a reason a person can act on.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

PASS_THROUGH_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png"}
PASS_THROUGH_MODES = {"RGB", "RGBA", "L", "LA", "P"}
CHUNK = 1024 * 1024
SYMLINK_REASON = "a symbolic link: links in the inbox are never followed, published or sent"


class PreflightError(Exception):
    """The file cannot be sent; `reason` says why in words for the failed/ record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PreflightResult:
    """What to publish for a file that passed."""

    sha256: str
    """Of the original file's bytes: identifies the content for duplicate detection."""
    width: int
    height: int
    source_format: str
    upload_path: Path
    content_type: str
    converted: bool


def _sha256_of(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


FILE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOENT, errno.ENOTDIR})
"""Errors that say something about this file (its permissions, a link, gone). Any other errno (EIO,
ESTALE, EHOSTDOWN, ...) is the disk or the share failing: not a verdict on the scan."""


def is_environment_fault(exc: OSError) -> bool:
    """True for an I/O error of the disk or share: the job is kept and tried again, never failed.

    Pillow's own decode errors (truncated, broken stream) are OSErrors without an errno.
    """
    return exc.errno is not None and exc.errno not in FILE_ERRNOS


def _open_no_follow(path: Path) -> BinaryIO:
    """Open the inbox file itself, never what a link points at: a link swapped in after the check is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PreflightError(SYMLINK_REASON) from None
        if is_environment_fault(exc):
            raise
        raise PreflightError(f"cannot read the file: {exc.strerror}") from None
    return os.fdopen(fd, "rb")


def needs_conversion(image_format: str | None, mode: str) -> bool:
    """True when the provider should get a PNG made from the file instead of the file itself."""
    return image_format not in PASS_THROUGH_FORMATS or mode not in PASS_THROUGH_MODES


def _to_upload_mode(image: Image.Image) -> Image.Image:
    """8-bit RGB(A) or greyscale: what every image service takes."""
    if image.mode in ("RGB", "RGBA", "L"):
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale down to 8 bits instead of clipping everything to white.
        return image.point(lambda v: v / 256).convert("L")
    if image.mode in ("LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    return image.convert("RGB")


def check_image(path: Path, staging_dir: Path, stem: str, *, max_pixels: int) -> PreflightResult:
    """Check `path` by content; convert to PNG in `staging_dir` as `<stem>.png` when needed.

    The file is read through one descriptor opened without following links, so what is hashed,
    decoded and judged is the same file, and always one inside the inbox.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        if is_environment_fault(exc):
            raise
        raise PreflightError(f"cannot read the file: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise PreflightError(SYMLINK_REASON)
    if not stat.S_ISREG(st.st_mode):
        raise PreflightError("not a regular file")
    f = _open_no_follow(path)
    try:
        with f:
            if os.fstat(f.fileno()).st_size == 0:
                raise PreflightError("the file is empty (0 bytes)")
            sha256 = _sha256_of(f)
            f.seek(0)
            return _decode(f, path, sha256, staging_dir, stem, max_pixels)
    except PreflightError:
        raise
    except UnidentifiedImageError:
        raise PreflightError("not an image Pillow can read (checked by content, not by name)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PreflightError(f"refused as a decompression bomb: {exc}") from None
    except PermissionError as exc:
        raise PreflightError(f"cannot read the file: {exc.strerror}") from None
    except OSError as exc:
        if is_environment_fault(exc):
            raise  # the share hiccupped: the scheduler keeps the job and tries again later
        raise PreflightError(f"the image is truncated or corrupt: {exc}") from None
    except (SyntaxError, ValueError) as exc:
        raise PreflightError(f"the image is truncated or corrupt: {exc}") from None


def _decode(f: BinaryIO, path: Path, sha256: str, staging_dir: Path, stem: str,
            max_pixels: int) -> PreflightResult:
    """Decode the open file fully under the pixel limit; pass it through or write the upload PNG."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(f) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise PreflightError(
                    f"the image has {width}x{height} = {width * height} pixels, over "
                    f"preflight.max_pixels ({max_pixels})")
            image_format = image.format or "unknown"
            image.load()  # a full decode: catches truncated and corrupt files
            if not needs_conversion(image.format, image.mode):
                return PreflightResult(sha256, width, height, image_format, path,
                                       PASS_THROUGH_FORMATS[image_format], False)
            staging_dir.mkdir(parents=True, exist_ok=True)
            target = staging_dir / f"{stem}.png"
            converted = _to_upload_mode(image)
            temp = target.with_suffix(".png.tmp")
            converted.save(temp, format="PNG")
            os.replace(temp, target)
            width, height = converted.size
            return PreflightResult(sha256, width, height, image_format, target, "image/png", True)
