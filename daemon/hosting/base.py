"""The one small interface every hosting adapter fulfils.

The provider only fetches URLs, so each scan is published somewhere it can reach, and unpublished as
soon as its job no longer needs it. The caller picks the key (and records it in the journal) *before*
publishing, so a crash can never leave an object the daemon does not know about.
"""

from __future__ import annotations

import abc
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

KEY_BYTES = 32
"""256 random bits per published file: unguessable, and carries nothing of the original name."""


class HostingError(Exception):
    """Publishing or unpublishing failed; the message is safe to log (no secrets, no signed URLs)."""


def new_key(suffix: str) -> str:
    """A fresh random object key such as 'Zx3…Q.png'; the suffix only helps content sniffing."""
    return secrets.token_urlsafe(KEY_BYTES) + suffix


def open_regular_file(path: Path) -> BinaryIO | None:
    """`path` itself opened for reading, or None if it is gone or is a link, folder or device.

    Links are never followed, so a published path swapped for one is never read through; and
    O_NONBLOCK keeps a FIFO swapped in from hanging the reader (it changes nothing for files).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def open_for_upload(path: Path) -> BinaryIO:
    """`path` opened for publishing; HostingError unless it is a regular file and not a link."""
    f = open_regular_file(path)
    if f is None:
        raise HostingError(f"cannot publish {path}: not a regular file (links are never published)")
    return f


def check_regular_file(path: Path) -> None:
    """HostingError unless `path` is a regular file and not a link (for whoever reads it later)."""
    open_for_upload(path).close()


def key_for_logs(key: str) -> str:
    """Enough of a key to follow it through the logs, not enough to fetch it."""
    return key[:8] + "…"


class HostingAdapter(abc.ABC):
    """Makes local files fetchable by the provider for a while."""

    name: str = "abstract"
    serves_across_restarts: bool = True
    """False when what is published is served only while the daemon runs (the built-in host)."""

    def start(self) -> None:
        """Get ready to publish (bind a port, check a bucket). Called once before any publish."""

    @abc.abstractmethod
    def publish(self, key: str, path: Path, content_type: str) -> str:
        """Make `path` fetchable under `key` and return the URL to hand to the provider.

        Idempotent: publishing a key again replaces what it served. Raises HostingError.
        The returned URL may be a secret (a presigned URL): never log it, log `key_for_logs(key)`.
        """

    @abc.abstractmethod
    def unpublish(self, key: str) -> None:
        """Make `key` unfetchable. Idempotent: an unknown or already removed key is not an error."""

    def sweep(self, keep: set[str]) -> int:
        """Remove whatever this adapter published earlier whose key is not in `keep`.

        Called at start-up with the keys the journal still needs, to clear orphans of a crash.
        Returns how many were removed; adapters that keep nothing across restarts return 0.
        """
        return 0

    def stop(self) -> None:
        """Release what `start` took. Published keys the journal still needs survive if they can."""

    def open_callback(self, key: str, on_call: Callable[[], None]) -> str | None:
        """A URL that calls `on_call` when the provider POSTs to it (its completion webhook), or None.

        `key` is the published file's; the URL must carry nothing of it (the key fetches the scan,
        and a webhook URL travels in a header, maybe into the provider's logs). Opening again for
        the same key keeps the URL and replaces `on_call`. Only adapters that run a server reachable
        by the provider can offer one. The call is a hint, never trusted: the caller answers it by
        polling with its key.
        """
        return None

    def close_callback(self, key: str) -> None:
        """Forget the callback opened for the published file `key`; an unknown key is fine."""
