"""One worker: one event loop serving the connections of one listening socket.

Owns: the loop's life (serve, then the graceful drain), the set of open
connections (:class:`Connections`), the periodic sweep that asks each
connection whether its clock has run out (``Connection.overdue``) and
watches the parent, one canonical log line per connection, and the
worker's counters (``stats.Stats``) and their flush into metrics.  It is
the connections' ``ConnectionHost``.  Also the process start-up of a
worker (:func:`serve_worker_process`).

Never: accepts (``accept.Acceptor``), decides a connection's deadline
(``policy.overdue``, through ``Connection.overdue``), binds sockets
(``listener``), reads the environment (``config``) or manages other
processes (``master``).  It does not rely on ``Server.wait_closed()`` to
drain (it returns at once on uvloop and 3.11 and waits forever on 3.12+):
it tracks its connections itself.

Resource handling: the worker's acceptor owns the listening socket it is
given and closes it when it stops accepting; the connections it accepts
are closed before :meth:`Worker.serve` returns.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, cast

from app.config import Settings
from app.core import zen
from app.core.policy import CloseReason, Limits
from app.exits import Exit
from app.server import loops
from app.server.accept import Acceptor
from app.server.connection import Connection, ConnectionContext, ProxiedConnection
from app.server.heartbeat import Heartbeat
from app.server.stats import Stats

if TYPE_CHECKING:
    from app.server.metrics import WorkerMetrics

#: Timeouts are checked by one periodic sweep per worker, not one timer per
#: connection: no per-request cost, and a deadline fires at most one tick late.
TICK_MAX: Final = 1.0
TICK_DRAINING: Final = 0.05
#: Removed connections the list may hold beyond half of it (``Connections``).
COMPACT_SLACK: Final = 64


class Connections:
    """A worker's open connections: a list with lazy removal.

    8 bytes a connection, where a set's table (at most 3/5 full, grown
    fourfold) takes 26 to 52 at 10,000 connections.  A removed connection
    is marked (:meth:`Connection.detach` lets go of its transport) and stays
    in the list until the marked ones are half of it, so removal is O(1)
    amortized.  Iterating gives the ones open when it reaches them, safe to
    close them in, without copying the list: the list is only appended to
    (a connection added meanwhile comes last) or replaced whole (a
    compaction leaves the list being iterated as it was).
    """

    __slots__ = ("_items", "count")

    def __init__(self) -> None:
        self._items: list[Connection] = []
        self.count = 0  # open connections (an attribute: len() would be a Python call per connection)

    def add(self, conn: Connection) -> None:
        self._items.append(conn)
        self.count += 1

    def remove(self, conn: Connection) -> None:
        """Forget ``conn`` (added before, removed once, closed)."""
        conn.detach()
        self.count -= 1
        if len(self._items) > 2 * self.count + COMPACT_SLACK:
            self._items = [c for c in self._items if c.transport is not None]

    def __iter__(self) -> Iterator[Connection]:
        for conn in self._items:
            if conn.transport is not None:
                yield conn


def limits_of(settings: Settings) -> Limits:
    """The per-connection bounds ``policy.overdue`` applies, from ``settings``."""
    return Limits(
        max_question=settings.max_request_bytes,
        request_timeout=settings.request_timeout,
        idle_timeout=settings.idle_timeout,
    )


class Worker:
    """Serves the connections of one listening socket until asked to stop.

    :meth:`request_stop` (graceful) and :meth:`request_quit` (immediate) only
    record the request; :meth:`serve` acts on it.
    """

    def __init__(
        self,
        settings: Settings,
        sock: socket.socket,
        *,
        log: Any,  # a structlog bound logger
        conn_log: Any = None,  # the same, for the line per connection (logs.HotLogger)
        on_ready: Callable[[], None] | None = None,
        parent_pid: int | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        #: log_closed(event, fields): the close line's call, without keyword packing when the logger has one.
        self.log_closed = _fields_logger(conn_log if conn_log is not None else log)
        self.on_ready = on_ready
        self.parent_pid = parent_pid
        self.stats = Stats()
        self.metrics = metrics
        answers = zen.answers if metrics is None else metrics.counting_answers(self.stats)
        self.context = ConnectionContext.build(settings, self, self.stats, answers)
        self.connection_class = ProxiedConnection if self.context.proxy_versions else Connection
        if settings.tls_cert_file or settings.tls_key_file:  # TLS: its own classes (re-reads the files)
            from app.server import tls  # noqa: PLC0415 - only with TLS on

            self.connection_class, _ = tls.connection_class(settings, bool(self.context.proxy_versions))
        self.limits = limits_of(settings)
        self.conns = Connections()
        # A Connection is an asyncio protocol by its methods, not by subclassing (its "Memory" says why).
        factory = cast("Callable[[], asyncio.Protocol]", self.new_connection)
        self.acceptor = Acceptor(sock, settings, conns=self.conns, factory=factory, stats=self.stats, log=log)
        self.draining = False
        self._stop: asyncio.Event | None = None
        self._quit = False
        self._tick = min(TICK_MAX, settings.request_timeout / 4, settings.idle_timeout / 4)
        self._sweep_due = 0.0  # when the sweep timer should fire (its lateness is the loop lag)
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- requests (signal handlers, other threads) --------------------------

    def request_stop(self) -> None:
        """Record a graceful stop; call from the loop's thread (signal handler)."""
        if self._stop is not None:
            self._stop.set()

    def request_quit(self) -> None:
        """Record an immediate stop."""
        self._quit = True
        self.request_stop()

    # -- main ----------------------------------------------------------------

    async def serve(self) -> None:
        """Serve until a stop is requested, then drain; returns when every connection is closed."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.acceptor.start()
        self._sweep_due = time.monotonic() + self._tick
        self.loop.call_later(self._tick, self._sweep)
        self.log.info("worker_ready", max_connections=self.settings.max_connections, loop=loops.name_of(self.loop))
        if self.on_ready is not None:
            self.on_ready()
        await self._stop.wait()
        await self._drain()

    async def _drain(self) -> None:
        self.acceptor.close()
        self.draining = True
        await asyncio.sleep(0)  # connection_made of what libuv accepted last is already queued
        deadline = time.monotonic() + self.settings.graceful_timeout
        self.log.info("worker_draining", connections=self.conns.count)
        # ``pending``: accepted (the final accept above takes the whole queue)
        # but not wrapped yet; leaving now would close them unanswered.
        while (self.conns.count or self.acceptor.pending) and not self._quit and time.monotonic() < deadline:
            assert self._stop is not None
            self._stop.clear()
            now, quiet = time.monotonic(), self.settings.drain_quiet
            for conn in self.conns:
                conn.close_if_quiet(now, quiet)
            try:
                await asyncio.wait_for(self._stop.wait(), TICK_DRAINING)
            except TimeoutError:
                pass
        for conn in self.conns:
            conn.abort(CloseReason.SHUTDOWN)
        await asyncio.sleep(0)  # let connection_lost run for the aborted ones
        self._flush_metrics(None)
        self.log.info("worker_stopped", aborted=self.conns.count, **self._summary())

    def _summary(self) -> dict[str, Any]:
        s = self.stats
        return {"accepted": s.accepted, "answered": s.answered, "closes": dict(s.closes)}

    # -- the connections' host (connection.ConnectionHost) ----------------------

    def new_connection(self) -> Connection:
        """A connection for an accepted socket (the acceptor's protocol factory)."""
        return self.connection_class(self.context)

    def connection_made(self, conn: Connection) -> bool:
        """Track ``conn``; False if it is over the cap (libuv took a longer queue than allowed for)."""
        conns = self.conns
        if conns.count >= self.settings.max_connections:
            return False
        conns.add(conn)
        if conns.count >= self.acceptor.leave_at:  # libuv accepting, and near the cap
            self.acceptor.switch_mode()
        return True

    def connection_lost(self, conn: Connection, reason: CloseReason, fields: dict[str, Any]) -> None:
        """Count and log ``conn``'s close; resume or switch accepting if that made room."""
        peer = conn.peer()  # before remove() lets go of the transport
        if reason is not CloseReason.OVER_CAPACITY:  # those were never added
            self.conns.remove(conn)
        # The value as a plain str: orjson renders only exact str as a dict
        # key (``closes`` in the summary), and renders it faster as a value.
        label = str(reason)
        stats = self.stats
        stats.answered += conn.answered
        stats.closes[label] = stats.closes.get(label, 0) + 1
        elapsed = time.monotonic() - conn.opened
        if self.metrics is not None:
            self.metrics.connection_closed(elapsed)
        line = {
            "peer": peer,
            "reason": label,
            "answered": conn.answered,
            "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out,
            "duration_ms": int(elapsed * 1e6) / 1000,  # not round(): it formats and parses
        }
        if fields:
            line.update(fields)
        self.log_closed("connection_closed", line)
        if self.acceptor.native is None:  # (libuv accepting: nothing to resume or switch, no call per close)
            self.acceptor.connection_removed()
        if self.draining and not self.conns.count and self._stop is not None:
            self._stop.set()

    # -- the sweep -------------------------------------------------------------

    def _sweep(self) -> None:
        """Periodic: timeouts, stalled closes, the parent's death, the metrics."""
        assert self.loop is not None
        now = time.monotonic()
        self.expire_overdue(now)
        if self.parent_pid is not None and os.getppid() != self.parent_pid and not self.draining:
            self.log.warning("parent_died", parent=self.parent_pid)
            self.request_stop()
        self._flush_metrics(now - self._sweep_due)
        tick = TICK_DRAINING if self.draining else self._tick
        self._sweep_due = now + tick
        self.loop.call_later(tick, self._sweep)

    def expire_overdue(self, now: float) -> None:
        """Ask each connection whether its clock has run out at ``now``; those overdue close themselves."""
        limits = self.limits
        for conn in self.conns:
            reason = conn.overdue(now, limits)
            if reason is not None:
                conn.time_out(reason)

    def _flush_metrics(self, lag: float | None) -> None:
        """Move the plain counters into the metric files (never per request)."""
        if self.metrics is not None:
            live = sum(conn.answered for conn in self.conns)
            self.metrics.flush(self.stats, self.conns.count, live, lag)


def _fields_logger(log: Any) -> Callable[[str, dict[str, Any]], None]:
    """``log``'s call taking the fields as a dict (``HotLogger.info_fields``), else a wrapper of ``info``."""
    info_fields: Callable[[str, dict[str, Any]], None] | None = getattr(log, "info_fields", None)
    if info_fields is not None:
        return info_fields
    return lambda event, fields: log.info(event, **fields)


# -- the worker process --------------------------------------------------------

_PR_SET_PDEATHSIG: Final = 1


def _die_with_parent(parent_pid: int) -> bool:
    """Ask the kernel for SIGTERM when the master dies; False if it already has."""
    try:
        import ctypes  # noqa: PLC0415 - only workers need it

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the sweep still watches getppid()
        pass
    return os.getppid() == parent_pid


def build_worker(
    settings: Settings,
    sock: socket.socket,
    *,
    slot: int,
    on_ready: Callable[[], None] | None = None,
    parent_pid: int | None = None,
    metrics: WorkerMetrics | None = None,
) -> Worker:
    """A worker as production runs it, with its event logger and its batched close-line logger.

    Call after ``logs.configure``; the lab's ``worker`` server builds its
    worker here too, so it measures the logging path that ships.
    """
    from app import logs  # noqa: PLC0415

    pid = os.getpid()
    log = logs.get_logger(worker=slot, pid=pid)
    conn_log = logs.HotLogger(settings, worker=slot, pid=pid)
    return Worker(settings, sock, log=log, conn_log=conn_log, on_ready=on_ready, parent_pid=parent_pid, metrics=metrics)


def serve_worker_process(settings: Settings, *, fd: int, slot: int, ready_fd: int, parent_pid: int) -> int:
    """Process-wide start-up of a worker, then serve; returns the exit code.

    The one place per worker process that sets up logging, the event loop
    (``LOOP``) and signal handlers (gunicorn ``workers/base.py``).  SIGTERM =
    graceful stop, SIGQUIT = immediate stop, SIGINT is left to the master (a
    Ctrl-C reaches the whole process group).
    """
    from app import logs  # noqa: PLC0415

    logs.configure(settings)
    run = _loop_runner(settings, slot)
    if run is None:
        return Exit.CONFIG  # before ready: the master stops rather than respawn
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _die_with_parent(parent_pid):
        logs.get_logger(worker=slot, pid=os.getpid()).warning("parent_died", parent=parent_pid)
        return Exit.OK
    sock = socket.socket(fileno=fd)
    beat = Heartbeat.from_settings(settings, ready_fd)  # R once ready, then beats until the process ends
    metrics = None
    if settings.admin_port:
        from app.server.metrics import WorkerMetrics  # noqa: PLC0415 - prometheus-client only with metrics on

        metrics = WorkerMetrics(settings)
    worker = build_worker(settings, sock, slot=slot, on_ready=beat.start, parent_pid=parent_pid, metrics=metrics)
    # Recycling counts failed TLS handshakes as work done too: each leaves memory behind in
    # uvloop's SSL layer (docs/tls.md), so MAX_REQUESTS bounds that as it bounds the rest.
    stats = worker.stats
    beat.answered = lambda: stats.answered + stats.closes.get("tls_error", 0) + sum(c.answered for c in worker.conns)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
        loop.add_signal_handler(signal.SIGQUIT, worker.request_quit)
        await worker.serve()

    run(main())
    return Exit.OK


def _loop_runner(settings: Settings, slot: int) -> loops.Runner | None:
    """The runner of the ``LOOP`` setting's loop; None (logged) if ``LOOP=uvloop`` and it does not import.

    Under ``auto`` without uvloop, the first slot warns once for the server
    (every worker says its loop in ``worker_ready``).
    """
    from app import logs  # noqa: PLC0415

    try:
        chosen = loops.choose_loop(settings.loop)
    except loops.LoopUnavailableError as exc:
        logs.get_logger(worker=slot, pid=os.getpid()).error("loop_unavailable", error=str(exc))
        return None
    if chosen.fallback and slot == 0:
        logs.get_logger(worker=slot, pid=os.getpid()).warning(
            "loop_fallback", loop=chosen.name, reason=f"uvloop does not import ({chosen.fallback})"
        )
    return chosen.run
