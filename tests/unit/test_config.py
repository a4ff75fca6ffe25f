"""Configuration: every variable declared once, validated, with its source."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from marshmallow import ValidationError

from app import config
from app.config import SETTINGS, ConfigError, Settings, derived_max_connections, load, markdown, rows

NAMES = [s.name for s in SETTINGS]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    s = load()
    assert (s.host, s.port) == ("127.0.0.1", 1060)
    assert s.workers == (os.cpu_count() or 1)
    assert s.graceful_timeout == 25.0
    assert s.max_request_bytes == 1024
    assert s.log_format == "auto"
    assert s.sources["PORT"] == "default"
    assert s.sources["WORKERS"] == "derived (CPU cores)"


def test_environment_values_and_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "2000")
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("REQUEST_TIMEOUT", "1.5")
    s = load()
    assert (s.port, s.workers, s.request_timeout) == (2000, 3, 1.5)
    assert s.sources["PORT"] == "env"


def test_web_concurrency_when_workers_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "5")
    s = load()
    assert s.workers == 5
    assert s.sources["WORKERS"] == "WEB_CONCURRENCY"
    monkeypatch.setenv("WORKERS", "2")
    assert load().workers == 2


def test_dotenv_file_is_honoured_and_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PORT=3000\nIDLE_TIMEOUT=7\n")
    monkeypatch.setenv("IDLE_TIMEOUT", "9")
    s = load(tmp_path / ".env")
    assert s.port == 3000
    assert s.sources["PORT"] == ".env"
    assert s.idle_timeout == 9
    assert s.sources["IDLE_TIMEOUT"] == "env"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("WORKERS", "0"),
        ("REQUEST_TIMEOUT", "-1"),
        ("IDLE_TIMEOUT", "0"),
        ("LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
        ("MAX_REQUEST_BYTES", "0"),
        ("BACKLOG", "x"),
        ("WORKER_TIMEOUT", "1"),
        ("WORKER_TIMEOUT", "-5"),
        ("MAX_REQUESTS", "-1"),
        ("MAX_REQUESTS_JITTER", "x"),
    ],
)
def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load()
    assert f"invalid {name}={value!r}" in str(info.value)
    assert "accepts:" in str(info.value)


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("2", 2.0), ("30", 30.0), ("3600", 3600.0)])
def test_worker_timeout_is_off_or_at_least_two_seconds(
    monkeypatch: pytest.MonkeyPatch, value: str, seconds: float
) -> None:
    monkeypatch.setenv("WORKER_TIMEOUT", value)
    assert load().worker_timeout == seconds


def test_all_errors_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "abc")
    monkeypatch.setenv("WORKERS", "0")
    with pytest.raises(ConfigError) as info:
        load()
    message = str(info.value)
    assert "PORT" in message
    assert "WORKERS" in message


def test_max_connections_derived_from_rlimit() -> None:
    assert derived_max_connections(1024) == 1024 - config.FD_RESERVE
    assert derived_max_connections(10) == 1
    assert load().sources["MAX_CONNECTIONS"] == "derived (RLIMIT_NOFILE)"


def test_rows_cover_every_variable_once() -> None:
    names = [name for name, _, _ in rows(load())]
    assert names == NAMES
    assert len(set(names)) == len(names)


def test_every_setting_is_documented() -> None:
    for setting in SETTINGS:
        assert setting.doc
        assert setting.name.isupper()


@pytest.mark.parametrize(
    ("name", "value", "attribute", "normalised"),
    [
        ("LOG_LEVEL", " INFO ", "log_level", "info"),
        ("LOG_LEVEL", "Warning", "log_level", "warning"),
        ("LOG_FORMAT", "JSON\t", "log_format", "json"),
        ("PROXY_PROTOCOL", " V2", "proxy_protocol", "v2"),
        ("PROXY_PROTOCOL", "ANY", "proxy_protocol", "any"),
    ],
)
def test_choices_ignore_case_and_blanks(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, attribute: str, normalised: str
) -> None:
    monkeypatch.setenv(name, value)
    s = load()
    assert getattr(s, attribute) == normalised
    assert (name, normalised, "env") in rows(s)


def test_choices_from_the_dotenv_file_are_normalised_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LOG_LEVEL=DEBUG\n")
    s = load(tmp_path / ".env")
    assert s.log_level == "debug"
    assert s.sources["LOG_LEVEL"] == ".env"


@pytest.mark.parametrize(
    ("name", "value", "accepts"),
    [
        ("LOG_LEVEL", "verbose", "debug | info | warning | error | critical"),
        ("LOG_FORMAT", "j son", "json | console | auto"),
        ("PROXY_PROTOCOL", "v3", "off | v1 | v2 | any"),
        ("PROXY_PROTOCOL", "", "off | v1 | v2 | any"),
    ],
)
def test_a_wrong_choice_names_what_it_accepts(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, accepts: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load()
    assert str(info.value).startswith(f"invalid {name}={value!r}: Must be one of:")
    assert f"(accepts: {accepts}" in str(info.value)


def test_an_error_in_the_dotenv_file_shows_the_files_value(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PORT=eighty\n")
    with pytest.raises(ConfigError, match=r"^invalid PORT='eighty': Not a valid integer\."):
        load(tmp_path / ".env")


def test_proxy_trusted_items_are_stripped_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_TRUSTED", " 10.0.0.0/8 , ,::1 ")
    s = load()
    assert s.proxy_trusted == ("10.0.0.0/8", "::1")
    assert ("PROXY_TRUSTED", "10.0.0.0/8,::1", "env") in rows(s)
    monkeypatch.setenv("PROXY_TRUSTED", "10.0.0.0/8,gateway")
    with pytest.raises(ConfigError, match="'gateway' is not a CIDR"):
        load()


@pytest.mark.parametrize(
    ("spelled", "meaning"),
    [
        *[(s, True) for s in ("1", "true", "True", "YES", "on", " On ")],
        *[(s, False) for s in ("0", "false", "FALSE", "no", "Off", "\tno\n")],
        (True, True),
        (False, False),
    ],
)
def test_boolean_spellings(spelled: str | bool, meaning: bool) -> None:
    assert config._parse_flag(spelled) is meaning


@pytest.mark.parametrize("spelled", ["", "2", "y", "enabled", "truthy"])
def test_boolean_rejects_other_words(spelled: str) -> None:
    with pytest.raises(ValidationError, match="1/0, true/false, yes/no or on/off"):
        config._parse_flag(spelled)


def test_every_field_is_one_declared_variable() -> None:
    fields = [f.name for f in dataclasses.fields(Settings) if f.name != "sources"]
    assert [s.attribute for s in SETTINGS] == fields
    assert [f.upper() for f in fields] == NAMES
    kinds = {s.name: s.kind for s in SETTINGS}
    assert (kinds["PORT"], kinds["REQUEST_TIMEOUT"], kinds["HOST"]) == ("int", "float", "str")
    assert (kinds["WEB_CONCURRENCY"], kinds["PROXY_TRUSTED"], kinds["LOG_LEVEL"]) == ("int", "csv", "choice")


def test_settings_without_the_loader_agree_with_it() -> None:
    """Settings() and load() share each default; only the two machine-derived ones differ, on purpose."""
    built, loaded = Settings(), load()
    derived = {s.attribute for s in SETTINGS if s.derived}
    assert derived == {"workers", "max_connections"}
    for s in SETTINGS:
        if s.attribute not in derived:
            assert getattr(built, s.attribute) == getattr(loaded, s.attribute), s.name
    # Settings() does no I/O, so it cannot count cores or read RLIMIT_NOFILE: fixed values instead.
    assert (built.workers, built.max_connections) == (1, 1024)
    assert {s.name: s.default for s in SETTINGS if s.derived} == {"WORKERS": None, "MAX_CONNECTIONS": 0}


def test_markdown_is_a_table_of_every_variable() -> None:
    lines = markdown().splitlines()
    assert lines[:2] == ["| variable | default | meaning |", "| --- | --- | --- |"]
    assert [line.split("`")[1] for line in lines[2:]] == NAMES
    assert all(line.count(" | ") == 2 for line in lines[2:])  # a '|' inside a doc is escaped
    assert "| `PROXY_TRUSTED` | `127.0.0.0/8,::1/128` |" in markdown()  # spelled as the variable is
    assert "| `LOG_LEVEL` | `info` | debug \\| info \\| warning \\| error \\| critical |" in lines
    assert "| `WORKERS` |  | worker processes" in markdown()  # derived: no fixed default
