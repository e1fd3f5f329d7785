"""Configuration: the YAML schema as typed dataclasses, loading, and validation.

Every problem is reported as a `ConfigError` that names the key (``api.poll_interval``) and what is
wrong with it, before the daemon touches a single file. The API key is never read from the YAML: it
comes from the environment, a key file, or a systemd credential, and is held in a `Secret` whose repr
never shows it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

API_KEY_ENV = "CODEFORMER_API_KEY"
API_KEY_CREDENTIAL = "api_key"
DASHBOARD_TOKEN_CREDENTIAL = "dashboard_token"
POSTGRESQL_PASSWORD_CREDENTIAL = "postgresql_password"
MIN_DASHBOARD_TOKEN_LENGTH = 16

PROVIDER_BASE_URL = "https://gateway.pixazo.ai/codeformer-image-restoration/v1"
PROVIDER_STATUS_URL = "https://gateway.pixazo.ai/v2/requests/status"

UPSCALE_AUTO = "auto"
FOLDER_SETTINGS_FILE = "codeformer.yaml"
"""A folder's own restore: and output: settings, for it and below; never taken as a scan (daemon.profiles)."""


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""


class Secret:
    """A string that never shows itself in a repr, a log line or an error text."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "the API key") -> None:
        self._value = value
        self.source = source
        """Where the key came from, in words for an error that says what to fix (never the key)."""

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _range(low: float | None = None, high: float | None = None) -> dict[str, Any]:
    return {"range": (low, high)}


def _choice(*options: str) -> dict[str, Any]:
    return {"choices": options}


def _or_words(*words: str) -> dict[str, Any]:
    """Words accepted besides a number in range (upscale: auto)."""
    return {"words": words}


@dataclass(frozen=True)
class FoldersConfig:
    """Where scans arrive, where restorations go, and where originals end up."""

    inbox: Path
    outbox: Path
    archive: Path
    failed: Path


@dataclass(frozen=True)
class ApiConfig:
    """How to reach the provider, and how patiently."""

    base_url: str = PROVIDER_BASE_URL
    status_url: str = PROVIDER_STATUS_URL
    api_key_file: Path | None = None
    poll_interval: float = field(default=5.0, metadata=_range(0.05, 3600))
    max_in_flight: int = field(default=4, metadata=_range(1, 256))
    job_timeout: float = field(default=900.0, metadata=_range(1, 7 * 86400))
    connect_timeout: float = field(default=10.0, metadata=_range(0.1, 300))
    read_timeout: float = field(default=60.0, metadata=_range(0.1, 3600))
    max_attempts: int = field(default=5, metadata=_range(1, 100))
    max_download_mb: float = field(default=200.0, metadata=_range(1, 10_000))


@dataclass(frozen=True)
class RestoreConfig:
    """The restoration parameters sent with every job; ranges as the provider documents them."""

    codeformer_fidelity: float = field(default=0.5, metadata=_range(0.0, 1.0))
    background_enhance: bool = True
    face_upsample: bool = True
    upscale: int | str = field(default=2, metadata=_range(1, 8) | _or_words(UPSCALE_AUTO))
    """A factor, or "auto": chosen per scan from its size, once it is checked (see daemon.profiles)."""
    max_output_megapixels: float = field(default=60.0, metadata=_range(1, 10_000))
    """With upscale auto: the largest factor whose output stays within this many megapixels."""
    max_upscale: int = field(default=4, metadata=_range(1, 8))
    """With upscale auto: the highest factor it may choose."""

    def as_request(self) -> dict[str, Any]:
        """The provider's parameters. With upscale auto, the rule instead of a factor (`upscale: "auto"`
        with its two limits), which `daemon.profiles.resolve_upscale` turns into one before the submit."""
        request = {"codeformer_fidelity": self.codeformer_fidelity, "background_enhance": self.background_enhance,
                   "face_upsample": self.face_upsample, "upscale": self.upscale}
        if self.upscale == UPSCALE_AUTO:
            request.update(max_upscale=self.max_upscale, max_output_megapixels=self.max_output_megapixels)
        return request


@dataclass(frozen=True)
class BuiltinHostConfig:
    """The built-in HTTP server that serves each scan to the provider while its job needs it."""

    listen: str = "0.0.0.0:8089"
    public_url: str | None = None
    webhook: bool = True
    tls_cert: Path | None = None
    """PEM certificate chain: serve HTTPS, for a station the provider reaches directly."""
    tls_key: Path | None = None
    max_misses_per_minute: int = field(default=30, metadata=_range(1, 100_000))
    """Requests for unknown paths one client may make per minute before it is refused for a while."""
    max_connections: int = field(default=64, metadata=_range(1, 256))
    """Connections served at once (a thread each); more are turned away. The units' TasksMax allows for 256."""


S3_URL_EXPIRY_MARGIN = 600
"""Seconds a presigned URL outlives api.job_timeout by default: publish-to-submit time and clock skew."""
S3_MAX_URL_EXPIRY = 7 * 86400
"""The longest a SigV4 presigned URL may be valid."""


@dataclass(frozen=True)
class S3HostConfig:
    """An S3-compatible bucket (AWS, R2, B2, MinIO): each scan uploaded, handed over as a presigned GET URL."""

    bucket: str | None = None
    prefix: str = "codeformer-daemon/"
    """Objects live under this prefix; at start-up, object keys of the daemon's own shape found here and
    not needed by the journal are deleted, so give every daemon its own prefix."""
    endpoint_url: str | None = None
    region: str | None = None
    url_expiry: int | None = field(default=None, metadata=_range(60, S3_MAX_URL_EXPIRY))
    addressing_style: str = field(default="auto", metadata=_choice("auto", "path", "virtual"))
    profile: str | None = None

    def expiry_for(self, job_timeout: float) -> int:
        """Seconds each presigned URL is valid: `url_expiry`, or api.job_timeout plus a margin."""
        if self.url_expiry is not None:
            return self.url_expiry
        return min(int(job_timeout) + S3_URL_EXPIRY_MARGIN, S3_MAX_URL_EXPIRY)


@dataclass(frozen=True)
class CommandHostConfig:
    """External programs (rclone, scp, a script) that upload and delete; argument lists, never a shell."""

    publish: tuple[str, ...] = ()
    unpublish: tuple[str, ...] = ()
    url_template: str | None = None
    timeout: float = field(default=120.0, metadata=_range(1, 3600))


@dataclass(frozen=True)
class WebdavHostConfig:
    """A WebDAV folder (Nextcloud, ownCloud, nginx, Apache) that a public URL serves files from."""

    url: str | None = None
    public_url_template: str | None = None
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None


HOSTING_ADAPTERS = ("builtin", "s3", "command", "webdav")
"""Must match daemon.hosting.ADAPTERS (config sits below hosting, so the names live here too)."""

COMMAND_PLACEHOLDERS = {"publish": ("{path}", "{key}", "{content_type}"), "unpublish": ("{key}",)}


@dataclass(frozen=True)
class HostingConfig:
    adapter: str = field(default="builtin", metadata=_choice(*HOSTING_ADAPTERS))
    builtin: BuiltinHostConfig = field(default_factory=BuiltinHostConfig)
    s3: S3HostConfig = field(default_factory=S3HostConfig)
    command: CommandHostConfig = field(default_factory=CommandHostConfig)
    webdav: WebdavHostConfig = field(default_factory=WebdavHostConfig)


@dataclass(frozen=True)
class WatchConfig:
    settle_seconds: float = field(default=2.0, metadata=_range(0.0, 3600))
    rescan_seconds: float = field(default=60.0, metadata=_range(1.0, 86400))
    ignore: tuple[str, ...] = ()
    mode: str = field(default="auto", metadata=_choice("auto", "events", "polling"))


@dataclass(frozen=True)
class PreflightConfig:
    max_pixels: int = field(default=50_000_000, metadata=_range(1, 2_000_000_000))
    max_decode_mb: int = field(default=256, metadata=_range(16, 1_048_576))
    """MiB that full-size decodes (conversions, output work) may hold at once; more wait their turn.
    One decode larger than this still runs, alone. Must match daemon.memory.DEFAULT_MAX_DECODE_MB."""


C2PA_KEY_CREDENTIAL = "c2pa_private_key"
OUTPUT_FORMATS = ("auto", "png", "jpeg", "tiff", "webp")


@dataclass(frozen=True)
class C2paConfig:
    """Content credentials: sign each output with a station certificate (needs the [c2pa] extra)."""

    certificate: Path | None = None
    """PEM chain, end-entity first; null: no signing."""
    private_key: Path | None = None
    """PEM key file; null: the systemd credential c2pa_private_key."""
    timestamp_url: str | None = None


@dataclass(frozen=True)
class OutputConfig:
    """What the delivered file is: its format, what it keeps of the scan, its label, and the guard."""

    format: str = field(default="auto", metadata=_choice(*OUTPUT_FORMATS))
    jpeg_quality: int = field(default=95, metadata=_range(1, 100))
    tiff_compression: str = field(default="tiff_adobe_deflate",
                                  metadata=_choice("tiff_adobe_deflate", "tiff_lzw", "raw", "packbits"))
    keep_metadata: bool = True
    label: bool = True
    sidecar: bool = False
    grayscale: str = field(default="auto", metadata=_choice("auto", "off"))
    unchanged: str = field(default="deliver", metadata=_choice("deliver", "fail"))
    c2pa: C2paConfig = field(default_factory=C2paConfig)


@dataclass(frozen=True)
class BudgetConfig:
    """What may be spent: limits in images per day and per calendar month, and the price for display."""

    price_per_image: float | None = field(default=None, metadata=_range(0, 1_000_000))
    """What one accepted submit costs, shown as money in `status`; None: counts only."""
    currency: str = "USD"
    daily_limit: int | None = field(default=None, metadata=_range(1, 10_000_000))
    monthly_limit: int | None = field(default=None, metadata=_range(1, 100_000_000))
    timezone: str | None = None
    """An IANA zone name for "day" and "month" (e.g. Europe/Berlin); None: the system's local time."""


@dataclass(frozen=True)
class DashboardConfig:
    """The local web dashboard and its /metrics: off unless `listen` is set."""

    listen: str | None = "127.0.0.1:8090"
    token_file: Path | None = None
    """The access token; None = the systemd credential dashboard_token, if any. Required off loopback."""
    thumbnails: bool = True
    """Keep small before/after previews of each job in state_dir/thumbnails for the dashboard."""
    retention_days: float = field(default=30.0, metadata=_range(0.01, 36500))


@dataclass(frozen=True)
class PostgresConfig:
    """The fleet's shared journal (state.backend: postgresql)."""

    dsn: str | None = None
    """A libpq connection string or URI; the password comes from libpq's PGPASSFILE or the systemd
    credential postgresql_password, never from this file."""
    lease_seconds: float = field(default=30.0, metadata=_range(3, 3600))
    """A daemon silent this long loses the jobs it holds to the others."""


@dataclass(frozen=True)
class StateConfig:
    """Where the journal lives: SQLite in state_dir (one daemon), or PostgreSQL (a fleet sharing one queue)."""

    backend: str = field(default="sqlite", metadata=_choice("sqlite", "postgresql"))
    postgresql: PostgresConfig = field(default_factory=PostgresConfig)
    node_name: str | None = None
    """This daemon's name in the fleet (`status` shows it); None: the host name."""


@dataclass(frozen=True)
class LoggingConfig:
    format: str = field(default="auto", metadata=_choice("auto", "json", "console"))
    level: str = field(default="info", metadata=_choice("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class ProfileConfig:
    """Settings for the files whose path in the inbox matches `match`, merged over the top level.

    Only the keys the profile sets are kept (as in the YAML): they are merged over the top level's
    values when a file is taken, so a reload that changes the top level changes them too.
    """

    match: str
    """A glob relative to the inbox: `*` within a folder, `**` any depth (daemon.profiles.glob_matches)."""
    name: str | None = None
    """Shown in `status`, the log and error records; None: the `match` pattern."""
    restore: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.match


@dataclass(frozen=True)
class Config:
    folders: FoldersConfig
    state_dir: Path
    api: ApiConfig = field(default_factory=ApiConfig)
    restore: RestoreConfig = field(default_factory=RestoreConfig)
    hosting: HostingConfig = field(default_factory=HostingConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    state: StateConfig = field(default_factory=StateConfig)
    profiles: tuple[ProfileConfig, ...] = ()
    """First match wins; see daemon.profiles for how they and the folders' codeformer.yaml files merge."""
    shutdown_timeout: float = field(default=20.0, metadata=_range(1.0, 3600))


# --------------------------------------------------------------------------- building from a mapping


def _convert(value: Any, hint: Any, key: str, base_dir: Path) -> Any:
    """Check one YAML value against its type hint and convert it; raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, options[0], key, base_dir)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, base_dir)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: expected a non-empty text, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base_dir / path)
    if origin is tuple and typing.get_args(hint)[0] is ProfileConfig:
        return _build_profiles(value, key)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of texts, got {value!r}")
        return tuple(value)
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in the schema, not the file


def _check_metadata(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    if "range" in meta:
        low, high = meta["range"]
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{key}: {value!r} is out of range, allowed {low} to {high}")
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(meta["choices"])
        raise ConfigError(f"{key}: unknown value {value!r}, allowed: {allowed}")


def _build(cls: type, data: Any, prefix: str, base_dir: Path) -> Any:
    """Build dataclass `cls` from a YAML mapping, rejecting unknown keys (usually typos)."""
    where = prefix or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"{name}: unknown key (allowed here: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default:
                raise ConfigError(f"{key}: required key is missing")
            continue
        if isinstance(data[name], str) and f.metadata.get("words"):
            values[name] = _word(data[name], f.metadata, key)
            continue
        value = _convert(data[name], hints[name], key, base_dir)
        _check_metadata(value, f.metadata, key)
        values[name] = value
    return cls(**values)


def _word(value: str, meta: typing.Mapping[str, Any], key: str) -> str:
    """A word allowed in place of a number (upscale: auto), in any case; ConfigError naming `key`."""
    word = value.strip().lower()
    if word not in meta["words"]:
        low, high = meta.get("range", (None, None))
        raise ConfigError(f"{key}: expected {low} to {high} or {' or '.join(meta['words'])}, got {value!r}")
    return word


PROFILE_SECTIONS = ("restore", "output")
"""What a profile or a folder's codeformer.yaml may set: the top level's sections of the same names."""


def _build_profiles(value: Any, key: str) -> tuple[ProfileConfig, ...]:
    """The `profiles:` list. Here each entry's own keys are checked; its values are checked by
    `validate`, merged over the top level as a file taken with it would have them."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of profiles (each with match:), got {type(value).__name__}")
    allowed = [f.name for f in dataclasses.fields(ProfileConfig)]
    profiles = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with match: and restore: or output:, got {entry!r}")
        unknown = sorted(set(entry) - set(allowed), key=str)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed here: {', '.join(allowed)})")
        if "match" not in entry:
            raise ConfigError(f"{where}.match: required key is missing")
        sections = {}
        for section in PROFILE_SECTIONS:
            data = entry.get(section)
            if data is not None and not isinstance(data, dict):
                raise ConfigError(f"{where}.{section}: expected a mapping of keys, got {type(data).__name__}")
            sections[section] = dict(data or {})
        name = entry.get("name")
        profiles.append(ProfileConfig(match=_convert(entry["match"], str, f"{where}.match", Path()).strip(),
                                      name=None if name is None else _convert(name, str, f"{where}.name", Path()),
                                      **sections))
    return tuple(profiles)


def _fields_of(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def restore_with(base: RestoreConfig, overrides: typing.Mapping[str, Any], where: str = "restore") -> RestoreConfig:
    """`base` with `overrides` (keys as in the YAML) merged over it, each checked as at the top level;
    an error names the key under `where` (profiles[1].restore.upscale)."""
    return _build(RestoreConfig, {**_fields_of(base), **overrides}, where, Path())


def output_with(base: OutputConfig, overrides: typing.Mapping[str, Any], where: str = "output") -> OutputConfig:
    """As `restore_with`, for `output:`. Signing (c2pa) stays the top level's: its key is proved at start."""
    if "c2pa" in overrides:
        raise ConfigError(f"{where}.c2pa: set only in the top-level output: section (its key and certificate "
                          "are checked when the daemon starts)")
    values = _fields_of(base)
    del values["c2pa"]
    return dataclasses.replace(_build(OutputConfig, {**values, **overrides}, where, Path()), c2pa=base.c2pa)


def _validate_profiles(config: Config) -> None:
    """Each profile merged over the top level, as a file taken with it gets it; errors name profiles[i]."""
    inbox = str(config.folders.inbox)
    for index, profile in enumerate(config.profiles):
        where = f"profiles[{index}]"
        if profile.match.startswith(inbox.rstrip("/") + "/"):
            raise ConfigError(f"{where}.match: a pattern relative to folders.inbox, such as "
                              f"{profile.match[len(inbox):].strip('/')!r}, not a full path")
        restore_with(config.restore, profile.restore, f"{where}.restore")
        output_with(config.output, profile.output, f"{where}.output")


def _check_url(value: str, key: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}: expected an http(s) URL, got {value!r}")


def parse_listen(value: str, key: str = "hosting.builtin.listen") -> tuple[str, int]:
    """Split 'host:port' (IPv6 as '[::1]:8089'); raise ConfigError naming `key`."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    return host, int(port_text)


def _is_inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _required(value: Any, key: str, adapter: str) -> None:
    if value is None or value == ():
        raise ConfigError(f"{key}: required when hosting.adapter is {adapter}")


def _check_template(value: str, key: str) -> None:
    """A URL template: http(s) once `{key}` is filled in, and it must contain `{key}`."""
    if "{key}" not in value:
        raise ConfigError(f"{key}: must contain {{key}}, where each file's random key goes")
    _check_url(value.replace("{key}", "k"), key)


def _check_arguments(argv: tuple[str, ...], key: str, which: str) -> None:
    allowed = COMMAND_PLACEHOLDERS[which]
    for argument in argv:
        for placeholder in re.findall(r"\{[A-Za-z_]+\}", argument):
            if placeholder not in allowed:
                raise ConfigError(f"{key}: unknown placeholder {placeholder}; allowed: {', '.join(allowed)}")
    if not argv[0].strip():
        raise ConfigError(f"{key}: the first item must be the program to run")
    needed = ("{path}", "{key}") if which == "publish" else ("{key}",)
    for placeholder in needed:
        if not any(placeholder in argument for argument in argv):
            raise ConfigError(f"{key}: must contain {placeholder}")


def _validate_hosting_adapter(config: Config) -> None:
    """The keys the chosen adapter needs; sections of other adapters are only type-checked."""
    from urllib.parse import urlsplit

    hosting, adapter = config.hosting, config.hosting.adapter
    if adapter == "s3":
        s3 = hosting.s3
        _required(s3.bucket, "hosting.s3.bucket", adapter)
        try:
            import boto3  # noqa: F401 - only to say so now, naming the extra, rather than at the first upload
        except ImportError:
            raise ConfigError("hosting.adapter: s3 needs boto3, which is not installed; install the "
                              "extra: pip install 'codeformer-daemon[s3]'") from None
        if s3.endpoint_url is not None:
            _check_url(s3.endpoint_url, "hosting.s3.endpoint_url")
        if s3.region == "auto" and s3.endpoint_url is None:
            raise ConfigError("hosting.s3.region: 'auto' is for Cloudflare R2; set hosting.s3.endpoint_url too")
        if s3.prefix.startswith("/"):
            raise ConfigError("hosting.s3.prefix: must not start with '/' (object keys have no leading slash)")
        if s3.expiry_for(config.api.job_timeout) < config.api.job_timeout:
            raise ConfigError(f"hosting.s3.url_expiry: {s3.expiry_for(config.api.job_timeout)} s is shorter than "
                              f"api.job_timeout ({config.api.job_timeout:g} s): a job still queued at the "
                              "provider could find its URL expired")
    elif adapter == "command":
        command = hosting.command
        _required(command.publish, "hosting.command.publish", adapter)
        _required(command.unpublish, "hosting.command.unpublish", adapter)
        _check_arguments(command.publish, "hosting.command.publish", "publish")
        _check_arguments(command.unpublish, "hosting.command.unpublish", "unpublish")
        if command.url_template is not None:
            _check_template(command.url_template, "hosting.command.url_template")
    elif adapter == "webdav":
        webdav = hosting.webdav
        _required(webdav.url, "hosting.webdav.url", adapter)
        _check_url(webdav.url, "hosting.webdav.url")
        if "@" in urlsplit(webdav.url).netloc:
            raise ConfigError("hosting.webdav.url: no credentials in the URL; use hosting.webdav.username and "
                              "a password file or credential")
        _required(webdav.public_url_template, "hosting.webdav.public_url_template", adapter)
        _check_template(webdav.public_url_template, "hosting.webdav.public_url_template")
        if webdav.token_file is not None and (webdav.username is not None or webdav.password_file is not None):
            raise ConfigError("hosting.webdav.token_file: use either a token or a username and password, not both")
        if webdav.password_file is not None and webdav.username is None:
            raise ConfigError("hosting.webdav.username: required with hosting.webdav.password_file")


def _validate_c2pa(signing: C2paConfig) -> None:
    """A configured certificate needs its file, a key, and the extra that signs."""
    if signing.certificate is None:
        if signing.private_key is not None or signing.timestamp_url is not None:
            raise ConfigError("output.c2pa.certificate: required with output.c2pa.private_key or timestamp_url")
        return
    try:
        import c2pa  # noqa: F401 - only to say so now, naming the extra, rather than at the first delivery
    except ImportError:
        raise ConfigError("output.c2pa: signing needs c2pa-python, which is not installed; install the "
                          "extra: pip install 'codeformer-daemon[c2pa]'") from None
    for key, path in (("output.c2pa.certificate", signing.certificate), ("output.c2pa.private_key", signing.private_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: {path} does not exist or is not a file")
    if signing.timestamp_url is not None:
        _check_url(signing.timestamp_url, "output.c2pa.timestamp_url")


def resolve_c2pa_key(config: Config, environ: typing.Mapping[str, str] | None = None) -> Path | None:
    """The PEM key that signs outputs: output.c2pa.private_key, else $CREDENTIALS_DIRECTORY/c2pa_private_key.

    None when no certificate is configured; ConfigError when one is and no key can be found.
    """
    c2pa = config.output.c2pa
    if c2pa.certificate is None:
        return None
    if c2pa.private_key is not None:
        return c2pa.private_key
    credentials = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / C2PA_KEY_CREDENTIAL).is_file():
        return Path(credentials) / C2PA_KEY_CREDENTIAL
    raise ConfigError(f"output.c2pa.private_key: no key for output.c2pa.certificate; set it, or pass a systemd "
                      f"credential named {C2PA_KEY_CREDENTIAL}")


def is_loopback_listen(listen: str) -> bool:
    """Whether a listen address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    host, _port = parse_listen(listen, "dashboard.listen")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _validate_dashboard(config: Config) -> None:
    """The dashboard never shares the built-in host's port, and off loopback it needs a token."""
    dashboard = config.dashboard
    if dashboard.listen is None:
        return
    host, port = parse_listen(dashboard.listen, "dashboard.listen")
    if config.hosting.adapter == "builtin" and port != 0:
        _host, builtin_port = parse_listen(config.hosting.builtin.listen)
        if port == builtin_port:
            raise ConfigError(f"dashboard.listen: port {port} is the built-in host's (hosting.builtin.listen); "
                              "the dashboard needs a port of its own")
    if dashboard.token_file is not None and not dashboard.token_file.is_file():
        raise ConfigError(f"dashboard.token_file: {dashboard.token_file} does not exist or is not a file")


def _validate_state(state: StateConfig) -> None:
    if state.backend == "postgresql" and not (state.postgresql.dsn or "").strip():
        raise ConfigError("state.postgresql.dsn: state.backend is postgresql, so a connection string is needed "
                          '(e.g. "host=db.example.org dbname=codeformer user=codeformer")')
    if re.search(r"(^|\s)password\s*=|://[^/@]*:[^/@]*@", state.postgresql.dsn or ""):
        raise ConfigError("state.postgresql.dsn: holds a password; keep it out of the configuration file "
                          f"(libpq's PGPASSFILE, or the systemd credential {POSTGRESQL_PASSWORD_CREDENTIAL})")
    if state.node_name is not None and not re.fullmatch(r"[\w.@:-]{1,64}", state.node_name):
        raise ConfigError(f"state.node_name: {state.node_name!r} should be a short name (letters, digits, . _ - @ :)")


def resolve_postgresql_password(environ: typing.Mapping[str, str] | None = None) -> Secret | None:
    """The PostgreSQL password from the systemd credential postgresql_password, if passed; else libpq
    finds one itself (PGPASSFILE, ~/.pgpass) or the server needs none."""
    environ = os.environ if environ is None else environ
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if not credentials:
        return None
    path = Path(credentials) / POSTGRESQL_PASSWORD_CREDENTIAL
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"credential {POSTGRESQL_PASSWORD_CREDENTIAL}: cannot read {path}: {exc.strerror}") from None
    return Secret(value, f"the systemd credential {POSTGRESQL_PASSWORD_CREDENTIAL}") if value else None


def _validate_budget(budget: BudgetConfig) -> None:
    if budget.timezone is not None:
        try:
            zoneinfo.ZoneInfo(budget.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"budget.timezone: unknown time zone {budget.timezone!r} (an IANA name such as "
                              "Europe/Berlin or America/New_York)") from None
    if not re.fullmatch(r"[A-Za-z]{3}", budget.currency):
        raise ConfigError(f"budget.currency: expected a three-letter currency code such as USD, got {budget.currency!r}")
    if budget.daily_limit and budget.monthly_limit and budget.daily_limit > budget.monthly_limit:
        raise ConfigError(f"budget.daily_limit: {budget.daily_limit} is more than budget.monthly_limit "
                          f"({budget.monthly_limit}); the monthly limit would always stop submits first")


def resolve_dashboard_token(config: Config, environ: typing.Mapping[str, str] | None = None) -> Secret | None:
    """The dashboard's access token: dashboard.token_file, else $CREDENTIALS_DIRECTORY/dashboard_token.

    None (no login) is allowed only on loopback; a listener other machines can reach without a
    token is a ConfigError. A token shorter than 16 characters is refused: it would be guessable.
    """
    dashboard = config.dashboard
    if dashboard.listen is None:
        return None
    environ = os.environ if environ is None else environ
    source, path = None, dashboard.token_file
    if path is not None:
        source = f"dashboard.token_file ({path})"
    elif environ.get("CREDENTIALS_DIRECTORY"):
        credential = Path(environ["CREDENTIALS_DIRECTORY"]) / DASHBOARD_TOKEN_CREDENTIAL
        if credential.is_file():
            path, source = credential, f"the systemd credential {DASHBOARD_TOKEN_CREDENTIAL}"
    if path is None:
        if not is_loopback_listen(dashboard.listen):
            raise ConfigError(f"dashboard.token_file: dashboard.listen ({dashboard.listen}) is reachable from other "
                              f"machines, so a token is required; set dashboard.token_file or pass a systemd "
                              f"credential named {DASHBOARD_TOKEN_CREDENTIAL}")
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"dashboard.token_file: cannot read {path}: {exc.strerror or exc}") from None
    if len(token) < MIN_DASHBOARD_TOKEN_LENGTH or not re.fullmatch(r"[\x21-\x7e]+", token):
        raise ConfigError(f"dashboard.token_file: the token in {source} must be one line of at least "
                          f"{MIN_DASHBOARD_TOKEN_LENGTH} printable characters without spaces "
                          "(e.g. from: openssl rand -base64 24)")
    return Secret(token, source)


def validate(config: Config) -> None:
    """Checks that need more than one key or the file system; raise ConfigError naming the key."""
    _check_url(config.api.base_url, "api.base_url")
    _check_url(config.api.status_url, "api.status_url")
    if config.hosting.builtin.public_url is not None:
        _check_url(config.hosting.builtin.public_url, "hosting.builtin.public_url")
    parse_listen(config.hosting.builtin.listen)
    builtin = config.hosting.builtin
    if (builtin.tls_cert is None) != (builtin.tls_key is None):
        raise ConfigError("hosting.builtin.tls_cert: tls_cert and tls_key go together (both or neither)")
    for key, path in (("hosting.builtin.tls_cert", builtin.tls_cert), ("hosting.builtin.tls_key", builtin.tls_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: {path} does not exist or is not a file")
    _validate_hosting_adapter(config)
    _validate_c2pa(config.output.c2pa)
    _validate_dashboard(config)
    _validate_budget(config.budget)
    _validate_profiles(config)
    _validate_state(config.state)

    inbox = config.folders.inbox
    if not inbox.is_dir():
        raise ConfigError(f"folders.inbox: {inbox} does not exist or is not a directory")
    others = {
        "folders.outbox": config.folders.outbox,
        "folders.archive": config.folders.archive,
        "folders.failed": config.folders.failed,
        "state_dir": config.state_dir,
    }
    for key, path in others.items():
        if _is_inside(path, inbox):
            raise ConfigError(f"{key}: {path} is inside folders.inbox ({inbox}); it must live outside it")
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}: {path} exists and is not a directory")
    if config.api.job_timeout <= config.api.poll_interval:
        raise ConfigError("api.job_timeout: must be longer than api.poll_interval")


LOCAL_NAME_SUFFIXES = (".local", ".home.arpa", ".internal")
"""Names only the local network resolves (mDNS, RFC 8375, ICANN's private-use TLD)."""


def _local_host_kind(host: str | None) -> str | None:
    """Why no one out on the internet can reach `host` ('loopback', ...), or None for a reachable-looking host."""
    import ipaddress

    host = (host or "").rstrip(".").lower()
    if not host:
        return "missing"
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"
    if host.endswith(LOCAL_NAME_SUFFIXES):
        return "local-only name"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return None  # any other name: what it resolves to is DNS's business, not ours
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if not ip.is_global:  # private, link-local, carrier-grade NAT (100.64/10), documentation ranges
        return "private"
    return None


_WHY_UNREACHABLE = {
    "missing": "has no host",
    "unspecified": "is the unspecified address (every interface to a server, nowhere to a client)",
    "loopback": "is a loopback address (this station only)",
    "private": "is a private or link-local address (this network only)",
    "local-only name": "is a name only the local network resolves",
}


def builtin_public_url_problem(config: Config) -> str | None:
    """What is wrong with the built-in host's public URL for the provider, or None.

    The provider fetches every scan from this URL: null (the listen address, usually 0.0.0.0) or a
    local address passes a check run on this station and fails at the provider. With api.base_url
    on loopback (the emulator, the demo, the tests) the fetcher is this station and anything goes.
    """
    from urllib.parse import urlsplit

    if config.hosting.adapter != "builtin" or _local_host_kind(urlsplit(config.api.base_url).hostname) == "loopback":
        return None
    builtin = config.hosting.builtin
    fix = ("set it to the address the provider can reach, such as https://scans.example.org:8089, and "
           f"forward that port to hosting.builtin.listen ({builtin.listen})")
    if builtin.public_url is None:
        scheme = "https" if builtin.tls_cert else "http"
        return (f"hosting.builtin.public_url: not set, so scans would be offered at the listen address "
                f"({scheme}://{builtin.listen}/...), which the provider cannot reach from outside; {fix}")
    host = urlsplit(builtin.public_url).hostname
    kind = _local_host_kind(host)
    if kind is None:
        return None
    # The host only, never the whole URL: it may carry credentials.
    shown = "" if not host else f" [{host}]" if ":" in host else f" {host}"
    return (f"hosting.builtin.public_url: its host{shown} {_WHY_UNREACHABLE[kind]}, which the provider "
            f"cannot reach from outside; {fix}")


def validate_for_run(config: Config) -> None:
    """What only `run` refuses: `status`, `retry` and `check` still work with such a file (check warns)."""
    problem = builtin_public_url_problem(config)
    if problem is not None:
        raise ConfigError(problem)


def config_from_mapping(data: Any, base_dir: Path) -> Config:
    """Build and validate a Config; relative paths are taken relative to `base_dir`."""
    config = _build(Config, data, "", base_dir)
    validate(config)
    return config


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a YAML configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict) and "api" in data and isinstance(data["api"], dict):
        if "api_key" in data["api"]:
            raise ConfigError(
                f"api.api_key: the key is never read from the YAML file; use {API_KEY_ENV}, "
                "api.api_key_file, or a systemd credential named api_key"
            )
    return config_from_mapping(data, path.resolve().parent)


def _checked_key(value: str, key: str, source: str) -> Secret:
    """A key must be one printable token: anything else would break the header (and its error
    text would carry the key into logs and error records)."""
    if not re.fullmatch(r"[\x21-\x7e]+", value):
        raise ConfigError(f"{key}: the API key has spaces, line breaks or other characters a header "
                          "cannot carry; it should be a single line holding only the key")
    return Secret(value, source)


def resolve_api_key(config: Config, environ: typing.Mapping[str, str] | None = None) -> Secret:
    """Find the API key: $CODEFORMER_API_KEY, then api.api_key_file, then $CREDENTIALS_DIRECTORY/api_key.

    A configured key file that cannot be read is an error even when the environment has a key,
    so that a broken setup is noticed rather than silently shadowed.
    """
    environ = os.environ if environ is None else environ
    from_file: str | None = None
    key_file = config.api.api_key_file
    if key_file is not None:
        try:
            from_file = key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"api.api_key_file: cannot read {key_file}: {exc.strerror or exc}") from None
        if not from_file:
            raise ConfigError(f"api.api_key_file: {key_file} is empty")
    from_env = environ.get(API_KEY_ENV, "").strip()
    if from_env:
        return _checked_key(from_env, API_KEY_ENV, f"the {API_KEY_ENV} environment variable")
    if from_file:
        return _checked_key(from_file, "api.api_key_file", f"api.api_key_file ({key_file})")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        credential = Path(credentials) / API_KEY_CREDENTIAL
        if credential.is_file():
            try:
                value = credential.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"credential {API_KEY_CREDENTIAL}: cannot read {credential}: {exc.strerror}") from None
            if value:
                return _checked_key(value, f"credential {API_KEY_CREDENTIAL}",
                                    f"the systemd credential {API_KEY_CREDENTIAL} ({credential})")
    raise ConfigError(
        f"api.api_key_file: no API key found; set {API_KEY_ENV}, point api.api_key_file at a file "
        f"holding the key, or pass a systemd credential named {API_KEY_CREDENTIAL}"
    )
