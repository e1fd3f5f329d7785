"""Hosting adapters: how a scan becomes a URL the provider can fetch. One registry entry per adapter."""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config
from .base import HostingAdapter, HostingError, key_for_logs, new_key
from .builtin import BuiltinHost
from .command import CommandHost
from .s3 import S3Host
from .webdav import WebdavHost

ADAPTERS: dict[str, Callable[[Config], HostingAdapter]] = {
    "builtin": lambda config: BuiltinHost.from_config(config.hosting.builtin),
    "s3": lambda config: S3Host(config.hosting.s3, config.hosting.s3.expiry_for(config.api.job_timeout),
                                connect_timeout=config.api.connect_timeout, read_timeout=config.api.read_timeout),
    "command": lambda config: CommandHost(config.hosting.command),
    "webdav": lambda config: WebdavHost(config.hosting.webdav, connect_timeout=config.api.connect_timeout,
                                        read_timeout=config.api.read_timeout),
}


def create_adapter(config: Config) -> HostingAdapter:
    """The adapter named by `hosting.adapter` (already validated against ADAPTERS' names)."""
    return ADAPTERS[config.hosting.adapter](config)


__all__ = ["ADAPTERS", "BuiltinHost", "CommandHost", "HostingAdapter", "HostingError", "S3Host", "WebdavHost",
           "create_adapter", "key_for_logs", "new_key"]
