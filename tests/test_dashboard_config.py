"""The dashboard's configuration: its own port, and a token wherever other machines can reach it."""

from __future__ import annotations

import pytest

from daemon.config import ConfigError, config_from_mapping, resolve_dashboard_token

from .conftest import config_mapping

TOKEN = "s3cret-dashboard-token-0123456789"


def build(folders, emulator, **dashboard):
    mapping = config_mapping(folders, emulator, dashboard=dashboard,
                             hosting={"adapter": "builtin", "builtin": {"listen": "127.0.0.1:8089"}})
    return config_from_mapping(mapping, folders["inbox"].parent)


def test_the_dashboard_is_on_loopback_by_default_and_needs_no_token_there(folders, emulator):
    mapping = config_mapping(folders, emulator)
    del mapping["dashboard"]
    config = config_from_mapping(mapping, folders["inbox"].parent)
    assert config.dashboard.listen == "127.0.0.1:8090"
    assert resolve_dashboard_token(config, environ={}) is None


def test_the_dashboard_may_not_share_the_built_in_hosts_port(folders, emulator):
    with pytest.raises(ConfigError, match=r"dashboard\.listen: port 8089 is the built-in host's"):
        build(folders, emulator, listen="127.0.0.1:8089")


def test_off_loopback_a_token_is_required(folders, emulator):
    config = build(folders, emulator, listen="0.0.0.0:8090")
    with pytest.raises(ConfigError, match=r"dashboard\.token_file: .*reachable from other machines"):
        resolve_dashboard_token(config, environ={})


def test_the_token_comes_from_the_file_or_the_systemd_credential(folders, emulator, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = build(folders, emulator, listen="0.0.0.0:8090", token_file=str(token_file))
    token = resolve_dashboard_token(config, environ={})
    assert token.reveal() == TOKEN and TOKEN not in repr(token)

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "dashboard_token").write_text(TOKEN)
    config = build(folders, emulator, listen="0.0.0.0:8090")
    assert resolve_dashboard_token(config, environ={"CREDENTIALS_DIRECTORY": str(credentials)}).reveal() == TOKEN


def test_a_guessable_token_is_refused_without_showing_it(folders, emulator, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("hunter2")
    config = build(folders, emulator, listen="127.0.0.1:8090", token_file=str(token_file))
    with pytest.raises(ConfigError, match="at least 16 printable characters") as caught:
        resolve_dashboard_token(config, environ={})
    assert "hunter2" not in str(caught.value)


def test_a_missing_token_file_is_named(folders, emulator, tmp_path):
    with pytest.raises(ConfigError, match=r"dashboard\.token_file: .*does not exist"):
        build(folders, emulator, listen="127.0.0.1:8090", token_file=str(tmp_path / "nope"))
