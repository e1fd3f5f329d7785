"""Every bad file a scanner can drop is caught before any money is spent; good files beside it are not hurt.

One run of the real daemon (a child process, the emulator on loopback) serves the whole module: its
inbox holds every kind of bad input at once, each in its own folder beside a good scan, plus formats
that must be converted and names that must be left alone. Each test then checks one outcome of that
run. When the tests run as root, the daemon runs without root's power to read any file, so an
unreadable file really is one.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import random
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageStat

from daemon.demo import make_photo
from daemon.emulator import GatewayEmulator, render_output

from .conftest import API_KEY, DaemonProcess, config_mapping, write_config

MAX_PIXELS = 250_000
"""preflight.max_pixels for this run: every good scan is far below it, the bombs far above."""
UPSCALE = 2


# --------------------------------------------------------------------------- making the files


def photo(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A small old-photo-like RGB scan; its film grain differs on every call, so no two are duplicates."""
    with tempfile.TemporaryDirectory() as scratch:
        path = make_photo(Path(scratch) / "photo.png", *size, seed=seed, format="PNG")
        with Image.open(path) as image:
            return image.convert("RGB")


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg(seed: int) -> bytes:
    return encoded(photo(seed), "JPEG", quality=90)


def corrupt_png(seed: int) -> bytes:
    """A real PNG with 64 bytes of garbage written over the middle of its image data."""
    data = encoded(photo(seed), "PNG")
    middle = len(data) // 2
    garbage = random.Random(seed).randbytes(64)
    return data[:middle] + garbage + data[middle + 64:]


def claiming_size(png: bytes, width: int, height: int) -> bytes:
    """The same small PNG with a valid IHDR that claims another size: a bomb in a few hundred bytes."""
    header = struct.pack(">II", width, height) + png[24:29]  # keep bit depth, colour type, ...
    return png[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + png[33:]


GRADIENT_SIZE = (160, 120)


def grey_16_bit_gradient() -> Image.Image:
    """Left black to right white over the full 16-bit range: clipping or a wrong scale shows at once."""
    width, height = GRADIENT_SIZE
    row = b"".join(struct.pack("<H", x * 65535 // (width - 1)) for x in range(width))
    return Image.frombytes("I;16", GRADIENT_SIZE, row * height)


def grey_8_bit_gradient() -> Image.Image:
    """What the 16-bit gradient must become for the upload: the top 8 bits of each value."""
    width, height = GRADIENT_SIZE
    row = bytes((x * 65535 // (width - 1)) >> 8 for x in range(width))
    return Image.frombytes("L", GRADIENT_SIZE, row * height)


def cmyk(image: Image.Image) -> Image.Image:
    return image.convert("CMYK")


# --------------------------------------------------------------------------- what is dropped


@dataclass(frozen=True)
class BadInput:
    """A file the daemon must refuse before publishing, and what its failed/ record must say."""

    rel_path: str
    reason: str
    """Words the .error.json and the job.failed log event must contain (case-insensitive)."""
    content: bytes = b""
    link_to: str | None = None
    """For a symbolic link: its target, relative to the test's root folder."""
    late: bool = False
    """Dropped while the daemon runs (seen through events) rather than before it starts (a scan)."""
    unreadable: bool = False


BAD_INPUTS = [
    BadInput("empty/scan.jpg", "empty (0 bytes)"),
    BadInput("text/scan.jpg", "not an image", b"Scanned by the office copier, page 1 of 3\n" * 20),
    BadInput("truncated/scan.jpg", "truncated", jpeg(21)[:2000]),
    BadInput("corrupt/scan.png", "corrupt", corrupt_png(22)),
    BadInput("bomb/flat.png", "over preflight.max_pixels", encoded(Image.new("L", (1000, 1000), 128), "PNG")),
    BadInput("bomb/forged header.png", "100000x100000 = 10000000000 pixels, over preflight.max_pixels",
             claiming_size(encoded(photo(23, (16, 16)), "PNG"), 100_000, 100_000)),
    BadInput("links/outside.jpg", "symbolic link", link_to="outside/private.jpg"),
    BadInput("links/inside.jpg", "symbolic link", link_to="inbox/links/good.jpg"),
    BadInput("links/album", "symbolic link", link_to="outside/album"),
    BadInput("late links/outside.jpg", "symbolic link", link_to="outside/private.jpg", late=True),
    BadInput("late links/album", "symbolic link", link_to="outside/album", late=True),
    BadInput("locked/scan.jpg", "permission denied", jpeg(24), unreadable=True),
]

OUTSIDE = {"outside/private.jpg": jpeg(31), "outside/album/photo.jpg": jpeg(32)}
"""Good images outside the inbox that only links point at: never fetched, never moved."""


@dataclass(frozen=True)
class Conversion:
    """A scan in a format the provider may not take, and the 8-bit pixels it must be uploaded as."""

    content: bytes
    pixels: Image.Image
    tolerance: float
    """Mean difference allowed per channel: a lossy format differs a little from what it was made of."""


def converted_from(pixels: Image.Image, fmt: str, tolerance: float, **options: Any) -> Conversion:
    return Conversion(encoded(pixels, fmt, **options), pixels, tolerance)


CONVERSIONS = {
    "formats/tiff.tif": converted_from(photo(41), "TIFF", 0.5),
    "formats/bmp.bmp": converted_from(photo(42), "BMP", 0.5),
    "formats/webp.webp": converted_from(photo(43), "WEBP", 4.0, quality=95),
    "formats/cmyk.jpg": Conversion(encoded(cmyk(rgb := photo(44)), "JPEG", quality=95), rgb, 4.0),
    "formats/grey16.png": Conversion(encoded(grey_16_bit_gradient(), "PNG"), grey_8_bit_gradient(), 1.0),
}

VANISHING = ("vanishing/scan.jpg", jpeg(51))
SKIPPED = {"skipped/.hidden.jpg": jpeg(60), "skipped/x.part": jpeg(61)}


def good_neighbours() -> dict[str, bytes]:
    """One good scan in every folder that holds a bad input, each with its own content."""
    folders = sorted({str(Path(bad.rel_path).parent) for bad in BAD_INPUTS})
    return {f"{folder}/good.jpg": jpeg(100 + i) for i, folder in enumerate(folders)}


# --------------------------------------------------------------------------- the one run


@dataclass
class Run:
    root: Path
    daemon: DaemonProcess
    emulator: GatewayEmulator
    good: dict[str, bytes]
    """Every file that must be restored: rel_path -> its bytes."""
    inodes: dict[str, int]
    """The inode of each bad input as dropped: what lands in failed/ must be that very file or link."""
    behind: dict[str, list[bytes]]
    """The bytes each bad input holds or leads to (through its link) when dropped."""

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    def events(self, event: str, rel_path: str) -> list[dict[str, Any]]:
        return [e for e in self.daemon.events() if e.get("event") == event and e.get("rel_path") == rel_path]

    def times_fetched(self, content: bytes) -> int:
        return self.emulator.submits_by_content().get(hashlib.sha256(content).hexdigest(), 0)


PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def without_root_file_access() -> None:
    """In the daemon's child process: give up root's power to read files whatever their mode.

    Root reads a mode-000 file anyway, and switching to an unprivileged user is not always possible
    (the interpreter may live in root's 0700 home), so drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    from the bounding set: after exec, root obeys permission bits like any other user.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def drop_bad_input(root: Path, bad: BadInput) -> tuple[int, list[bytes]]:
    """Put `bad` in the inbox; returns its inode and the bytes it holds or its link leads to."""
    path = root / "inbox" / bad.rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    if bad.link_to is None:
        write(path, bad.content)
        behind = [bad.content]
    else:
        target = root / bad.link_to
        path.symlink_to(target)
        behind = [p.read_bytes() for p in sorted([target] if target.is_file() else target.rglob("*.jpg"))]
    if bad.unreadable:
        path.chmod(0o000)
    return os.lstat(path).st_ino, behind


def drop_and_delete(path: Path, content: bytes) -> None:
    """A scan that disappears well within the settle time: a user who changed their mind."""
    write(path, content)
    time.sleep(0.05)
    path.unlink()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("bad-inputs")
    emulator = GatewayEmulator(api_key=API_KEY, latency=0.2).start()
    daemon = None
    try:
        good = {**good_neighbours(), **{rel: conversion.content for rel, conversion in CONVERSIONS.items()}}
        for rel, content in {**good, **OUTSIDE}.items():
            write(root / ("inbox/" + rel if rel in good else rel), content)
        dropped = {bad.rel_path: drop_bad_input(root, bad) for bad in BAD_INPUTS if not bad.late}
        mapping = config_mapping({name: root / name for name in ("inbox", "outbox", "archive", "failed", "state")},
                                 emulator, preflight={"max_pixels": MAX_PIXELS},
                                 restore={"upscale": UPSCALE})
        daemon = DaemonProcess(write_config(root / "config.yaml", mapping), root / "daemon.log",
                               preexec_fn=without_root_file_access if os.geteuid() == 0 else None).start()
        daemon.wait_ready()
        dropped.update({bad.rel_path: drop_bad_input(root, bad) for bad in BAD_INPUTS if bad.late})
        drop_and_delete(root / "inbox" / VANISHING[0], VANISHING[1])
        for rel, content in SKIPPED.items():
            write(root / "inbox" / rel, content)
        done = Run(root, daemon, emulator, good, inodes={rel: ino for rel, (ino, _) in dropped.items()},
                   behind={rel: behind for rel, (_, behind) in dropped.items()})
        # No pytest.fail on a timeout: each test then reports which outcome is missing.
        # Outputs and error records come first; the originals' archiving and `job.failed` just after.
        wait_until(lambda: all((root / "outbox" / rel).with_suffix(".png").exists() for rel in good)
                   and all(error_record(root, bad.rel_path).exists() for bad in BAD_INPUTS)
                   and all((root / "archive" / rel).exists() for rel in good)
                   and sum(e.get("event") == "job.failed" for e in daemon.events()) >= len(BAD_INPUTS), timeout=30)
        yield done
    finally:
        if daemon is not None:
            daemon.kill()
        emulator.stop()


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def error_record(root: Path, rel_path: str) -> Path:
    return root / "failed" / (rel_path + ".error.json")


# --------------------------------------------------------------------------- each bad input


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.rel_path for b in BAD_INPUTS])
def test_a_bad_input_is_explained_in_failed_and_never_sent(run, bad):
    for content in run.behind[bad.rel_path]:
        sent_as_a_good_file = content in run.good.values()  # a link to a good scan in the inbox
        assert run.times_fetched(content) == (1 if sent_as_a_good_file else 0)

    failed = run.root / "failed" / bad.rel_path
    assert os.lstat(failed).st_ino == run.inodes[bad.rel_path], "the very file (or link) dropped is in failed/"
    assert not os.path.lexists(run.inbox / bad.rel_path)
    if bad.link_to is not None:
        assert failed.is_symlink() and os.readlink(failed) == str(run.root / bad.link_to)
    record = json.loads(error_record(run.root, bad.rel_path).read_text(encoding="utf-8"))
    assert record["file"] == bad.rel_path and record["stage"] == "preflight"
    assert bad.reason in record["reason"].lower() and record["request_id"] is None

    [event] = run.events("job.failed", bad.rel_path)
    assert bad.reason in event["reason"].lower() and event["level"] == "error"
    assert run.events("file.published", bad.rel_path) == []

    neighbour = Path(bad.rel_path).parent / "good.jpg"
    assert (run.root / "outbox" / neighbour.with_suffix(".png")).exists()
    assert (run.root / "archive" / neighbour).read_bytes() == run.good[str(neighbour)]


def test_only_the_good_files_were_submitted_and_the_daemon_kept_running(run):
    stats = run.emulator.stats()
    assert stats["submits_received"] == stats["submits_accepted"] == len(run.good)
    sent_as_they_are = [content for rel, content in run.good.items() if rel not in CONVERSIONS]
    assert all(run.times_fetched(content) == 1 for content in sent_as_they_are)
    assert run.daemon.proc.poll() is None, "the daemon is still running"
    assert [e for e in run.daemon.events() if e.get("level") == "error" and e.get("event") != "job.failed"] == []


def test_links_never_touch_what_they_point_at(run):
    for rel, content in OUTSIDE.items():
        path = run.root / rel
        assert path.read_bytes() == content and path.stat().st_nlink == 1, rel
        assert run.times_fetched(content) == 0, rel
    assert sorted(p.name for p in (run.root / "outside" / "album").iterdir()) == ["photo.jpg"]
    for folder in ("links", "late links"):  # nothing restored through a link: only the good neighbour
        assert sorted(p.name for p in (run.root / "outbox" / folder).iterdir()) == ["good.png"]


# --------------------------------------------------------------------------- formats that are converted


@pytest.mark.parametrize("rel_path", list(CONVERSIONS))
def test_a_format_the_provider_may_not_take_is_converted_and_restored(run, rel_path):
    conversion = CONVERSIONS[rel_path]
    [converted] = run.events("file.converted", rel_path)
    with Image.open(run.root / "outbox" / Path(rel_path).with_suffix(".png")) as output:
        pixels = conversion.pixels
        assert output.size == (pixels.width * UPSCALE, pixels.height * UPSCALE)
        expected = Image.open(io.BytesIO(render_output(pixels, UPSCALE)))  # what the emulator makes of the right pixels
        difference = ImageStat.Stat(ImageChops.difference(output.convert(pixels.mode), expected)).mean
    assert max(difference) <= conversion.tolerance, (converted["source_format"], difference)
    assert (run.root / "archive" / rel_path).read_bytes() == conversion.content


# --------------------------------------------------------------------------- files that are not work


def test_a_file_deleted_before_it_is_taken_is_forgotten_quietly(run):
    rel_path, content = VANISHING
    assert not os.path.lexists(run.inbox / rel_path)
    assert not (run.root / "failed" / "vanishing").exists()
    assert not (run.root / "outbox" / "vanishing").exists()
    assert [e for e in run.daemon.events() if e.get("rel_path") == rel_path and e.get("level") != "info"] == []
    assert run.times_fetched(content) == 0


@pytest.mark.parametrize("rel_path", list(SKIPPED))
def test_temporary_and_hidden_names_are_left_alone(run, rel_path):
    assert (run.inbox / rel_path).read_bytes() == SKIPPED[rel_path]
    assert not (run.root / "failed" / "skipped").exists() and not (run.root / "outbox" / "skipped").exists()
    assert [e for e in run.daemon.events() if e.get("rel_path") == rel_path] == []
    assert run.times_fetched(SKIPPED[rel_path]) == 0


def test_an_io_error_of_the_share_is_not_a_verdict_on_the_scan():
    """EIO/ESTALE from an SMB or NFS hiccup keep the job (retried later); only the file's own
    problems (permission, a link, gone) and decode errors make it a bad file."""
    import errno

    from daemon.preflight import is_environment_fault

    for code in (errno.EIO, errno.ESTALE, errno.EHOSTDOWN, errno.ENOTCONN):
        assert is_environment_fault(OSError(code, os.strerror(code)))
    for code in (errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOENT):
        assert not is_environment_fault(OSError(code, os.strerror(code)))
    assert not is_environment_fault(OSError("image file is truncated"))  # Pillow's, without an errno
