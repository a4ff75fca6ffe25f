"""Structured logging: one event per line on stdout, JSON or console.

Owns: the structlog processor chain, chosen once per process by
:func:`configure`.  Events are snake_case names with key/value fields
(``connection_closed peer=... reason=eof``); JSON when stdout is not a
terminal, so supervisord, systemd, Docker and a PaaS collect them as is.

Never: opens files or rotates anything (the process manager owns the files),
and never writes client bytes unescaped (see ``protocol.printable``).

Each line goes out in one ``write(2)`` on the file descriptor, so lines of
the master and its workers, which share stdout, never interleave; the line
per connection is batched (:class:`HotLogger`), in writes that stay whole too.
The writes go through the process's :class:`app.logsink.LogSink`, which
never blocks on a stalled reader (bounded buffer, dropped lines counted and
reported by a ``logs_dropped`` event).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from app.config import Settings
from app.logsink import LogSink

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


_time = time.time


class FdLogger:
    """A structlog logger that writes each rendered event with one ``os.write``."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def msg(self, message: str | bytes) -> None:
        line = message.encode("utf-8", "backslashreplace") if isinstance(message, str) else message
        if _batching:
            flush_batches()  # batched connection lines were logged first
        _write(self._fd, line + b"\n")

    # structlog calls the method named after the level.  One method each, not aliases of msg:
    # compiled by mypyc, a class body can hold only methods and attribute defaults.

    def log(self, message: str | bytes) -> None:
        self.msg(message)

    def debug(self, message: str | bytes) -> None:
        self.msg(message)

    def info(self, message: str | bytes) -> None:
        self.msg(message)

    def warn(self, message: str | bytes) -> None:
        self.msg(message)

    def warning(self, message: str | bytes) -> None:
        self.msg(message)

    def error(self, message: str | bytes) -> None:
        self.msg(message)

    def critical(self, message: str | bytes) -> None:
        self.msg(message)

    def exception(self, message: str | bytes) -> None:
        self.msg(message)

    def fatal(self, message: str | bytes) -> None:
        self.msg(message)


class _Timestamp:
    """ISO 8601 UTC timestamps, the date-time part cached per second (hot path)."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        event["timestamp"] = self.text(int(_time() * 1000))
        return event

    def text(self, ms: int) -> str:
        """The timestamp of ``ms`` milliseconds since the epoch."""
        second = ms // 1000
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # The milliseconds' three digits without a format spec: compiled by mypyc, ``:03d`` is a
        # str.format call (about 2,000 instructions), str() of an int and a slice a few hundred.
        return f"{self._prefix}.{str(1000 + ms % 1000)[1:]}Z"


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
    _sinks[fd] = LogSink(fd, settings.log_buffer_bytes, dropped_line=lambda n: _dropped_line(renderer, n))
    structlog.configure(
        processors=[structlog.processors.add_log_level, _Timestamp(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.log_level]),
        logger_factory=lambda *_args: FdLogger(fd),
        cache_logger_on_first_use=True,
    )


def get_logger(**bound: Any) -> Any:
    """A logger with ``bound`` fields on every event."""
    return structlog.get_logger().bind(**bound)


#: A batch of connection_closed lines is written in one ``write(2)`` of at
#: most PIPE_BUF bytes: a pipe (supervisord, Docker, a PaaS) takes a write
#: that small whole, so the batch never interleaves with other processes' lines.
BATCH_BYTES: Final = 4096

#: The loggers holding batched lines (each from its batch's first line to its flush, so no
#: weak references: a logger is held only while it has lines to write); every other line
#: of the process flushes them first.
_batching: dict[HotLogger, None] = {}


def flush_batches() -> None:
    """Write every batched line now (before any other line, and at exit)."""
    for logger in list(_batching):
        logger.flush()


#: At exit a process waits this long at most for a slow log reader to take
#: the lines still in its buffer: long enough for a reader that is merely
#: behind (a second of a busy worker's log at 1 MB/s), short enough that a
#: reader that is gone delays a stop by little inside GRACEFUL_TIMEOUT's
#: budget.  What is still waiting after it is lost, unreported.
EXIT_DRAIN: Final = 5.0


def _at_exit() -> None:
    """Batched lines out, then a bounded wait for what waits in the sinks."""
    flush_batches()
    deadline = time.monotonic() + EXIT_DRAIN
    for found in list(_sinks.values()):
        found.drain(max(0.0, deadline - time.monotonic()))


atexit.register(_at_exit)


#: The process's sink per log descriptor (one in practice: stdout; tests use pipes).
_sinks: dict[int, LogSink] = {}


def sink(fd: int | None = None) -> LogSink:
    """The sink of ``fd`` (default stdout), made on first use if :func:`configure` did not."""
    if fd is None:
        fd = sys.stdout.fileno()
    found = _sinks.get(fd)
    if found is None:
        found = _sinks[fd] = LogSink(fd)
    return found


def _dropped_line(renderer: Any, count: int) -> bytes:
    """The ``logs_dropped`` event, rendered as this process renders every event."""
    event = {"pid": os.getpid(), "dropped": count, "event": "logs_dropped", "level": "warning"}
    event["timestamp"] = _Timestamp().text(int(_time() * 1000))
    line = renderer(None, "warning", event)
    return (line.encode("utf-8", "backslashreplace") if isinstance(line, str) else line) + b"\n"


def _write(fd: int, data: bytes) -> None:
    """Whole lines out through the fd's sink: never blocks (see ``app.logsink``)."""
    found = _sinks.get(fd)
    (found if found is not None else sink(fd)).write(data)


class HotLogger:
    """The same events as :func:`get_logger`'s, for a line logged per connection.

    structlog's bound-logger machinery costs about 6.5 us an event here, a
    quarter of the server's whole CPU budget for a short connection; with
    JSON output this renders the identical line (same fields, same order,
    same timestamp format) in about 1 us: the bound fields are rendered
    once, as the line's prefix, and the event and level once per event
    name; only the call's own fields are rendered per line, and the
    timestamp's text is reused within its millisecond.

    Writing a line cost as much again (a system call each, and a wake-up of
    the reader of a pipe), so lines are batched: written together once
    BATCH_BYTES would be exceeded, or ``LOG_FLUSH_INTERVAL`` after the first
    line of a batch, or before any other line of the process (so the order
    of lines is kept), or at exit.  Console output, and levels below the
    configured one, go through structlog as usual, unbatched.
    """

    __slots__ = (
        "_batch",
        "_batched",
        "_clock",
        "_fd",
        "_flush_interval",
        "_flush_pending",
        "_json",
        "_ms",
        "_now",
        "_prefix",
        "_slow",
        "_stamp",
        "_suffixes",
    )

    def __init__(
        self, settings: Settings, fd: int | None = None, *, clock: Callable[[], float] = time.time, **bound: Any
    ) -> None:
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._now = clock  # seconds since the epoch (tests pass their own clock)
        self._json = use_json(settings, self._fd) and _LEVELS[settings.log_level] <= logging.INFO
        rendered = orjson.dumps(bound, default=_json_default)  # b'{}' or b'{"k":v,...}'
        self._prefix = rendered[:-1] + b"," if bound else b"{"  # what every line starts with
        self._suffixes: dict[str, bytes] = {}  # event -> its ',"event":...,"timestamp":"'
        self._slow = get_logger(**bound)
        self._clock = _Timestamp()
        self._ms = -1
        self._stamp = b""  # the timestamp's text, its closing quote and the line's end
        self._flush_interval = settings.log_flush_interval
        self._batch: list[bytes] = []
        self._batched = 0  # bytes in the batch
        self._flush_pending = False  # a timed flush is scheduled

    def info(self, event: str, **fields: Any) -> None:
        """Log ``event`` at INFO."""
        self.info_fields(event, fields)

    def info_fields(self, event: str, fields: dict[str, Any]) -> None:
        """Log ``event`` at INFO with ``fields`` given as a dict (no keyword-argument packing: the hot call)."""
        if not self._json:
            self._slow.info(event, **fields)
            return
        suffix = self._suffixes.get(event)
        if suffix is None:
            suffix = b',"event":' + orjson.dumps(event) + b',"level":"info","timestamp":"'
            self._suffixes[event] = suffix
        ms = int(self._now() * 1000)
        if ms != self._ms:
            self._restamp(ms)
        if fields:  # '{' bound, fields (their own braces cut off), event, level, timestamp '}'
            line = self._prefix + orjson.dumps(fields, default=_json_default)[1:-1] + suffix + self._stamp
        elif len(self._prefix) > 1:  # bound fields only
            line = self._prefix[:-1] + suffix + self._stamp
        else:
            line = b"{" + suffix[1:] + self._stamp
        if self._flush_interval <= 0:
            _write(self._fd, line)
        else:
            self._add_to_batch(line)

    def _add_to_batch(self, line: bytes) -> None:
        """Batch ``line``: flush first if it would not fit, and have the batch flushed in time."""
        if self._batched + len(line) > BATCH_BYTES:
            self.flush()
        if not self._batch:
            _batching[self] = None
        self._batch.append(line)
        self._batched += len(line)
        if not self._flush_pending:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to flush later: now
                self.flush()
                return
            self._flush_pending = True
            loop.call_later(self._flush_interval, self._timed_flush)

    def _restamp(self, ms: int) -> None:
        self._ms = ms
        self._stamp = self._clock.text(ms).encode() + b'"}\n'

    def _timed_flush(self) -> None:
        self._flush_pending = False
        self.flush()

    def flush(self) -> None:
        """Write the batched lines, in one ``write(2)``."""
        if self._batch:
            data = b"".join(self._batch)
            self._batch.clear()
            self._batched = 0
            _batching.pop(self, None)
            _write(self._fd, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._slow, name)
