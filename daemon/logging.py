"""structlog configuration: one place that shapes every log line, and one processor that hides secrets.

JSON lines by default when stderr is not a terminal (systemd, files), a readable console renderer
when it is. Secrets are removed in a processor, so no call site can forget: values of registered
secrets are masked wherever they appear, and fields whose names look secret are masked entirely.
Under systemd, when stderr is the journal's stream, each line starts with its syslog priority
(`<4>` for a warning), so `journalctl -p warning` picks the right lines.
"""

from __future__ import annotations

import logging as stdlib_logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import structlog

MASK = "***"
SECRET_FIELD = re.compile(r"(api_?key|secret|password|token|signature|credential|authorization)", re.I)
LEVELS = {"debug": stdlib_logging.DEBUG, "info": stdlib_logging.INFO,
          "warning": stdlib_logging.WARNING, "error": stdlib_logging.ERROR}

SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
"""syslog(3) priorities journald reads from a `<N>` line prefix (notice, 5, is not used)."""
_LEVEL_ALIASES = {"warn": "warning", "exception": "error", "fatal": "critical", "msg": "info"}

_secrets: frozenset[str] = frozenset()
"""Replaced whole (under the lock) when one is added, so every log line reads it without a lock."""
_secrets_lock = threading.Lock()
_secret_fields: dict[str, bool] = {}
"""Field name -> whether it names a secret: log fields are a small vocabulary, each matched once."""


def register_secret(value: str) -> None:
    """Mask `value` in every log line from now on (the API key, hosting credentials)."""
    global _secrets
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets = _secrets | {value}


def mask_secrets(text: str) -> str:
    """`text` with every registered secret masked: for error texts stored in the journal and records."""
    return _mask_text(text, _secrets)


def _is_secret_field(key: str) -> bool:
    known = _secret_fields.get(key)
    if known is None:
        known = _secret_fields[key] = bool(SECRET_FIELD.search(key))
    return known


def _mask_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _mask_value(value: Any, secrets: frozenset[str]) -> Any:
    if isinstance(value, str):
        return _mask_text(value, secrets)
    if isinstance(value, dict):
        return {k: _mask_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_mask_value(v, secrets) for v in value)
    if isinstance(value, BaseException):
        return _mask_text(f"{type(value).__name__}: {value}", secrets)
    return value


def redact_secrets(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: mask registered secret values anywhere, and secret-looking fields whole."""
    secrets = _secrets
    for key, value in list(event_dict.items()):
        if _is_secret_field(key):
            event_dict[key] = MASK
        else:
            event_dict[key] = _mask_value(value, secrets)
    return event_dict


def syslog_prefix(level: str) -> str:
    """The `<N>` prefix that gives a line its priority in the journal; an unknown level is info."""
    level = _LEVEL_ALIASES.get(level, level)
    return f"<{SYSLOG_PRIORITY.get(level, SYSLOG_PRIORITY['info'])}>"


def add_syslog_prefix(logger: Any, method_name: str, rendered: str) -> str:
    """structlog processor, after the renderer: the rendered line with its journal priority in front."""
    return syslog_prefix(method_name) + rendered


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True if `stream` is the journal stream systemd connected: $JOURNAL_STREAM is its "device:inode".

    Comparing both, as systemd.exec(5) advises, keeps the prefix out of a file or pipe that a child
    inherited the variable with.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset or malformed; a stream without a descriptor
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def configure(format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once, in the CLI entry point; safe to call again (reload)."""
    stream = stream or sys.stderr
    if format == "auto":
        format = "console" if stream.isatty() else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks as plain text: structlog's dict tracebacks can carry local variables (secrets).
        structlog.processors.format_exc_info,
        redact_secrets,  # after exceptions are rendered to text, so tracebacks are masked too
    ]
    if format == "json":
        processors.append(structlog.processors.JSONRenderer(default=str, ensure_ascii=False))
    else:
        # Named, not left to the default: with rich installed, structlog would render locals.
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty(),
                                                        exception_formatter=structlog.dev.plain_traceback))
    if writes_to_journal(stream):
        processors.append(add_syslog_prefix)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
