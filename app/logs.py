"""Structured logging: one event per line on stdout, JSON or console.

Owns: the structlog processor chain, chosen once per process by
:func:`configure`.  Events are snake_case names with key/value fields
(``connection_closed peer=... reason=eof``); JSON when stdout is not a
terminal, so supervisord, systemd, Docker and a PaaS collect them as is.

Never: opens files or rotates anything (the process manager owns the files),
and never writes client bytes unescaped (see ``protocol.printable``).

Each line goes out in one ``write(2)`` on the file descriptor, so lines of
the master and its workers, which share stdout, never interleave.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Final

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from app.config import Settings

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class FdLogger:
    """A structlog logger that writes each rendered event with one ``os.write``."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def msg(self, message: str | bytes) -> None:
        line = message.encode("utf-8", "backslashreplace") if isinstance(message, str) else message
        try:
            os.write(self._fd, line + b"\n")
        except (BrokenPipeError, BlockingIOError):
            pass  # a log reader that went away or stalls must not stop the server

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _Timestamp:
    """ISO 8601 UTC timestamps, the date-time part cached per second (hot path)."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1000):03d}Z"
        return event


def _json_default(value: Any) -> str:
    return repr(value)


def _render_json(_logger: WrappedLogger, _name: str, event: EventDict) -> bytes:
    return orjson.dumps(event, default=_json_default)


def use_json(settings: Settings, fd: int = 1) -> bool:
    """True when events should be JSON: LOG_FORMAT=json, or auto and ``fd`` not a terminal."""
    if settings.log_format == "auto":
        return not os.isatty(fd)
    return settings.log_format == "json"


def configure(settings: Settings, fd: int | None = None) -> None:
    """Set up structlog for this process; call once per process, first thing."""
    if fd is None:
        fd = sys.stdout.fileno()
    renderer: Any
    renderer = _render_json if use_json(settings, fd) else structlog.dev.ConsoleRenderer(colors=os.isatty(fd))
    structlog.configure(
        processors=[structlog.processors.add_log_level, _Timestamp(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.log_level]),
        logger_factory=lambda *_args: FdLogger(fd),
        cache_logger_on_first_use=True,
    )


def get_logger(**bound: Any) -> Any:
    """A logger with ``bound`` fields on every event."""
    return structlog.get_logger().bind(**bound)


class HotLogger:
    """The same events as :func:`get_logger`'s, for a line logged per connection.

    structlog's bound-logger machinery costs about 6.5 us an event here, a
    quarter of the server's whole CPU budget for a short connection; with
    JSON output this writes the identical line (same fields, same order,
    same timestamp) in about 1.5 us.  Console output, and levels below the
    configured one, go through structlog as usual.
    """

    __slots__ = ("_bound", "_fd", "_json", "_slow", "_timestamp")

    def __init__(self, settings: Settings, fd: int | None = None, **bound: Any) -> None:
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._json = use_json(settings, self._fd) and _LEVELS[settings.log_level] <= logging.INFO
        self._bound = bound
        self._slow = get_logger(**bound)
        self._timestamp = _Timestamp()

    def info(self, event: str, **fields: Any) -> None:
        """Log ``event`` at INFO."""
        if not self._json:
            self._slow.info(event, **fields)
            return
        record = {**self._bound, **fields, "event": event, "level": "info"}
        self._timestamp(None, "info", record)
        try:
            os.write(self._fd, orjson.dumps(record, default=_json_default, option=orjson.OPT_APPEND_NEWLINE))
        except (BrokenPipeError, BlockingIOError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._slow, name)
