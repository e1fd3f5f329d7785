"""`codeformer-daemon check`: is this station ready? Proven without spending anything.

Checks the configuration (and warns about a built-in host's public URL no provider out on the
internet can reach), that the folders are writable, that the provider accepts the key (a
status request for an id that cannot exist answers 404 to a good key and 401/403 to a bad one), and
that a configured C2PA certificate will sign (C2PA refuses a self-signed one), and a publish ->
fetch -> unpublish round trip of a small probe image through the configured hosting adapter. No job is ever submitted. Published URLs may be secrets (presigned): they are never printed.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import requests
from PIL import Image

from .api import ApiClient
from .config import Config, ConfigError, Secret, builtin_public_url_problem, load_config, resolve_api_key
from .hosting import HostingError, create_adapter, key_for_logs, new_key
from .logging import register_secret


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    warning: bool = False
    """Passed, but something will likely go wrong later: printed as WARN, the exit code stays 0."""

    def line(self) -> str:
        verdict = "FAIL" if not self.ok else "WARN" if self.warning else "ok  "
        return f"{verdict}  {self.name}: {self.detail}"


def judge_public_url(config: Config) -> CheckResult | None:
    """A warning when the provider could not fetch from the built-in host, whatever the round trip says."""
    problem = builtin_public_url_problem(config)
    if problem is None:
        return None
    return CheckResult("public url", True, f"{problem} (the round trip below fetches from this station, so its ok "
                                           "says nothing about the provider; `run` refuses to start like this)",
                       warning=True)


def judge_key_probe(status: int | None, error: str, status_url: str, key_source: str) -> CheckResult:
    """What the answer to a status request for a made-up id says about the key."""
    if status is None:
        return CheckResult("api key", False, f"cannot reach {status_url}: {error}")
    if status == 404:
        return CheckResult("api key", True, f"accepted by the provider (from {key_source})")
    if status in (401, 403):
        return CheckResult("api key", False, f"rejected by the provider (HTTP {status}: {error}); "
                                             f"put a valid key in {key_source}")
    return CheckResult("api key", False, f"unexpected answer from {status_url}: HTTP {status}: {error}")


def probe_image() -> bytes:
    """A small PNG that no scan can be mistaken for."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def hosting_round_trip(config: Config, timeout: tuple[float, float]) -> list[CheckResult]:
    """Publish a probe image, fetch its public URL as the provider would, unpublish, and fetch again."""
    name = f"hosting ({config.hosting.adapter})"
    host = create_adapter(config)
    try:
        host.start()
    except HostingError as exc:
        return [CheckResult(name, False, f"cannot start: {exc}")]
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="codeformer-check-") as folder:
            data = probe_image()
            probe = Path(folder) / "probe.png"
            probe.write_bytes(data)
            key = new_key(".png")
            try:
                url = host.publish(key, probe, "image/png")
            except HostingError as exc:
                return [CheckResult(name, False, f"publish failed: {exc}")]
            try:
                results.append(_fetch_check(name, url, data, key, timeout))
            finally:
                try:
                    host.unpublish(key)
                except HostingError as exc:
                    results.append(CheckResult(name, False, f"unpublish failed: {exc}"))
            results.append(_gone_check(name, url, timeout))
    finally:
        host.stop()
    return results


def _fetch_check(name: str, url: str, data: bytes, key: str, timeout: tuple[float, float]) -> CheckResult:
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        return CheckResult(name, False, f"the published probe could not be fetched from here "
                                        f"({type(exc).__name__}); the provider must be able to fetch it")
    if response.status_code != 200 or response.content != data:
        return CheckResult(name, False, f"the published probe answered HTTP {response.status_code} "
                                        f"{'with other bytes' if response.status_code == 200 else ''}".strip())
    return CheckResult(name, True, f"published, fetched and matched (key {key_for_logs(key)})")


def _gone_check(name: str, url: str, timeout: tuple[float, float]) -> CheckResult:
    try:
        status = requests.get(url, timeout=timeout).status_code
    except requests.RequestException:
        status = None  # nothing answers there any more: gone too
    if status == 200:
        return CheckResult(name, False, "the probe is still fetchable after unpublish")
    return CheckResult(name, True, "unpublished: no longer fetchable")


def run_checks(config_path: str | Path) -> tuple[list[CheckResult], bool]:
    """Every check in order; the flag says whether the configuration itself was unusable."""
    from .service import StartupError, prepare_folders

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [CheckResult("config", False, str(exc))], True
    results = [CheckResult("config", True, str(config_path))]
    try:
        prepare_folders(config)
        results.append(CheckResult("folders", True, "outbox, archive, failed and state_dir are writable"))
    except StartupError as exc:
        results.append(CheckResult("folders", False, str(exc)))
    if config.state.backend == "postgresql":
        results.append(journal_check(config))
    try:
        key = resolve_api_key(config)
    except ConfigError as exc:
        results.append(CheckResult("api key", False, str(exc)))
        key = None
    if key is not None:
        results.append(_key_check(config, key))
    public_url = judge_public_url(config)
    if public_url is not None:
        results.append(public_url)
    signing = judge_signing(config)
    if signing is not None:
        results.append(signing)
    results.extend(hosting_round_trip(config, (config.api.connect_timeout, config.api.read_timeout)))
    return results, False


def journal_check(config: Config) -> CheckResult:
    """The fleet's PostgreSQL journal answers (and has, or can be given, the current schema)."""
    from .journal import Journal, JournalError
    from .storage import open_store

    try:
        journal = Journal(open_store(config))
    except (JournalError, ConfigError) as exc:
        return CheckResult("journal", False, str(exc))
    try:
        running = sum(1 for node in journal.nodes() if node.left_at is None
                      and node.lease_until > journal.database_time())
        return CheckResult("journal", True, f"PostgreSQL at {journal.store} answers; {running} daemon"
                                            f"{'s' if running != 1 else ''} of the fleet running")
    finally:
        journal.close()


def judge_signing(config: Config) -> CheckResult | None:
    """Whether the station certificate will sign outputs (C2PA refuses a self-signed one); None if unset."""
    from .service import StartupError, signing_key

    if config.output.c2pa.certificate is None:
        return None
    try:
        signing_key(config)
    except (ConfigError, StartupError) as exc:
        return CheckResult("content credentials", False, str(exc))
    return CheckResult("content credentials", True, f"outputs are signed with {config.output.c2pa.certificate}")


def _key_check(config: Config, key: Secret) -> CheckResult:
    register_secret(key.reveal())
    client = ApiClient(config.api, key)
    try:
        status, error = client.probe_key()
    finally:
        client.close()
    return judge_key_probe(status, error, config.api.status_url, key.source)
