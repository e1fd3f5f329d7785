"""Per-folder settings: the restore parameters and output settings each scan is taken with.

Three layers, merged key by key, each over the one before: the configuration's top level, the first
profile whose `match` fits the file's path in the inbox, then the `codeformer.yaml` files of the
file's folder and of each folder above it inside the inbox, shallowest first (so the deepest wins).
A job records the result when its file is taken: a later edit or reload changes only files taken
after it.

A folder file is read when a file in its scope is taken, through a cache keyed by its mtime, size
and inode: a burst of files costs a stat per folder file, and an edit is seen at once. An invalid
one holds the files in its scope in the inbox (never failed) until it is fixed. `upscale: auto` is
decided per scan once its size is known (`resolve_upscale`, at the check before its submit).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from .config import (FOLDER_SETTINGS_FILE, PROFILE_SECTIONS, UPSCALE_AUTO, Config, ConfigError, OutputConfig,
                     ProfileConfig, RestoreConfig, output_with, restore_with)

log = structlog.get_logger("daemon.profiles")

HELD_RETRY_SECONDS = 2.0
"""How often files held by an invalid folder file are offered again (and the file read again, if
changed); an edit the watcher reports is seen at once."""

SETTINGS_META = "settings_invalid"
"""Journal meta key: JSON of folder file -> why it is invalid, while any holds files (for `status`)."""

AUTO_RULE_KEYS = ("max_upscale", "max_output_megapixels")
"""What a job's params carry beside `upscale: auto` until its factor is chosen; never sent."""


# --------------------------------------------------------------------------- which profile


def glob_matches(pattern: str, rel_path: str) -> bool:
    """Whether a profile's `match` fits a file's path relative to the inbox ("a/b/scan.jpg").

    `*`, `?` and `[...]` stay within one folder level, so `*.tif` fits only files at the top;
    `**` as a whole level is any number of levels, none included (`**/*.tif` fits `a.tif` too, and
    `portraits/**` everything below portraits). Case is ignored: scans come from Windows and macOS
    shares, where `Portraits` and `portraits` are one folder. A leading `/` is the inbox itself and
    changes nothing; a trailing `/` means everything below (`portraits/` is `portraits/**`).
    """
    return _compiled(pattern).fullmatch(rel_path) is not None


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip().lstrip("/")
    if pattern.endswith("/"):
        pattern += "**"
    levels = pattern.split("/")
    regex = ""
    for index, level in enumerate(levels):
        last = index == len(levels) - 1
        if level == "**":
            regex += ".*" if last else "(?:.*/)?"
        else:
            regex += _level(level) + ("" if last else "/")
    return re.compile(regex, re.IGNORECASE | re.DOTALL)


def _level(text: str) -> str:
    """One folder level of a pattern as a regex: `*`, `?` and `[...]` never match a `/`."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "*":
            out.append("[^/]*")
            while i + 1 < len(text) and text[i + 1] == "*":  # a** inside a level is a*
                i += 1
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := text.find("]", i + 2)) != -1:  # a ] right after [ is part of the set
            body = text[i + 1:end].replace("\\", "\\\\")
            body = "^" + body[1:] if body[0] == "!" else ("\\" + body if body[0] == "^" else body)
            out.append(f"(?!/)[{body}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def first_profile(profiles: Sequence[ProfileConfig], rel_path: str) -> ProfileConfig | None:
    """The first profile whose `match` fits; None: the top level alone."""
    return next((p for p in profiles if glob_matches(p.match, rel_path)), None)


# --------------------------------------------------------------------------- automatic upscale


def choose_upscale(width: int, height: int, max_upscale: int, max_output_megapixels: float) -> int:
    """The largest factor up to `max_upscale` whose output (width*f by height*f) stays within
    `max_output_megapixels`; 1 when none does (the provider never makes a scan smaller)."""
    limit = max_output_megapixels * 1_000_000
    for factor in range(max_upscale, 1, -1):
        if width * factor * height * factor <= limit:
            return factor
    return 1


def resolve_upscale(params: Mapping[str, Any], width: int, height: int) -> dict[str, Any]:
    """`params` with `upscale: auto` turned into the factor for a scan of this size, its rule dropped:
    what the provider is sent and what identical jobs compare. Other params come back unchanged."""
    if params.get("upscale") != UPSCALE_AUTO:
        return dict(params)
    defaults = RestoreConfig()
    factor = choose_upscale(width, height, int(params.get("max_upscale", defaults.max_upscale)),
                            float(params.get("max_output_megapixels", defaults.max_output_megapixels)))
    return {k: v for k, v in params.items() if k not in AUTO_RULE_KEYS} | {"upscale": factor}


# --------------------------------------------------------------------------- output settings


def output_settings(output: OutputConfig) -> dict[str, Any]:
    """What a job records of its `output:` settings: all but signing, which is always the top level's."""
    return {f.name: getattr(output, f.name) for f in dataclasses.fields(output) if f.name != "c2pa"}


def output_config(recorded: Mapping[str, Any] | None, current: OutputConfig) -> OutputConfig:
    """The settings a job's result is delivered with: those recorded when its file was taken, over the
    current ones (all of them for a job taken before they were recorded; signing always)."""
    if not recorded:
        return current
    names = {f.name for f in dataclasses.fields(current)} - {"c2pa"}
    return dataclasses.replace(current, **{k: v for k, v in recorded.items() if k in names})


# --------------------------------------------------------------------------- folder files


@dataclass(frozen=True)
class Settings:
    """What a file is taken with; recorded in its job."""

    profile: str | None
    """The profile and folder files that applied ("portraits + portraits/codeformer.yaml"); None: the top level."""
    params: dict[str, Any]
    output: dict[str, Any]


@dataclass(frozen=True)
class Held:
    """A file that waits in the inbox because of a folder settings file in its scope."""

    file: str
    """The folder file, relative to the inbox."""
    reason: str | None
    """What is wrong with it; None: it changed a moment ago and may still be being written."""


@dataclass(frozen=True)
class FolderFile:
    """One valid `codeformer.yaml`: the keys it sets (as in the YAML)."""

    rel: str
    restore: dict[str, Any]
    output: dict[str, Any]


def parse_folder_file(text: str, rel: str) -> FolderFile:
    """Read one folder file's text; ConfigError naming the file, then the key as the configuration does
    ("a/codeformer.yaml: restore.upscale: 9 is out of range, allowed 1 to 8")."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{rel}: not valid YAML ({getattr(exc, 'problem', None) or exc}{where})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{rel}: expected a mapping with restore: and output:, got {type(data).__name__}")
    unknown = sorted(set(data) - set(PROFILE_SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"{rel}: {unknown[0]}: unknown key (allowed here: {', '.join(PROFILE_SECTIONS)})")
    sections: dict[str, dict[str, Any]] = {}
    for section in PROFILE_SECTIONS:
        value = data.get(section)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{rel}: {section}: expected a mapping of keys, got {type(value).__name__}")
        sections[section] = dict(value or {})
    try:  # each key checked alone; merged over any base later, none can fail then
        restore_with(RestoreConfig(), sections["restore"])
        output_with(OutputConfig(), sections["output"])
    except ConfigError as exc:
        raise ConfigError(f"{rel}: {exc}") from None
    return FolderFile(rel, sections["restore"], sections["output"])


def folder_file_of(folder: str) -> str:
    """The settings file of a folder given relative to the inbox ("" is the inbox itself)."""
    return posixpath.join(folder, FOLDER_SETTINGS_FILE) if folder else FOLDER_SETTINGS_FILE


def folders_above(rel_path: str) -> list[str]:
    """The folders whose settings apply to a file, the inbox ("") first: "a/b/x.jpg" -> "", "a", "a/b"."""
    parts = rel_path.split("/")[:-1]
    return [""] + ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]


class FolderSettings:
    """The settings each file is taken with, reading folder files through a cache (see the module).

    Used by the scheduler's loop alone. `problems` holds the folder files found invalid, until
    each is read again and found fixed (or gone): `recheck` does that without a file to take.
    """

    def __init__(self, inbox: Path, wall: Callable[[], float] = time.time) -> None:
        self.inbox = Path(inbox)
        self._wall = wall
        self._cache: dict[str, tuple[tuple[int, int, int], FolderFile | str]] = {}
        """folder file -> ((mtime_ns, size, inode), what it held: a FolderFile or the problem)."""
        self.problems: dict[str, str] = {}
        """Folder file -> why it is invalid, while it is."""
        self._announced: set[tuple[str, int | str]] = set()
        """(folder file, its mtime_ns, or the error when it cannot be read) logged already: once per version."""

    def settings_for(self, config: Config, rel_paths: Iterable[str]) -> dict[str, Settings | Held]:
        """Each file's settings, or why it must wait. A folder's files share one reading and one merge."""
        read: dict[str, FolderFile | Held | None] = {}
        merged: dict[tuple[int, str], Settings | Held] = {}
        found: dict[str, Settings | Held] = {}
        for rel_path in rel_paths:
            profile = first_profile(config.profiles, rel_path)
            key = (config.profiles.index(profile) if profile is not None else -1, posixpath.dirname(rel_path))
            if key not in merged:
                folders = folders_above(rel_path)
                for folder in folders:
                    if folder not in read:
                        read[folder] = self._read(folder, config.watch.settle_seconds)
                chain = [read[folder] for folder in folders]
                held = next((c for c in chain if isinstance(c, Held)), None)
                merged[key] = held or _merge(config, profile, [c for c in chain if isinstance(c, FolderFile)])
            found[rel_path] = merged[key]
        return found

    def recheck(self, config: Config) -> None:
        """Read the invalid folder files again: those fixed or removed leave `problems`."""
        for rel in list(self.problems):
            self._read(posixpath.dirname(rel), config.watch.settle_seconds)

    def _read(self, folder: str, settle_seconds: float) -> FolderFile | Held | None:
        """The folder's settings file: None if it has none, Held if it is invalid or just changed."""
        rel = folder_file_of(folder)
        try:
            st = os.stat(self.inbox / rel)
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(rel, None)
            self._valid(rel)
            return None
        except OSError as exc:
            return self._invalid(rel, f"{rel}: cannot read it: {exc.strerror or exc}", None)
        if not stat.S_ISREG(st.st_mode):
            self._valid(rel)
            return None
        age = self._wall() - st.st_mtime_ns / 1e9
        if 0 <= age < settle_seconds:  # an editor may be half way through writing it; a clock ahead never holds
            return Held(rel, None)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get(rel)
        if cached is None or cached[0] != stamp:
            try:
                cached = (stamp, parse_folder_file((self.inbox / rel).read_text(encoding="utf-8"), rel))
            except ConfigError as exc:
                cached = (stamp, str(exc))
            except UnicodeDecodeError:
                cached = (stamp, f"{rel}: not UTF-8 text")
            except OSError as exc:
                return self._invalid(rel, f"{rel}: cannot read it: {exc.strerror or exc}", None)
            self._cache[rel] = cached
        if isinstance(cached[1], str):
            return self._invalid(rel, cached[1], st.st_mtime_ns)
        self._valid(rel)
        return cached[1]

    def _invalid(self, rel: str, reason: str, mtime_ns: int | None) -> Held:
        self.problems[rel] = reason
        version = (rel, reason if mtime_ns is None else mtime_ns)
        if version not in self._announced:
            self._announced.add(version)
            log.error("settings.invalid", file=rel, reason=reason,
                      detail="the files in its folder and below wait in the inbox (none fails) until it is fixed")
        return Held(rel, reason)

    def _valid(self, rel: str) -> None:
        if self.problems.pop(rel, None) is not None:
            self._announced = {a for a in self._announced if a[0] != rel}
            log.info("settings.valid", file=rel, detail="the files it held are taken now")


def _merge(config: Config, profile: ProfileConfig | None, folder_files: list[FolderFile]) -> Settings | Held:
    """The top level, then the profile, then the folder files (shallowest first), key by key."""
    restore, output = config.restore, config.output
    if profile is not None:  # checked at start (and at each reload) merged over this very top level
        restore, output = restore_with(restore, profile.restore), output_with(output, profile.output)
    for folder_file in folder_files:
        try:
            restore = restore_with(restore, folder_file.restore)
            output = output_with(output, folder_file.output)
        except ConfigError as exc:  # each key was checked alone when read: not expected, but never fatal
            return Held(folder_file.rel, f"{folder_file.rel}: {exc}")
    labels = ([profile.label] if profile is not None else []) + [f.rel for f in folder_files]
    return Settings(" + ".join(labels) or None, restore.as_request(), output_settings(output))
