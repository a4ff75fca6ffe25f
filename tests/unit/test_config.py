"""Configuration: every variable declared once, validated, with its source."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import config
from app.config import SETTINGS, ConfigError, derived_max_connections, load, rows

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
    ],
)
def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load()
    assert f"invalid {name}={value!r}" in str(info.value)
    assert "accepts:" in str(info.value)


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
