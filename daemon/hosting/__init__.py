"""Hosting adapters: how a scan becomes a URL the provider can fetch. One registry entry per adapter."""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config
from .base import HostingAdapter, HostingError, key_for_logs, new_key
from .builtin import BuiltinHost

ADAPTERS: dict[str, Callable[[Config], HostingAdapter]] = {
    "builtin": lambda config: BuiltinHost.from_config(config.hosting.builtin),
}


def create_adapter(config: Config) -> HostingAdapter:
    """The adapter named by `hosting.adapter` (already validated against ADAPTERS' names)."""
    return ADAPTERS[config.hosting.adapter](config)


__all__ = ["ADAPTERS", "BuiltinHost", "HostingAdapter", "HostingError", "create_adapter", "key_for_logs", "new_key"]
