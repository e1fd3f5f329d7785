"""Preflight: is this file an image the provider can take? Decided by content, before any money is spent.

What is judged is a pinned copy, never the inbox file itself: the scan is opened once without
following links and pinned into the staging folder (a hard link on the same file system, else a
copy), hashed as it is pinned. That copy is what gets published, so a share that drops after the
submit, or someone swapping a folder or the content in the inbox, cannot change what the provider
fetches. JPEG and PNG in 8-bit RGB, greyscale or palette are published as they are, byte for byte.
Anything Pillow can read but the provider may not take (TIFF, BMP, WebP, CMYK, 16-bit, ...) is
converted to an upload-safe PNG in the staging folder. Everything else is rejected with a reason a
person can act on.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from . import memory
from .outbox import fsync_dir

# Every decode in the daemon checks an explicit pixel cap from the header before it loads a pixel
# (preflight.max_pixels for scans, that times upscale squared for results). Pillow's own global
# guess would refuse a result the configuration allows, or raise where a clear reason is owed.
Image.MAX_IMAGE_PIXELS = None

PASS_THROUGH_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png"}
PASS_THROUGH_MODES = {"RGB", "RGBA", "L", "LA", "P"}
SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I")
PNG_COMPRESS_LEVEL = 1
"""The upload PNG is read once by the provider and deleted: zlib's fastest level converts a 30 Mpx
scan in a fraction of level 6's time, for a file some 10-20% larger."""
CONVERT_ROWS = 256
"""16-bit grey is scaled to 8 bits this many rows at a time."""
JPEG_CHECK_SCALE = 8
"""A JPEG sent as it is is decoded at 1/8 scale to prove it whole: libjpeg still reads every byte."""
CHUNK = 1024 * 1024
SYMLINK_REASON = "a symbolic link: links in the inbox are never followed, published or sent"


class PreflightError(Exception):
    """The file cannot be sent; `reason` says why in words for the failed/ record.

    `may_be_incomplete` marks verdicts a file still being written would also get (empty, not an
    image yet, truncated): the caller fails the scan only once it is sure the writing is over.
    """

    def __init__(self, reason: str, *, may_be_incomplete: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.may_be_incomplete = may_be_incomplete


class StagingError(Exception):
    """The staging folder could not take the pinned copy (disk full, not writable): the daemon's
    fault, not the scan's, so the job is kept and tried again."""


@dataclass(frozen=True)
class PreflightResult:
    """What to publish for a file that passed."""

    sha256: str
    """Of the original file's bytes (as pinned): identifies the content for duplicate detection."""
    width: int
    height: int
    source_format: str
    upload_path: Path
    """In the staging folder: the pinned copy itself, or the PNG made from it."""
    content_type: str
    converted: bool

    def still_pinned(self) -> bool:
        """True while `upload_path` still holds what was checked (see `pin_holds`)."""
        return pin_holds(self.upload_path, self.sha256, self.converted)


def pin_holds(upload_path: Path, sha256: str | None, converted: bool) -> bool:
    """True while a staged upload is still there and, for a pin, still the checked bytes.

    A pin that is a hard link shares its bytes with the inbox file, so a writer that kept writing
    into it changes the pin too: it is hashed again before it is published. A PNG the daemon made
    itself only has to be there.
    """
    try:
        if converted:
            return stat.S_ISREG(os.lstat(upload_path).st_mode)
        with open(upload_path, "rb") as f:
            return sha256_of(f) == sha256
    except OSError:
        return False


def sha256_of(f: BinaryIO) -> str:
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
        # O_NONBLOCK: a FIFO swapped in after the lstat must not hang the worker (no effect on files).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PreflightError(SYMLINK_REASON) from None
        if is_environment_fault(exc):
            raise
        raise PreflightError(f"cannot read the file: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PreflightError("not a regular file")
    return os.fdopen(fd, "rb")


def needs_conversion(image_format: str | None, mode: str) -> bool:
    """True when the provider should get a PNG made from the file instead of the file itself."""
    return image_format not in PASS_THROUGH_FORMATS or mode not in PASS_THROUGH_MODES


def _to_upload_mode(image: Image.Image) -> Image.Image:
    """8-bit RGB(A) or greyscale: what every image service takes."""
    if image.mode in ("RGB", "RGBA", "L"):
        return image
    if image.mode in SIXTEEN_BIT_GREY:
        # 16/32-bit greyscale: scale down to 8 bits instead of clipping everything to white, a strip
        # at a time, so no second full-size 16-bit image is made on the way.
        grey = Image.new("L", image.size)
        for top in range(0, image.height, CONVERT_ROWS):
            box = (0, top, image.width, min(image.height, top + CONVERT_ROWS))
            grey.paste(image.crop(box).point(lambda v: v / 256).convert("L"), box)
        return grey
    if image.mode in ("LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    return image.convert("RGB")


def check_image(path: Path, staging_dir: Path, stem: str, *, max_pixels: int,
                preview: Callable[[Image.Image], object] | None = None) -> PreflightResult:
    """Pin `path` into `staging_dir` as `<stem>-<name>`, then check the pin by content.

    The file is read through one descriptor opened without following links, so what is pinned,
    hashed, decoded and judged is the same file, and always one inside the inbox. A PNG made for
    the provider goes beside the pin as `<stem>.png` and is what gets published. On any verdict
    the pin is removed. `preview`, if given, is called with the scan when it is decoded in full
    (converted, or a PNG), so that no one decodes it again for a preview; it must not raise.
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
    pinned: Path | None = None
    try:
        with _open_no_follow(path) as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise PreflightError("the file is empty (0 bytes)", may_be_incomplete=True)
            pinned, sha256 = pin(f, staging_dir, f"{stem}-{path.name}")
        result = _decode(pinned, sha256, staging_dir, stem, max_pixels, preview)
    except BaseException as exc:
        if pinned is not None:
            _remove(pinned)
        if isinstance(exc, Exception):
            _raise_as_verdict(exc)
        raise
    return result  # a converted scan keeps its pin too: what the output's metadata and credentials name


def _raise_as_verdict(exc: Exception) -> None:
    """Re-raise `exc` as a PreflightError with a reason, unless it is no verdict on the scan."""
    if isinstance(exc, (PreflightError, StagingError)):
        raise exc
    if isinstance(exc, UnidentifiedImageError):
        raise PreflightError("not an image Pillow can read (checked by content, not by name)",
                             may_be_incomplete=True) from None
    if isinstance(exc, PermissionError):
        raise PreflightError(f"cannot read the file: {exc.strerror}") from None
    if isinstance(exc, OSError):
        if is_environment_fault(exc):
            raise exc  # the share hiccupped: the scheduler keeps the job and tries again later
        raise PreflightError(f"the image is truncated or corrupt: {exc}", may_be_incomplete=True) from None
    if isinstance(exc, (SyntaxError, ValueError)):
        raise PreflightError(f"the image is truncated or corrupt: {exc}", may_be_incomplete=True) from None
    raise exc


def pin(source: BinaryIO, staging_dir: Path, name: str) -> tuple[Path, str]:
    """Pin the open file `source` as `staging_dir/name`; returns the pin and the SHA-256 of its bytes.

    A hard link to the open file itself (through /proc/self/fd, so no path in the inbox is looked
    up again) where the file system allows it, else a copy; either is fsynced and renamed into
    place, replacing an older pin of the same name. Reading errors are the source's (OSError);
    writing errors are the staging folder's (StagingError). No temporary is ever left behind.
    """
    try:
        staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A dst_dir_fd makes os.link use linkat(AT_SYMLINK_FOLLOW): the magic link is followed to
        # the open file itself (plain link() would try to link the /proc entry and fail).
        folder = os.open(staging_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise StagingError(f"cannot use the staging folder {staging_dir}: {exc.strerror}") from None
    target = staging_dir / name
    temp = staging_dir / f".pin-{secrets.token_hex(8)}.tmp"
    try:
        try:
            os.link(f"/proc/self/fd/{source.fileno()}", temp.name, dst_dir_fd=folder, follow_symlinks=True)
        except OSError:  # another file system, no /proc, or protected_hardlinks: copy instead
            sha256 = _copy_hashing(source, temp)
        else:
            source.seek(0)
            sha256 = sha256_of(source)
        try:
            # Renaming a link onto another link of the same file changes nothing and keeps both
            # names (a re-pin of an unchanged scan): the temporary goes in `finally` either way.
            os.replace(temp, target)
            os.fsync(folder)
        except OSError as exc:
            raise StagingError(f"cannot pin the scan into {staging_dir}: {exc.strerror}") from None
    finally:
        _remove(temp)
        os.close(folder)
    return target, sha256


def _copy_hashing(source: BinaryIO, temp: Path) -> str:
    """Copy `source` into the new file `temp`, fsynced; the SHA-256 of what was copied."""
    digest = hashlib.sha256()
    try:
        out = open(temp, "xb")
    except OSError as exc:
        raise StagingError(f"cannot pin the scan into {temp.parent}: {exc.strerror}") from None
    with out:
        source.seek(0)
        for chunk in iter(lambda: source.read(CHUNK), b""):  # a read error is the source's: raised as it is
            digest.update(chunk)
            try:
                out.write(chunk)
            except OSError as exc:
                raise StagingError(f"cannot pin the scan into {temp.parent}: {exc.strerror}") from None
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as exc:
            raise StagingError(f"cannot pin the scan into {temp.parent}: {exc.strerror}") from None
    return digest.hexdigest()


def converted_name(stem: str) -> str:
    """The name of the PNG made for the provider from the pin of `stem` (see `check_image`)."""
    return f"{stem}.png"


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def decode_need(image: Image.Image, convert: bool, full_size: tuple[int, int]) -> int:
    """Bytes the decode of the opened, not yet loaded `image` holds at its peak, read from its header.

    The decoded image (at its draft size if drafted); for a conversion, the upload copy where the
    mode changes (8-bit grey for 16-bit grey, else RGB(A) at 4 bytes a pixel); for a progressive
    JPEG, libjpeg's buffer of every DCT coefficient at `full_size` (2 bytes each, at most three
    full-size components: 6 bytes a pixel), which a baseline JPEG streams instead. Measured peaks
    of 24-35 Mpx conversions and checks stay within a few per cent of this.
    """
    need = memory.image_bytes(image.size, image.mode)
    if convert and image.mode in SIXTEEN_BIT_GREY:
        need += memory.image_bytes(image.size, "L")
    elif convert and image.mode not in ("RGB", "RGBA", "L"):
        need += memory.image_bytes(image.size, "RGBA")
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        need += 6 * full_size[0] * full_size[1]
    return need


def _decode(pinned: Path, sha256: str, staging_dir: Path, stem: str, max_pixels: int,
            preview: Callable[[Image.Image], object] | None = None) -> PreflightResult:
    """Decode the pin under the pixel limit and the decode budget; pass it through or write the upload PNG.

    A JPEG sent as it is only has to prove it decodes: it is decoded at 1/8 scale (`draft`), which
    still reads all of its data, so a truncated or corrupt file fails here as before. What is
    converted is decoded in full: the PNG keeps every pixel.
    """
    with Image.open(pinned) as image:
        size = width, height = image.size
        if width * height > max_pixels:
            raise PreflightError(
                f"the image has {width}x{height} = {width * height} pixels, over "
                f"preflight.max_pixels ({max_pixels})")
        convert = needs_conversion(image.format, image.mode)
        if not convert and image.format == "JPEG":
            image.draft(image.mode, (max(1, width // JPEG_CHECK_SCALE), max(1, height // JPEG_CHECK_SCALE)))
        with memory.BUDGET.hold(decode_need(image, convert, size), "preflight"):
            try:
                result = _check_or_convert(image, pinned, sha256, staging_dir, stem, convert, size)
                if preview is not None and image.size == size:  # decoded in full, not drafted
                    preview(image)
                return result
            finally:
                image.close()  # its pixels go before the budget is given back (and memory to the OS)


def _check_or_convert(image: Image.Image, pinned: Path, sha256: str, staging_dir: Path, stem: str, convert: bool,
                      size: tuple[int, int]) -> PreflightResult:
    """The decode itself (under the budget): the check, and for a conversion the upload PNG beside the pin."""
    image_format = image.format or "unknown"
    image.load()  # a full decode, or a drafted one that reads every byte: catches truncated and corrupt files
    if not convert:
        return PreflightResult(sha256, *size, image_format, pinned, PASS_THROUGH_FORMATS[image_format], False)
    target = staging_dir / converted_name(stem)
    converted = _to_upload_mode(image)
    temp = target.with_suffix(".png.tmp")
    try:
        with open(temp, "wb") as out:
            converted.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
        fsync_dir(staging_dir)
    except OSError as exc:
        _remove(temp)
        raise StagingError(f"cannot write the converted scan into {staging_dir}: {exc}") from None
    return PreflightResult(sha256, *converted.size, image_format, target, "image/png", True)
