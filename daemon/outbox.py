"""Where files end up: atomic writes into the outbox, moves to the archive and to failed/.

A reader of the outbox never sees a partial file: results are written to a hidden temporary file in
the target folder, fsynced, then linked into place under a name that did not exist (so nothing is
ever overwritten), and the folder is fsynced. Moves across file systems copy, fsync, then remove.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
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

    def output_path(self, rel_path: str) -> Path:
        """inbox/<rel>/<name> -> outbox/<rel>/<stem>.png"""
        rel = PurePosixPath(rel_path)
        return self.outbox.joinpath(*rel.parent.parts, rel.stem + ".png")

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


def claim_name(temp: Path, wanted: Path) -> Path:
    """Put the finished, fsynced `temp` in place under `wanted` or the first free numbered name.

    `os.link` fails if the name exists, so an existing file is never overwritten even if another
    program creates it at the same moment. File systems without hard links fall back to a check
    and `os.replace`, which is still atomic for readers.
    """
    for n in range(10_000):
        candidate = numbered(wanted, n)
        try:
            os.link(temp, candidate)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            if candidate.exists():
                continue
            os.replace(temp, candidate)
        else:
            temp.unlink()
        fsync_dir(candidate.parent)
        return candidate
    raise FileExistsError(f"no free name for {wanted}")


def finish_temp(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def move_file(source: Path, wanted: Path) -> Path:
    """Move `source` to `wanted` (or a free numbered name) durably; returns where it went."""
    wanted.parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = numbered(wanted, n)
        if candidate.exists():
            continue
        try:
            os.link(source, candidate)  # same file system: atomic, and never clobbers
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return _copy_then_remove(source, wanted)
        fsync_dir(candidate.parent)
        source.unlink()
        fsync_dir(source.parent)
        return candidate
    raise FileExistsError(f"no free name for {wanted}")


def _copy_then_remove(source: Path, wanted: Path) -> Path:
    with temporary_file(wanted.parent) as (temp, f):
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1024 * 1024)
        finish_temp(f)
        shutil.copystat(source, temp)
        final = claim_name(temp, wanted)
    source.unlink()
    fsync_dir(source.parent)
    return final


def write_json_atomically(path: Path, data: dict[str, Any]) -> Path:
    """Write a small JSON record with the same temp-fsync-link dance; returns its final path."""
    with temporary_file(path.parent) as (temp, f):
        f.write(json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
        finish_temp(f)
        return claim_name(temp, path)


def remove_temporaries(directory: Path) -> int:
    """Delete temporary files a crash left in `directory` (recursively); returns how many."""
    removed = 0
    if not directory.is_dir():
        return 0
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name in filenames:
            path = Path(dirpath) / name
            if is_temporary(path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
    return removed
