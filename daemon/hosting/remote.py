"""What the adapters that publish to someone else's storage (S3, command, WebDAV) share.

Their sweeps only ever delete names of the daemon's own key shape, so a prefix or folder shared by
mistake with other files loses nothing else; their uploads read the scan through a descriptor
opened without following links, like the built-in host; and their secrets come from files or
systemd credentials and are registered for masking the moment they are read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from ..logging import mask_secrets, register_secret
from .base import KEY_BYTES, HostingAdapter, HostingError, key_for_logs

log = structlog.get_logger("daemon.hosting")

_KEY_SHAPE = re.compile(r"[A-Za-z0-9_-]{%d}\.[A-Za-z0-9]{1,5}" % math.ceil(KEY_BYTES * 4 / 3))
ERROR_TAIL = 300
"""Characters of a server's answer or a command's stderr kept in an error text."""


def is_daemon_key(name: str) -> bool:
    """True for names `new_key` makes (256 random bits in URL-safe base64, then a suffix)."""
    return _KEY_SHAPE.fullmatch(name) is not None


def remove_orphans(host: HostingAdapter, names: Iterable[str], keep: set[str]) -> int:
    """Unpublish each of `names` of the daemon's key shape not in `keep`; one that fails is logged
    and skipped (the next start tries again). Returns how many were removed."""
    removed = 0
    for name in names:
        if not is_daemon_key(name) or name in keep:
            continue
        try:
            host.unpublish(name)
            removed += 1
        except HostingError as exc:
            log.warning("hosting.sweep_failed", adapter=host.name, key=key_for_logs(name), error=str(exc))
    return removed


def read_secret(path: Path, key: str) -> str:
    """A secret kept in a file (one line), registered for masking; HostingError naming `key` otherwise."""
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise HostingError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise HostingError(f"{key}: {path} is empty")
    register_secret(value)
    return value


def read_credential(name: str, environ: Mapping[str, str]) -> str | None:
    """The systemd credential `name` ($CREDENTIALS_DIRECTORY/name), registered for masking, or None."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory or not (Path(directory) / name).is_file():
        return None
    return read_secret(Path(directory) / name, f"credential {name}")


def tail(text: str | bytes, *, hide: str | None = None, limit: int = ERROR_TAIL) -> str:
    """The end of a command's stderr or a server's answer, safe for an error text.

    One line, at most `limit` characters, registered secrets masked, and the key `hide` shortened
    as in the logs (the key is the capability to fetch a file wherever the URL is public).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = mask_secrets(text)
    if hide:
        text = text.replace(hide, key_for_logs(hide))
    text = " ".join(text.split())
    return text if len(text) <= limit else "…" + text[-limit:]
