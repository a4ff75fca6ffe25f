"""Every setting of the server, declared once, read from the environment.

Owns: the names, types, defaults, validation and one-line docs of every
environment variable, and reading them (with a ``.env`` file in the working
directory) into a frozen :class:`Settings`.  Each variable is one field of
:class:`Settings` declared with :func:`setting`; the loader (:func:`load`),
the ``app config`` listing (:func:`rows`) and the table of docs/configuration.md
(:func:`markdown`) all iterate those fields.  This is the only module that
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
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from dotenv import dotenv_values
from environs import Env, EnvValidationError
from marshmallow import ValidationError
from marshmallow.validate import OneOf, Range

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS: Final = ("json", "console", "auto")
PROXY_MODES: Final = ("off", "v1", "v2", "any")
#: The event loops a worker can run (app.server.loops), as uvicorn's ``--loop``.
LOOPS: Final = ("auto", "uvloop", "asyncio")
TLS_VERSIONS: Final = ("1.2", "1.3")

#: File descriptors a worker keeps for itself (listener, pipes, log, the
#: interpreter's own) when ``MAX_CONNECTIONS`` is derived from RLIMIT_NOFILE.
FD_RESERVE: Final = 64

#: Spellings of a boolean variable, compared after ``strip().lower()``.
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})

_T = TypeVar("_T")
Validator = Callable[[Any], Any]


class ConfigError(Exception):
    """One or more variables are invalid; ``str()`` names each one."""


@dataclass(frozen=True, slots=True)
class _Declared:
    """What :func:`setting` records in a field's metadata."""

    doc: str
    validate: Validator | None
    choices: tuple[str, ...]
    env: str
    derived: bool
    unset: Any


def setting(
    default: _T,
    doc: str,
    *,
    validate: Validator | None = None,
    choices: tuple[str, ...] = (),
    env: str = "",
    derived_if: Any = ...,
) -> _T:
    """Declare one environment variable as a field of :class:`Settings`.

    ``env`` names the variable (default: the field's name upper-cased); its
    type picks the parser.  ``choices`` makes it case- and blank-insensitive
    and normalised to the lower-case choice; ``{choices}`` in ``doc`` spells
    them out.  ``derived_if`` is the variable's value (and the loader's
    default when unset) that asks :func:`load` to derive the setting from the
    machine; ``default`` then is only what ``Settings()`` gives, which does no
    I/O and so cannot derive.
    """
    derived = derived_if is not ...
    declared = _Declared(
        doc=doc.format(choices=" | ".join(choices)),
        validate=validate,
        choices=choices,
        env=env,
        derived=derived,
        unset=derived_if if derived else default,
    )
    return dataclasses.field(default=default, metadata={"setting": declared})


def _valid_cidrs(cidrs: tuple[str, ...]) -> None:
    """PROXY_TRUSTED: every entry an IPv4 or IPv6 network (a bare address is a /32 or /128)."""
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValidationError(f"{cidr!r} is not a CIDR") from None


#: Timeouts must be strictly positive: 0 would close every connection at once.
_positive: Final = Range(min=0, min_inclusive=False)
#: A worker beats twice a second (app.server.heartbeat): a timeout under 2 s
#: would take a loop that is merely late for a hung one.
_MIN_WORKER_TIMEOUT: Final = 2.0


def _valid_worker_timeout(seconds: float) -> None:
    """WORKER_TIMEOUT: 0 (off) or at least _MIN_WORKER_TIMEOUT, at most an hour."""
    if seconds != 0 and not _MIN_WORKER_TIMEOUT <= seconds <= 3600:
        raise ValidationError(f"must be 0 (off) or between {_MIN_WORKER_TIMEOUT:g} and 3600 seconds")


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration; build it with :func:`load`.

    ``Settings()`` gives every variable's default except the two the loader
    derives from the machine, which get fixed values instead: ``workers=1``
    and ``max_connections=1024`` (what tests and embedders want: no I/O, the
    same on every machine).
    """

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 for all IPv4 interfaces)")
    port: int = setting(1060, "TCP port (the book's 1060; a PaaS sets it)", validate=Range(0, 65535))
    workers: int = setting(
        1,
        "worker processes (default: WEB_CONCURRENCY, else one per CPU core)",
        validate=Range(1, 1024),
        derived_if=None,
    )
    web_concurrency: int | None = setting(
        None, "worker processes when WORKERS is unset (PaaS convention)", validate=Range(1, 1024)
    )
    backlog: int = setting(
        2048, "listen() backlog per worker socket (capped by net.core.somaxconn)", validate=Range(1, 65535)
    )
    loop: str = setting(
        "auto",
        "{choices}: the workers' event loop; auto = uvloop when it imports, else asyncio's (with a warning)",
        choices=LOOPS,
    )
    log_level: str = setting("info", "{choices}", choices=LOG_LEVELS)
    log_format: str = setting("auto", "{choices} (console on a terminal, JSON otherwise)", choices=LOG_FORMATS)
    log_flush_interval: float = setting(
        0.05,
        "seconds a connection_closed line may wait to share one write (of at most 4 KiB) with others; 0: at once",
        validate=Range(0, 10),
    )
    #: Why 1 MiB: about 5,000 connection lines, several seconds of a busy
    #: worker's log, enough to ride out a log shipper's hiccup; small beside a
    #: worker's memory, and bounded, so a reader that never comes back costs
    #: a fixed 1 MiB per process, not the server.
    log_buffer_bytes: int = setting(
        1 << 20,
        "bytes of log lines a process keeps while its stdout reader stalls; beyond it lines are dropped and counted",
        validate=Range(4096, 1 << 30),
    )
    request_timeout: float = setting(
        10.0, "seconds a started question has to complete (not reset per byte)", validate=_positive
    )
    idle_timeout: float = setting(60.0, "seconds a connection may stay with no question started", validate=_positive)
    max_request_bytes: int = setting(1024, "longest question in bytes, counting the '?'", validate=Range(1, 1 << 20))
    max_connections: int = setting(
        1024,
        "open connections per worker; 0 derives it from RLIMIT_NOFILE",
        validate=Range(0, 1 << 20),
        derived_if=0,
    )
    max_unsent_bytes: int = setting(
        65536, "unsent answer bytes per connection before reading pauses", validate=Range(1024, 1 << 24)
    )
    graceful_timeout: float = setting(
        25.0, "seconds a graceful stop waits for connections (inside Heroku's 30)", validate=Range(0, 3600)
    )
    #: Why 30 s (gunicorn's --timeout default): a live loop beats twice a
    #: second even at 100 % CPU, so only a real hang goes silent for seconds;
    #: 30 s still outlasts a long garbage collection, a swap storm or a
    #: CPU-throttled container, which would otherwise kill healthy workers,
    #: and bounds what a hang costs the connections queued on its socket to
    #: about the timeouts clients commonly use.
    worker_timeout: float = setting(
        30.0,
        "seconds a worker's event loop may stay silent before it is declared hung, its stack dumped, "
        "and it is killed and replaced; 0 = never (at least 2)",
        validate=_valid_worker_timeout,
    )
    max_requests: int = setting(
        0,
        "questions a worker answers before it is replaced (zero-downtime, like HUP); 0 = never",
        validate=Range(0, 1 << 40),
    )
    max_requests_jitter: int = setting(
        0,
        "each worker adds a random 0..this to MAX_REQUESTS, so workers do not recycle together",
        validate=Range(0, 1 << 40),
    )
    drain_quiet: float = setting(
        1.0, "during a stop, close a connection once quiet between questions this long", validate=Range(0, 60)
    )
    check_timeout: float = setting(3.0, "seconds 'python -m app check' waits for the answer", validate=_positive)
    lab_pool_size: int = setting(
        8,
        "threads or processes of the lab's fixed pools (python -m app lab threadpool|prefork)",
        validate=Range(1, 4096),
    )
    proxy_protocol: str = setting(
        "off",
        "{choices}: every connection must start with a PROXY header of that version (HAProxy send-proxy)",
        choices=PROXY_MODES,
    )
    proxy_trusted: tuple[str, ...] = setting(
        ("127.0.0.0/8", "::1/128"),
        "comma-separated CIDRs of the load balancers; with PROXY_PROTOCOL on, other peers are closed at once",
        validate=_valid_cidrs,
    )
    tls_cert_file: str = setting(
        "", "PEM certificate chain; with TLS_KEY_FILE, the Zen port speaks TLS only (see docs/tls.md)"
    )
    tls_key_file: str = setting("", "PEM private key of TLS_CERT_FILE")
    tls_client_ca_file: str = setting(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)"
    )
    tls_min_version: str = setting("1.2", "{choices}: the oldest TLS version accepted", choices=TLS_VERSIONS)
    #: Why 14 days: a probe that starts failing two weeks before expiry
    #: leaves a working fortnight to renew, and is still late enough not to
    #: fire for a certificate renewed on the usual 30-days-before schedule.
    tls_expiry_warn_days: int = setting(
        14, "'check' fails when the server's certificate expires in fewer days", validate=Range(0, 3650)
    )
    tls_check_ca_file: str = setting(
        "", "PEM CA bundle 'check' verifies the server's certificate with (default: no verification)"
    )
    tls_check_cert_file: str = setting("", "PEM client certificate 'check' presents (mutual TLS)")
    tls_check_key_file: str = setting("", "PEM private key of TLS_CHECK_CERT_FILE")
    admin_port: int = setting(
        0, "port of the admin HTTP listener (/metrics, /healthz, /readyz); 0 = off", validate=Range(0, 65535)
    )
    admin_host: str = setting("127.0.0.1", "address of the admin HTTP listener (keep it private)")
    prometheus_multiproc_dir: str = setting(
        "", "directory of the workers' metric files (default: a temporary one); cleaned at start"
    )
    #: Where each variable's value came from (``app config``'s third column).
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (for tests and derived values)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable, as its :class:`Settings` field declares it."""

    name: str  # the environment variable
    attribute: str  # the Settings field
    kind: str  # the environs parser, from the field's type
    default: Any  # the loader's value when unset (None: unset; see ``derived``)
    doc: str
    validate: Validator | None = None
    choices: tuple[str, ...] = ()
    derived: bool = False  # ``default`` asks the loader to derive the value


#: The parser of each field type (``X | None`` uses X's).
_KINDS: Final[Mapping[object, str]] = {str: "str", int: "int", float: "float", bool: "flag", tuple[str, ...]: "csv"}


def _kind(hint: object, choices: tuple[str, ...]) -> str:
    if choices:
        return "choice"
    if isinstance(hint, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return _KINDS[hint]


def _declarations() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(Settings)
    out = []
    for field in dataclasses.fields(Settings):
        declared: _Declared | None = field.metadata.get("setting")
        if declared is not None:
            out.append(
                Setting(
                    name=declared.env or field.name.upper(),
                    attribute=field.name,
                    kind=_kind(hints[field.name], declared.choices),
                    default=declared.unset,
                    doc=declared.doc,
                    validate=declared.validate,
                    choices=declared.choices,
                    derived=declared.derived,
                )
            )
    return tuple(out)


#: Every variable, in the order of the fields of :class:`Settings`.
SETTINGS: Final = _declarations()
_BY_NAME: Final = {s.name: s for s in SETTINGS}


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
    env = _env()
    from_file: dict[str, str] = {}
    if dotenv is not None and dotenv.is_file():
        from_file = {k: v for k, v in dotenv_values(dotenv).items() if v is not None}
        env.read_env(str(dotenv), recurse=False, override=False)
    values = {s.attribute: _read(env, s) for s in SETTINGS}
    try:
        env.seal()
    except EnvValidationError as exc:
        messages = exc.error_messages
        errors = messages if isinstance(messages, Mapping) else {"": messages}
        raise ConfigError(_describe(errors, {**from_file, **os.environ})) from None
    sources = {s.name: _source(s.name, from_file) for s in SETTINGS}
    _derive(values, sources)
    return Settings(**values, sources=sources)


def _source(name: str, from_file: Mapping[str, str]) -> str:
    return "env" if name in os.environ else ".env" if name in from_file else "default"


def _derive(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Fill the settings left to the machine: WORKERS (WEB_CONCURRENCY, else CPU cores), MAX_CONNECTIONS."""
    if values["workers"] is None:
        values["workers"] = values["web_concurrency"] or os.cpu_count() or 1
        sources["WORKERS"] = "WEB_CONCURRENCY" if values["web_concurrency"] else "derived (CPU cores)"
    if not values["max_connections"]:
        values["max_connections"] = derived_max_connections()
        sources["MAX_CONNECTIONS"] = "derived (RLIMIT_NOFILE)"


def _env() -> Env:
    env = Env(eager=False)
    env.add_parser("choice", _parse_choice)
    env.add_parser("csv", _parse_csv)
    env.add_parser("flag", _parse_flag)
    return env


def _read(env: Env, s: Setting) -> Any:
    """Parse one variable; an invalid one is recorded in ``env`` until ``seal()``."""
    options: dict[str, Any] = {}
    if s.validate is not None:
        options["validate"] = s.validate
    if s.choices:
        options["choices"] = s.choices
    return getattr(env, s.kind)(s.name, s.default, **options)


def _parse_choice(value: str, *, choices: tuple[str, ...]) -> str:
    """Any case, surrounding blanks ignored: ``" INFO "`` is ``info``."""
    normalised = value.strip().lower()
    OneOf(choices)(normalised)
    return normalised


def _parse_csv(value: str | tuple[str, ...], *, validate: Validator | None = None) -> tuple[str, ...]:
    """Comma-separated items, each stripped; empty items dropped."""
    items = value.split(",") if isinstance(value, str) else value
    parsed = tuple(item.strip() for item in items if item.strip())
    if validate is not None:
        validate(parsed)
    return parsed


def _parse_flag(value: str | bool) -> bool:
    """A boolean variable: 1/0, true/false, yes/no, on/off, in any case."""
    if isinstance(value, bool):
        return value
    spelled = value.strip().lower()
    if spelled in _TRUE or spelled in _FALSE:
        return spelled in _TRUE
    raise ValidationError("Not a boolean: use 1/0, true/false, yes/no or on/off.")


def _describe(errors: Mapping[str, Any], raw: Mapping[str, str]) -> str:
    lines = []
    for name in sorted(errors):
        setting = _BY_NAME.get(name)
        accepts = f" (accepts: {setting.doc})" if setting else ""
        got = raw.get(name, "")
        lines.append(f"invalid {name}={got!r}: {'; '.join(map(str, _flatten(errors[name])))}{accepts}")
    return "\n".join(lines)


def _flatten(messages: Any) -> list[Any]:
    if isinstance(messages, dict):
        return [m for v in messages.values() for m in _flatten(v)]
    if isinstance(messages, list):
        return [m for v in messages for m in _flatten(v)]
    return [messages]


def _shown(value: Any) -> str:
    """A value as it would be written in the environment."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def rows(settings: Settings) -> list[tuple[str, str, str]]:
    """(variable, effective value, source) for every setting, for ``app config``."""
    return [(s.name, _shown(getattr(settings, s.attribute)), settings.sources.get(s.name, "default")) for s in SETTINGS]


def markdown() -> str:
    """The table of variables in docs/configuration.md: name, default, meaning."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for s in SETTINGS:
        default = _shown(s.default)
        doc = s.doc.replace("|", "\\|")
        lines.append(f"| `{s.name}` | {f'`{default}`' if default else ''} | {doc} |")
    return "\n".join(lines)
