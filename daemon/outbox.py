"""Where files end up: atomic writes into the outbox, moves to the archive and to failed/.

A reader of the outbox never sees a partial file: results are written to a hidden temporary file in
the target folder, fsynced, then linked into place under a name that did not exist (so nothing is
ever overwritten), and the folder is fsynced. Moves across file systems copy, fsync, then remove;
where the file system refuses a hard link they rename. A symbolic link is always moved as the link
itself, never as what it points at.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import json
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

TEMP_PREFIX = ".codeformer-"
TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class Folders:
    outbox: Path
    archive: Path
    failed: Path

    def output_path(self, rel_path: str, extension: str) -> Path:
        """inbox/<rel>/<name> -> outbox/<rel>/<stem><extension> (the output format's: .jpg, .png, .tif, .webp)"""
        rel = PurePosixPath(rel_path)
        return self.outbox.joinpath(*rel.parent.parts, rel.stem + extension)

    def archive_path(self, rel_path: str) -> Path:
        return self.archive.joinpath(*PurePosixPath(rel_path).parts)

    def failed_path(self, rel_path: str) -> Path:
        return self.failed.joinpath(*PurePosixPath(rel_path).parts)


def numbered(path: Path, n: int) -> Path:
    """photo.png, photo-1.png, photo-2.png, ... (n = 0 is the plain name)."""
    return path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(path: Path) -> bool:
    return path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX)


@contextlib.contextmanager
def temporary_file(directory: Path) -> Iterator[tuple[Path, BinaryIO]]:
    """A hidden temporary file in `directory`, removed if the block fails or never claims it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
    f = open(path, "xb")
    try:
        yield path, f
    finally:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV)
"""What os.link raises on file systems (or across them) that cannot hard-link."""

_PLACING = threading.Lock()
"""Serialises check-then-replace where hard links are missing, so two workers cannot take one name."""


def place(temp: Path, target: Path) -> None:
    """Put the finished, fsynced `temp` at exactly `target`; FileExistsError if the name is taken.

    `os.link` fails if the name exists, so an existing file is never overwritten even if another
    program creates it at the same moment. File systems without hard links fall back to a check
    and `os.replace`, which is still atomic for readers.
    """
    try:
        os.link(temp, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        with _PLACING:
            if target.exists():
                raise FileExistsError(errno.EEXIST, "name already taken", str(target)) from None
            os.replace(temp, target)
    else:
        temp.unlink()
    fsync_dir(target.parent)


def claim_name(temp: Path, wanted: Path) -> Path:
    """Place `temp` under `wanted` or the first free numbered name; returns the name it got."""
    for n in range(10_000):
        candidate = numbered(wanted, n)
        try:
            place(temp, candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free name", str(wanted))


def finish_temp(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def free_name(wanted: Path) -> Path:
    """The first of wanted, wanted-1, wanted-2, ... that does not exist yet."""
    n = 0
    while os.path.lexists(numbered(wanted, n)):  # a dangling link still takes its name
        n += 1
    return numbered(wanted, n)


def _same_content(a: Path, b: Path) -> bool:
    """Same file or same bytes; two links are the same when they point at the same place."""
    try:
        if os.path.islink(a) or os.path.islink(b):
            return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def move_to(source: Path, target: Path) -> None:
    """Move `source` to exactly `target`, durably; safe to run again after a crash part-way.

    The caller picks `target` (a free name) and records it first. If `target` already holds the
    same content, an earlier attempt got that far and only the source is left to remove. If it
    holds something else, FileExistsError: the caller picks another name. Never overwrites.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target):
        if not _same_content(source, target):
            raise FileExistsError(errno.EEXIST, "a different file already has this name", str(target))
    else:
        try:
            # Same file system: atomic and never clobbers; a link is linked as itself, not followed.
            os.link(source, target, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                _copy_into_place(source, target)
            elif exc.errno in NO_HARD_LINKS:
                _rename_into_place(source, target)
                fsync_dir(target.parent)
                fsync_dir(source.parent)
                return
            else:
                raise
        fsync_dir(target.parent)
    source.unlink()
    fsync_dir(source.parent)


def move_file(source: Path, wanted: Path) -> Path:
    """Move `source` to `wanted` or the first free numbered name; returns where it went."""
    while True:
        target = free_name(wanted)
        try:
            move_to(source, target)
            return target
        except FileExistsError:
            continue  # another program took the name between the check and the move


def _rename_into_place(source: Path, target: Path) -> None:
    """Same file system, but no hard link: unsupported, or refused for a file this user may not read
    (fs.protected_hardlinks). A rename needs only the folders to be writable; check-then-rename is
    serialised like `place`."""
    with _PLACING:
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "name already taken", str(target))
        os.rename(source, target)


def _copy_into_place(source: Path, target: Path) -> None:
    """Across file systems: copy to a temporary file beside `target`, fsync, then link it in.

    A symbolic link is re-created as a link (os.symlink never clobbers), never copied through.
    """
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    with temporary_file(target.parent) as (temp, f):
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1024 * 1024)
        finish_temp(f)
        shutil.copystat(source, temp)
        place(temp, target)


def write_json_atomically(path: Path, data: dict[str, Any]) -> Path:
    """Write a small JSON record with the same temp-fsync-link dance; returns its final path."""
    with temporary_file(path.parent) as (temp, f):
        f.write(json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
        finish_temp(f)
        return claim_name(temp, path)


def remove_temporaries(directory: Path, progress: Callable[[], None] = lambda: None,
                       older_than: float | None = None) -> int:
    """Delete temporary files a crash left in `directory` (recursively); returns how many.

    `progress` is called for each folder walked (a large archive takes a while). With `older_than`
    (wall time), only those last written before it: in shared folders, a newer one may be another
    daemon's write in progress.
    """
    removed = 0
    if not directory.is_dir():
        return 0
    for dirpath, _dirnames, filenames in os.walk(directory):
        progress()
        for name in filenames:
            path = Path(dirpath) / name
            if is_temporary(path):
                with contextlib.suppress(FileNotFoundError):
                    if older_than is not None and path.stat().st_mtime >= older_than:
                        continue
                    path.unlink()
                    removed += 1
    return removed
