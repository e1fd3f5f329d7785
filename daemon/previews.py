"""Before/after previews for the dashboard: small JPEGs in state_dir/thumbnails, named by job id only.

The dashboard never serves a file from the inbox, outbox or archive: only these, which the daemon
writes itself when a scan is checked (before) and when its result is delivered (after). A name is
built from an int and a fixed word, never from a string that came from outside, and a preview is
opened without following links. Previews are disposable: written without fsync, never allowed to
fail a job, and removed by `sweep_previews` once their job is finished and they are old enough.
Each is made from an image already decoded where there is one (preflight's conversion, the
delivered result), else from the file, a JPEG decoded at 1/2..1/8 scale (`draft`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog
from PIL import Image

from . import memory
from .config import Config
from .output.guard import eight_bit, fit
from .output.pipeline import UPRIGHT
from .preflight import decode_need

log = structlog.get_logger("daemon.previews")

PREVIEW_SIDE = 512
"""The longest side of a preview, in pixels; a smaller scan keeps its own size (never upscaled)."""
KINDS = ("before", "after")
JPEG_QUALITY = 80
ORIENTATION = 0x0112
NAME = re.compile(r"(?P<job_id>[1-9][0-9]*)-(?P<kind>before|after)\.jpg")
TEMP = re.compile(r"\.preview-[0-9a-f]{16}\.tmp")
COARSE_MODES = {"P": Image.NEAREST, "PA": Image.NEAREST, "1": Image.NEAREST,
                "I;16": Image.BOX, "I;16B": Image.BOX, "I;16L": Image.BOX, "I;16N": Image.BOX}
"""Modes `Image.reduce` cannot average (palette indices, 16-bit): their first step is a resize instead."""


def previews_folder(state_dir: Path) -> Path:
    return state_dir / "thumbnails"


def enabled_folder(config: Config) -> Path | None:
    """Where previews go, or None when they are off (no dashboard, or dashboard.thumbnails: false)."""
    if config.dashboard.listen is None or not config.dashboard.thumbnails:
        return None
    return previews_folder(config.state_dir)


def preview_path(folder: Path, job_id: int, kind: str) -> Path:
    """`<folder>/<job id>-<kind>.jpg`; ValueError for anything but a positive int id and a known kind."""
    if type(job_id) is not int or job_id <= 0:  # bool is an int too: refused
        raise ValueError("a preview's job id must be a positive int")
    if kind not in KINDS:
        raise ValueError(f"a preview's kind must be one of {', '.join(KINDS)}")
    return folder / f"{job_id}-{kind}.jpg"


# --------------------------------------------------------------------------- making one


def write_preview(source: Image.Image | Path, folder: Path, job_id: int, kind: str, *,
                  upright: bool = False) -> Path | None:
    """Make the preview of `source` (a decoded image, or a file) and rename it into place; None on any error.

    `upright`: the image is already upright (the delivered result), so its EXIF orientation, if any,
    is not applied again. Never raises: a preview is not worth a job; the error is logged once.
    """
    started = time.thread_time()
    try:
        target = preview_path(folder, job_id, kind)
        small = _from_file(source, upright) if isinstance(source, Path) else _small_upright(source, upright)
        _save(small, target)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the job goes on without a preview
        log.warning("preview.failed", job_id=job_id, kind=kind, error=str(exc) or type(exc).__name__)
        return None
    log.debug("preview.written", job_id=job_id, kind=kind, source="file" if isinstance(source, Path) else "memory",
              cpu_seconds=round(time.thread_time() - started, 4))
    return target


def _from_file(path: Path, upright: bool) -> Image.Image:
    """Decode `path` just large enough for a preview (a JPEG at 1/2..1/8 scale), under the decode budget."""
    with Image.open(path) as image:
        full_size = image.size
        image.draft(image.mode, fit(full_size, PREVIEW_SIDE))  # a no-op for anything but JPEG
        with memory.BUDGET.hold(decode_need(image, False, full_size), "preview"):
            try:
                image.load()
                return _small_upright(image, upright)
            finally:
                image.close()  # its pixels go before the budget is given back


def _small_upright(image: Image.Image, upright: bool) -> Image.Image:
    """A new RGB image at most PREVIEW_SIDE long, upright; `image` is left as it is.

    A whole-number reduction to about twice the preview first (cheap, and no full-size copy of a
    large scan is ever made), then the modes are made 8-bit RGB and the last step resamples bilinearly.
    """
    orientation = 1 if upright else _orientation(image)
    target = fit(image.size, PREVIEW_SIDE)
    factor = min(image.width // target[0], image.height // target[1]) // 2
    if factor >= 2:
        coarse = (max(1, image.width // factor), max(1, image.height // factor))
        small = (image.resize(coarse, COARSE_MODES[image.mode]) if image.mode in COARSE_MODES
                 else image.reduce(factor))
    else:
        small = image
    small = _flatten(eight_bit(small))
    if small.size != target:  # bilinear: a third of LANCZOS's cost, and no difference at 512 px on a screen
        small = small.resize(target, Image.BILINEAR)
    if orientation in UPRIGHT:
        small = small.transpose(UPRIGHT[orientation])
    return image.copy() if small is image else small  # the caller closes its own image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation of a decoded image (a TIFF is turned upright by Pillow as it loads); 1 if broken."""
    try:
        value = image.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF costs the orientation, never the preview
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _flatten(image: Image.Image) -> Image.Image:
    """RGB for the JPEG: transparency is shown on white, as a browser shows a transparent scan."""
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def _save(image: Image.Image, target: Path) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_into_place(target, lambda out: image.save(out, "JPEG", quality=JPEG_QUALITY))


def _write_into_place(target: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Write under a temporary name and rename into place: a reader never sees half a preview."""
    temp = target.parent / f".preview-{secrets.token_hex(8)}.tmp"
    try:
        with open(temp, "xb") as out:
            fill(out)
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


@dataclass
class PreviewTask:
    """One job's preview, made at most once from whichever copy of the image reaches it first.

    Handed to preflight and the output pipeline as their `preview` callback; a caller that holds
    only the file calls it afterwards with the path, which does nothing if the image came first.
    """

    folder: Path
    job_id: int
    kind: str
    upright: bool = False
    tried: bool = False

    def __call__(self, source: Image.Image | Path) -> None:
        if not self.tried:
            self.tried = True
            write_preview(source, self.folder, self.job_id, self.kind, upright=self.upright)


def wanted(config: Config, job_id: int, kind: str, *, unless_newer_than: Path | None = None,
           upright: bool = False) -> PreviewTask | None:
    """The preview to make for a job now, or None: previews are off, or one written since the file
    `unless_newer_than` (the scan) last changed is there already."""
    folder = enabled_folder(config)
    if folder is None:
        return None
    if unless_newer_than is not None:
        try:
            made = os.stat(preview_path(folder, job_id, kind), follow_symlinks=False).st_mtime_ns
            if made >= os.stat(unless_newer_than, follow_symlinks=False).st_mtime_ns:
                return None
        except OSError:
            pass  # none yet (or the scan is gone): make it
    return PreviewTask(folder, job_id, kind, upright)


def copy_preview(folder: Path, from_job: int, to_job: int, kind: str) -> Path | None:
    """Give `to_job` a copy of `from_job`'s preview (a reused result); None if it has none or on error."""
    source = open_preview(folder, from_job, kind)
    if source is None:
        return None
    try:
        with source:
            target = preview_path(folder, to_job, kind)
            _write_into_place(target, lambda out: shutil.copyfileobj(source, out))
    except (OSError, ValueError) as exc:
        log.warning("preview.failed", job_id=to_job, kind=kind, error=str(exc) or type(exc).__name__)
        return None
    return target


# --------------------------------------------------------------------------- serving and sweeping


def open_preview(folder: Path, job_id: int, kind: str) -> BinaryIO | None:
    """The preview opened for reading, or None: a bad id or kind, missing, a link, or not a regular file.

    What the dashboard serves; it also checks that the job is in the journal.
    """
    try:
        path = preview_path(folder, job_id, kind)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (ValueError, OSError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def sweep_previews(folder: Path, is_finished: Callable[[int], bool], older_than: float) -> int:
    """Remove previews last written before `older_than` (wall-clock seconds) whose job is finished or
    unknown (`is_finished`), and temporaries older than that; returns how many were removed.

    One stat per entry, and `is_finished` is asked only about old previews, once per job. Names
    that are not ours are left alone.
    """
    removed = 0
    finished: dict[int, bool] = {}
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        named = NAME.fullmatch(entry.name)
        if named is None and TEMP.fullmatch(entry.name) is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if st.st_mtime >= older_than or stat.S_ISDIR(st.st_mode):
            continue
        if named is not None:
            job_id = int(named["job_id"])
            if job_id not in finished:
                finished[job_id] = is_finished(job_id)
            if not finished[job_id]:
                continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    return removed
