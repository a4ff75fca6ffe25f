"""The TLS settings as the loader reads them, and the pure helpers of app.server.tls."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from app.config import SETTINGS, ConfigError, Settings, load
from app.server.tls import enabled, error_name


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for s in SETTINGS:
        monkeypatch.delenv(s.name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_tls_is_off_by_default() -> None:
    settings = load()
    assert not enabled(settings)
    assert settings.tls_min_version == "1.2"
    assert settings.tls_expiry_warn_days == 14


def test_min_version_is_a_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLS_MIN_VERSION", " 1.3 ")
    assert load().tls_min_version == "1.3"
    monkeypatch.setenv("TLS_MIN_VERSION", "1.1")
    with pytest.raises(ConfigError, match=r"invalid TLS_MIN_VERSION='1.1'.*1\.2 \| 1\.3"):
        load()


def test_either_file_turns_tls_on() -> None:
    assert enabled(Settings(tls_cert_file="a.pem"))
    assert enabled(Settings(tls_key_file="a.key"))  # then the boot check asks for the other one


def test_error_names() -> None:
    wrong = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    wrong.reason = "WRONG_VERSION_NUMBER"
    assert error_name(wrong) == "WRONG_VERSION_NUMBER"
    expired = ssl.SSLCertVerificationError(1, "certificate verify failed")
    expired.reason = "CERTIFICATE_VERIFY_FAILED"
    expired.verify_message = "certificate has expired"
    assert error_name(expired) == "CERTIFICATE_VERIFY_FAILED (certificate has expired)"
    assert error_name(ConnectionResetError()) == "ConnectionResetError"
    assert error_name(None) == "eof"
