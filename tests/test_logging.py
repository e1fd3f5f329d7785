"""Secrets never reach a log line: the real processor chain, as `configure` sets it up."""

from __future__ import annotations

import io
import json

import structlog

from daemon import logging as daemon_logging


def test_registered_secrets_are_masked_everywhere_in_a_json_line():
    stream = io.StringIO()
    daemon_logging.register_secret("sk-live-0123456789")
    daemon_logging.configure("json", "debug", stream=stream)
    log = structlog.get_logger("test")
    log.info("submit.failed", error="header value 'sk-live-0123456789' is invalid",
             nested={"headers": ["x", "Bearer sk-live-0123456789"]}, api_key="anything", password="p")
    try:
        raise ValueError("boom with sk-live-0123456789 inside")
    except ValueError:
        log.error("crash", exc_info=True)
    text = stream.getvalue()
    assert "sk-live-0123456789" not in text
    first, second = [json.loads(line) for line in text.splitlines()]
    assert first["error"] == "header value '***' is invalid"
    assert first["nested"] == {"headers": ["x", "Bearer ***"]}
    assert first["api_key"] == "***" and first["password"] == "***"
    assert "boom with ***" in second["exception"]


def test_mask_secrets_for_stored_error_texts():
    daemon_logging.register_secret("another-secret-42")
    assert daemon_logging.mask_secrets("failed: another-secret-42!") == "failed: ***!"
