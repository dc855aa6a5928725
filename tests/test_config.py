"""Settings: environment, TOML file, precedence, unknown keys, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from twin.cli import app
from twin.config import env_names, load_settings
from twin.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("MGTWIN_"):
            monkeypatch.delenv(key)


def test_defaults_are_sensible() -> None:
    s = load_settings()
    assert s.site == "nevada"
    assert s.mqtt.qos == 1
    assert s.mqtt.session_expiry_s > 0  # a persistent session (the MQTT 5 trap, paho#877)
    assert s.health.host == "127.0.0.1"
    assert s.client_id == "mgtwin-nevada"
    assert s.influx.url is None


def test_precedence_cli_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "twin.toml"
    conf.write_text(
        'site = "from_file"\n[mqtt]\nurl = "mqtt://file:1"\nkeepalive_s = 40\n[ingest]\nstale_after_s = 9\n'
    )
    monkeypatch.setenv("MGTWIN_MQTT__URL", "mqtt://env:2")
    monkeypatch.setenv("MGTWIN_INGEST__STALE_AFTER_S", "11")
    s = load_settings(conf, mqtt={"url": "mqtt://cli:3", "username": None})
    assert s.site == "from_file"
    assert s.mqtt.keepalive_s == 40
    assert s.mqtt.url == "mqtt://cli:3"
    assert s.ingest.stale_after_s == 11.0
    monkeypatch.setenv("MGTWIN_CONFIG", str(conf))
    assert load_settings().site == "from_file"


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        s.site = "other"  # type: ignore[misc]


def test_unknown_key_in_file_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    conf = tmp_path / "twin.toml"
    conf.write_text("[ingest]\nbatch_max_mesages = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'ingest.batch_max_mesages'.*batch_max_messages"):
        load_settings(conf)


def test_unknown_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGTWIN_INFLUX__PASWORD", "x")
    with pytest.raises(ConfigError, match="MGTWIN_INFLUX__PASSWORD"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "value", "mentions"),
    [
        ("MGTWIN_SITE", "bad site", "site"),
        ("MGTWIN_MQTT__URL", "http://x:1", "mqtt.url"),
        ("MGTWIN_MQTT__QOS", "2", "mqtt.qos"),
        ("MGTWIN_INFLUX__URL", "http://user:pw@host:8086", "credentials"),
        ("MGTWIN_INGEST__BATCH_MAX_MESSAGES", "0", "batch_max_messages"),
    ],
)
def test_bad_values_are_refused_clearly(monkeypatch: pytest.MonkeyPatch, env: str, value: str, mentions: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=mentions):
        load_settings()


def test_bad_toml_is_a_clear_error(tmp_path: Path) -> None:
    conf = tmp_path / "twin.toml"
    conf.write_text("site = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(conf)


def test_secrets_never_in_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "twin.toml"
    conf.write_text('[influx]\ntoken = "abc"\n')
    with pytest.raises(ConfigError, match="MGTWIN_INFLUX__TOKEN"):
        load_settings(conf)


def test_secrets_from_env_and_files_are_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("tok-FROM-FILE-123\n")
    monkeypatch.setenv("MGTWIN_INFLUX__TOKEN_FILE", str(secret_file))
    monkeypatch.setenv("MGTWIN_MQTT__PASSWORD", "pw-FROM-ENV-456")
    s = load_settings()
    assert s.influx.token is not None
    assert s.influx.token.get_secret_value() == "tok-FROM-FILE-123"
    assert s.mqtt.password is not None
    assert s.mqtt.password.get_secret_value() == "pw-FROM-ENV-456"
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "FROM-FILE" not in text
        assert "FROM-ENV" not in text
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "FROM-" not in result.output
    assert "**********" in result.output


def test_missing_secret_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGTWIN_INFLUX__PASSWORD_FILE", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="cannot read secret file"):
        load_settings()


def test_env_names_cover_nested_fields() -> None:
    names = env_names()
    assert names["MGTWIN_INGEST__BATCH_MAX_MESSAGES"] == "ingest.batch_max_messages"
    assert names["MGTWIN_SITE"] == "site"
    assert "MGTWIN_CONFIG" in names
