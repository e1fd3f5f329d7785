"""Bad configuration exits non-zero with a message naming the key, before any file is touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import ConfigError, Secret, config_from_mapping, load_config, resolve_api_key

from .conftest import API_KEY, config_mapping, write_config


def run_cli(config_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if k not in ("CODEFORMER_API_KEY", "CREDENTIALS_DIRECTORY")}
    full_env.update(env if env is not None else {"CODEFORMER_API_KEY": API_KEY})
    return subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=30, env=full_env)


def _set(mapping: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = mapping
    for name in parents:
        node = node[name]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return mapping


_DELETE = object()

BAD_CONFIGS = [
    ("folders.inbox", "/nonexistent/inbox/for/sure", "folders.inbox"),
    ("restore.codeformer_fidelity", 1.5, "restore.codeformer_fidelity"),
    ("restore.codeformer_fidelity", "high", "restore.codeformer_fidelity"),
    ("restore.upscale", 9, "restore.upscale"),
    ("restore.background_enhance", "yes", "restore.background_enhance"),
    ("hosting.adapter", "ftp", "hosting.adapter"),
    ("api.poll_interval", "fast", "api.poll_interval"),
    ("api.max_in_flight", 0, "api.max_in_flight"),
    ("api.base_url", "gateway.example", "api.base_url"),
    ("api.api_key_file", "/nonexistent/key/file", "api.api_key_file"),
    ("api.pol_interval", 5, "api.pol_interval"),
    ("api.api_key", "sk-in-yaml", "api.api_key"),
    ("folders.outbox", _DELETE, "folders.outbox"),
    ("logging.format", "xml", "logging.format"),
    ("hosting.builtin.listen", "nonsense", "hosting.builtin.listen"),
    ("watch.ignore", "*.bak", "watch.ignore"),
]


@pytest.mark.parametrize("key,value,named", BAD_CONFIGS, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_CONFIGS])
def test_bad_configuration_exits_non_zero_naming_the_key(tmp_path, folders, emulator, key, value, named):
    scan = folders["inbox"] / "scan.jpg"
    scan.write_bytes(b"\xff\xd8 not touched")
    mapping = _set(config_mapping(folders, emulator), key, value)
    result = run_cli(write_config(tmp_path / "config.yaml", mapping))
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert scan.read_bytes() == b"\xff\xd8 not touched"
    for name in ("outbox", "archive", "failed", "state"):
        assert not folders[name].exists(), f"{name} was created by a refused start"


@pytest.mark.parametrize("where", ["inside", "equal"])
@pytest.mark.parametrize("key", ["folders.outbox", "folders.archive", "folders.failed", "state_dir"])
def test_folder_inside_the_inbox_is_refused(tmp_path, folders, emulator, key, where):
    """The watcher would take the daemon's own outputs, archives or state as new scans."""
    inbox = folders["inbox"]
    scan = inbox / "scan.jpg"
    scan.write_bytes(b"\xff\xd8 not touched")
    mapping = _set(config_mapping(folders, emulator), key, str(inbox / "restored" if where == "inside" else inbox))
    result = run_cli(write_config(tmp_path / "config.yaml", mapping))
    assert result.returncode == 2
    assert key in result.stderr and "inside folders.inbox" in result.stderr
    assert sorted(p.name for p in inbox.iterdir()) == ["scan.jpg"] and scan.read_bytes() == b"\xff\xd8 not touched"


def test_missing_key_names_every_place_a_key_can_come_from(tmp_path, folders, emulator):
    result = run_cli(write_config(tmp_path / "config.yaml", config_mapping(folders, emulator)), env={})
    assert result.returncode == 2
    assert "CODEFORMER_API_KEY" in result.stderr and "api.api_key_file" in result.stderr
    assert "api_key" in result.stderr and not folders["state"].exists()


def test_unreadable_config_file_is_a_clear_error(tmp_path):
    result = run_cli(tmp_path / "missing.yaml")
    assert result.returncode == 2 and "cannot read configuration file" in result.stderr


def test_key_sources_in_order(tmp_path, folders, emulator):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "api_key").write_text("from-credential")
    config = config_from_mapping(config_mapping(folders, emulator, api={"api_key_file": str(key_file)}), tmp_path)
    assert resolve_api_key(config, {"CODEFORMER_API_KEY": "from-env"}) == Secret("from-env")
    assert resolve_api_key(config, {}) == Secret("from-file")
    plain = config_from_mapping(config_mapping(folders, emulator), tmp_path)
    assert resolve_api_key(plain, {"CREDENTIALS_DIRECTORY": str(credentials)}) == Secret("from-credential")
    with pytest.raises(ConfigError, match="api.api_key_file"):
        resolve_api_key(plain, {})


def test_secret_never_shows_itself():
    secret = Secret("sk-very-secret")
    assert "sk-very-secret" not in repr(secret) and "sk-very-secret" not in str(secret)
    assert "sk-very-secret" not in f"{secret}"


def test_defaults_are_the_providers(tmp_path, folders, emulator):
    mapping = config_mapping(folders, emulator)
    del mapping["api"]["base_url"], mapping["api"]["status_url"], mapping["restore"]
    config = config_from_mapping(mapping, tmp_path)
    assert config.api.base_url == "https://gateway.pixazo.ai/codeformer-image-restoration/v1"
    assert config.api.status_url == "https://gateway.pixazo.ai/v2/requests/status"
    assert config.restore.as_request() == {"codeformer_fidelity": 0.5, "background_enhance": True,
                                           "face_upsample": True, "upscale": 2}


def schema_keys(cls, prefix: str = ""):
    """Every dotted key of the configuration schema."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_keys(hints[f.name], prefix + f.name + ".")


def test_example_config_is_valid_and_documents_every_key(tmp_path):
    import yaml

    from daemon.config import Config

    example = Path(__file__).parent.parent / "config.example.yaml"
    text = example.read_text()
    data = yaml.safe_load(text)
    (tmp_path / "inbox").mkdir()
    data["folders"] = {k: str(tmp_path / k) for k in ("inbox", "outbox", "archive", "failed")}
    data["state_dir"] = str(tmp_path / "state")
    config_from_mapping(data, tmp_path)
    for dotted in schema_keys(Config):
        assert f"{dotted.rsplit('.', 1)[-1]}:" in text, f"config.example.yaml does not document {dotted}"


def test_load_config_resolves_relative_paths_against_the_file(tmp_path, emulator):
    (tmp_path / "in").mkdir()
    path = write_config(tmp_path / "c.yaml", {
        "folders": {"inbox": "in", "outbox": "out", "archive": "arch", "failed": "fail"}, "state_dir": "state"})
    config = load_config(path)
    assert config.folders.inbox == tmp_path / "in" and config.state_dir == tmp_path / "state"


@pytest.mark.parametrize("bad_key", ["KEY123\nLINE2", "KEY123 XYZ", "KEY123\tXYZ"])
def test_a_key_a_header_cannot_carry_is_refused_without_showing_it(tmp_path, folders, emulator, bad_key):
    key_file = tmp_path / "key"
    key_file.write_text(bad_key)
    config = config_from_mapping(config_mapping(folders, emulator, api={"api_key_file": str(key_file)}), tmp_path)
    with pytest.raises(ConfigError, match="api.api_key_file") as raised:
        resolve_api_key(config, {})
    assert "KEY123" not in str(raised.value)
