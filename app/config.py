"""Every setting of the server, declared once, read from the environment.

Owns: the names, types, defaults, validation and one-line docs of every
environment variable, and reading them (with a ``.env`` file in the working
directory) into a frozen :class:`Settings`.  This is the only module that
reads ``os.environ``; everything else receives ``Settings``.

Never: binds sockets, configures logging or starts anything (the mistake of
uvicorn's ``Config``).

Error handling: every invalid variable is collected (environs with
``eager=False`` and ``seal()``), so one run shows them all; :func:`load`
raises :class:`ConfigError` and the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dotenv import dotenv_values
from environs import Env, EnvValidationError
from marshmallow import ValidationError
from marshmallow.validate import OneOf, Range

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS: Final = ("auto", "json", "console")
PROXY_MODES: Final = ("off", "v1", "v2", "any")

#: File descriptors a worker keeps for itself (listener, pipes, log, the
#: interpreter's own) when ``MAX_CONNECTIONS`` is derived from RLIMIT_NOFILE.
FD_RESERVE: Final = 64


class ConfigError(Exception):
    """One or more variables are invalid; ``str()`` names each one."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable: how to parse it, its default and its doc."""

    name: str
    kind: str  # environs parser: "str", "int", "float", "list"
    default: Any
    doc: str
    validate: Callable[[Any], Any] | None = None


def _valid_cidrs(cidrs: list[str]) -> None:
    """PROXY_TRUSTED: every entry an IPv4 or IPv6 network (a bare address is a /32 or /128)."""
    for cidr in cidrs:
        if cidr.strip():
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise ValidationError(f"{cidr.strip()!r} is not a CIDR") from None


#: Timeouts must be strictly positive: 0 would close every connection at once.
_positive: Final = Range(min=0, min_inclusive=False)


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("HOST", "str", "127.0.0.1", "address to listen on (0.0.0.0 for all IPv4 interfaces)"),
    Setting("PORT", "int", 1060, "TCP port (the book's 1060; a PaaS sets it)", Range(0, 65535)),
    Setting(
        "WORKERS", "int", None, "worker processes (default: WEB_CONCURRENCY, else one per CPU core)", Range(1, 1024)
    ),
    Setting("WEB_CONCURRENCY", "int", None, "worker processes when WORKERS is unset (PaaS convention)", Range(1, 1024)),
    Setting(
        "BACKLOG", "int", 2048, "listen() backlog per worker socket (capped by net.core.somaxconn)", Range(1, 65535)
    ),
    Setting("LOG_LEVEL", "str", "info", "debug | info | warning | error | critical", OneOf(LOG_LEVELS)),
    Setting(
        "LOG_FORMAT", "str", "auto", "json | console | auto (console on a terminal, JSON otherwise)", OneOf(LOG_FORMATS)
    ),
    Setting(
        "LOG_FLUSH_INTERVAL",
        "float",
        0.05,
        "seconds a connection_closed line may wait to share one write (of at most 4 KiB) with others; 0: at once",
        Range(0, 10),
    ),
    Setting(
        "REQUEST_TIMEOUT", "float", 10.0, "seconds a started question has to complete (not reset per byte)", _positive
    ),
    Setting("IDLE_TIMEOUT", "float", 60.0, "seconds a connection may stay with no question started", _positive),
    Setting("MAX_REQUEST_BYTES", "int", 1024, "longest question in bytes, counting the '?'", Range(1, 1 << 20)),
    Setting(
        "MAX_CONNECTIONS", "int", 0, "open connections per worker; 0 derives it from RLIMIT_NOFILE", Range(0, 1 << 20)
    ),
    Setting(
        "MAX_UNSENT_BYTES",
        "int",
        65536,
        "unsent answer bytes per connection before reading pauses",
        Range(1024, 1 << 24),
    ),
    Setting(
        "GRACEFUL_TIMEOUT",
        "float",
        25.0,
        "seconds a graceful stop waits for connections (inside Heroku's 30)",
        Range(0, 3600),
    ),
    Setting(
        "DRAIN_QUIET",
        "float",
        1.0,
        "during a stop, close a connection once quiet between questions this long",
        Range(0, 60),
    ),
    Setting("CHECK_TIMEOUT", "float", 3.0, "seconds 'python -m app check' waits for the answer", _positive),
    Setting(
        "LAB_POOL_SIZE",
        "int",
        8,
        "threads or processes of the lab's fixed pools (python -m app lab threadpool|prefork)",
        Range(1, 4096),
    ),
    Setting(
        "PROXY_PROTOCOL",
        "str",
        "off",
        "off | v1 | v2 | any: every connection must start with a PROXY header of that version (HAProxy send-proxy)",
        OneOf(PROXY_MODES),
    ),
    Setting(
        "PROXY_TRUSTED",
        "list",
        ["127.0.0.0/8", "::1/128"],
        "comma-separated CIDRs of the load balancers; with PROXY_PROTOCOL on, other peers are closed at once",
        _valid_cidrs,
    ),
    Setting(
        "ADMIN_PORT",
        "int",
        0,
        "port of the admin HTTP listener (/metrics, /healthz, /readyz); 0 = off",
        Range(0, 65535),
    ),
    Setting("ADMIN_HOST", "str", "127.0.0.1", "address of the admin HTTP listener (keep it private)"),
    Setting(
        "PROMETHEUS_MULTIPROC_DIR",
        "str",
        "",
        "directory of the workers' metric files (default: a temporary one); cleaned at start",
    ),
)

_BY_NAME: Final = {s.name: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration; build it with :func:`load`."""

    host: str = "127.0.0.1"
    port: int = 1060
    workers: int = 1
    backlog: int = 2048
    log_level: str = "info"
    log_format: str = "auto"
    log_flush_interval: float = 0.05
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_request_bytes: int = 1024
    max_connections: int = 1024
    max_unsent_bytes: int = 65536
    graceful_timeout: float = 25.0
    drain_quiet: float = 1.0
    check_timeout: float = 3.0
    lab_pool_size: int = 8
    proxy_protocol: str = "off"
    proxy_trusted: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    admin_port: int = 0
    admin_host: str = "127.0.0.1"
    prometheus_multiproc_dir: str = ""
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (for tests and derived values)."""
        return dataclasses.replace(self, **changes)


def derived_max_connections(nofile_soft: int | None = None) -> int:
    """Connections one worker can hold without EMFILE: RLIMIT_NOFILE less a reserve."""
    if nofile_soft is None:
        nofile_soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile_soft == resource.RLIM_INFINITY:
        nofile_soft = 1 << 20
    return max(1, min(nofile_soft, 1 << 20) - FD_RESERVE)


def load(dotenv: Path | None = Path(".env")) -> Settings:
    """Read every variable (environment first, then ``dotenv``) into :class:`Settings`.

    Raises :class:`ConfigError` naming every invalid variable.
    """
    env = Env(eager=False)
    from_file: set[str] = set()
    if dotenv is not None and dotenv.is_file():
        from_file = {k for k, v in dotenv_values(dotenv).items() if v is not None}
        env.read_env(str(dotenv), recurse=False, override=False)
    values: dict[str, Any] = {}
    for s in SETTINGS:
        parse = getattr(env, s.kind)
        values[s.name] = parse(s.name, s.default, validate=s.validate)
    try:
        env.seal()
    except EnvValidationError as exc:
        messages = exc.error_messages
        raise ConfigError(_describe(messages if isinstance(messages, Mapping) else {"": messages})) from None
    sources = {
        s.name: "env" if s.name in os.environ else ".env" if s.name in from_file else "default" for s in SETTINGS
    }
    return _settings(values, sources)


def _settings(values: dict[str, Any], sources: dict[str, str]) -> Settings:
    workers = values["WORKERS"] or values["WEB_CONCURRENCY"] or os.cpu_count() or 1
    if values["WORKERS"] is None:
        sources["WORKERS"] = "WEB_CONCURRENCY" if values["WEB_CONCURRENCY"] else "derived (CPU cores)"
    max_conn = values["MAX_CONNECTIONS"] or derived_max_connections()
    if not values["MAX_CONNECTIONS"]:
        sources["MAX_CONNECTIONS"] = "derived (RLIMIT_NOFILE)"
    return Settings(
        host=values["HOST"],
        port=values["PORT"],
        workers=workers,
        backlog=values["BACKLOG"],
        log_level=values["LOG_LEVEL"],
        log_format=values["LOG_FORMAT"],
        log_flush_interval=values["LOG_FLUSH_INTERVAL"],
        request_timeout=values["REQUEST_TIMEOUT"],
        idle_timeout=values["IDLE_TIMEOUT"],
        max_request_bytes=values["MAX_REQUEST_BYTES"],
        max_connections=max_conn,
        max_unsent_bytes=values["MAX_UNSENT_BYTES"],
        graceful_timeout=values["GRACEFUL_TIMEOUT"],
        drain_quiet=values["DRAIN_QUIET"],
        check_timeout=values["CHECK_TIMEOUT"],
        lab_pool_size=values["LAB_POOL_SIZE"],
        proxy_protocol=values["PROXY_PROTOCOL"],
        proxy_trusted=tuple(c.strip() for c in values["PROXY_TRUSTED"] if c.strip()),
        admin_port=values["ADMIN_PORT"],
        admin_host=values["ADMIN_HOST"],
        prometheus_multiproc_dir=values["PROMETHEUS_MULTIPROC_DIR"],
        sources=sources,
    )


def _describe(errors: Mapping[str, Any]) -> str:
    lines = []
    for name in sorted(errors):
        setting = _BY_NAME.get(name)
        accepts = f" (accepts: {setting.doc})" if setting else ""
        got = os.environ.get(name, "")
        lines.append(f"invalid {name}={got!r}: {'; '.join(map(str, _flatten(errors[name])))}{accepts}")
    return "\n".join(lines)


def _flatten(messages: Any) -> list[Any]:
    if isinstance(messages, dict):
        return [m for v in messages.values() for m in _flatten(v)]
    if isinstance(messages, list):
        return [m for v in messages for m in _flatten(v)]
    return [messages]


def rows(settings: Settings) -> list[tuple[str, str, str]]:
    """(variable, effective value, source) for every setting, for ``app config``."""
    effective = {
        "WEB_CONCURRENCY": settings.workers if settings.sources.get("WORKERS") == "WEB_CONCURRENCY" else None,
    }
    out = []
    for s in SETTINGS:
        value = effective.get(s.name, getattr(settings, s.name.lower(), None))
        if isinstance(value, tuple):
            value = ",".join(value)
        out.append((s.name, "" if value is None else str(value), settings.sources.get(s.name, "default")))
    return out


def markdown() -> str:
    """The README's table of variables: name, default, meaning."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for s in SETTINGS:
        default = "" if s.default is None else str(s.default)
        doc = s.doc.replace("|", "\\|")
        lines.append(f"| `{s.name}` | {f'`{default}`' if default else ''} | {doc} |")
    return "\n".join(lines)
