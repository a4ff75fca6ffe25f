"""One worker: one event loop accepting on one listening socket.

Owns: accepting (with a connection cap and a capped back-off on EMFILE),
the set of open connections (``connection.Connection``), their timeouts
(one periodic sweep), one canonical log event per connection, the worker's
counters, and the graceful drain.

Never: binds sockets (``listener``), reads the environment (``config``) or
manages other processes (``master``).  It does not rely on
``Server.wait_closed()`` to drain (it returns at once on uvloop and 3.11 and
waits forever on 3.12+): it tracks its connections itself.

Resource handling: the worker owns the listening socket it is given and
closes it when it stops accepting; the connections it accepts are closed
before :meth:`Worker.serve` returns.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from app.config import Settings, derived_max_connections
from app.core import proxy, zen
from app.core.protocol import QuestionReader
from app.exits import Exit
from app.server import listener
from app.server.connection import LINGER_MAX, LINGER_QUIET, OVER_CAPACITY, Connection, ProxiedConnection
from app.server.heartbeat import Heartbeat

if TYPE_CHECKING:
    from app.server.metrics import WorkerMetrics

#: Accepts per readiness event, so a connection storm cannot starve reads.
ACCEPT_BATCH: Final = 64
#: Two ways to accept.  While the connection count is far from every limit,
#: libuv accepts (``loop.create_server`` on a duplicate of the listening
#: descriptor): no task, socket object or context copy per connection, about
#: 170 bytes less per idle connection (CPU per connection: the same within
#: the benchmark's noise; churn p99 is higher, as libuv accepts one
#: connection per loop iteration).  But libuv cannot pause accepting, and answers EMFILE by accepting and closing every
#: queued connection; so near a limit the worker accepts itself
#: (``_accept_some``): an exact cap, and a back-off that keeps the queue.
#: "Far" = more than NATIVE_ENTER headrooms below the cap; the worker goes
#: back to its own loop at NATIVE_LEAVE headrooms, so the mode does not flap.
NATIVE_ENTER: Final = 2
NATIVE_LEAVE: Final = 1
#: Headroom: how many connections libuv can accept before ``connection_made``
#: of the first one runs.  libuv 1.45 and later accept one connection per
#: loop iteration, and the worker counts it before the next poll, so a few
#: suffice; older libuv took the whole queue at once (``listener.queue_limit``).
NATIVE_HEADROOM: Final = 64
_LIBUV_ONE_ACCEPT_PER_POLL: Final = (1 << 16) | (45 << 8)
#: EMFILE back-off: first pause, cap, and how often the event is logged.
BACKOFF_FIRST: Final = 0.01
BACKOFF_CAP: Final = 1.0
BACKOFF_LOG_EVERY: Final = 5.0
#: Timeouts are checked by one periodic sweep per worker, not one timer per
#: connection: no per-request cost, and a deadline fires at most one tick late.
TICK_MAX: Final = 1.0
TICK_DRAINING: Final = 0.05
#: Removed connections the list may hold beyond half of it (``Connections``).
COMPACT_SLACK: Final = 64
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_monotonic = time.monotonic


class Stats:
    """Counters of one worker, read by logs and metrics."""

    __slots__ = (
        "accept_backoffs",
        "accepted",
        "answered",
        "backpressure_pauses",
        "closes",
        "proxy_headers",
        "unknown",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.answered = 0
        self.unknown = 0  # counted only with metrics on (metrics.counting_answers)
        self.backpressure_pauses = 0
        self.accept_backoffs = 0
        self.closes: dict[str, int] = {}
        self.proxy_headers: dict[str, int] = {}  # accepted PROXY headers by command


class Connections:
    """A worker's open connections: a list with lazy removal.

    8 bytes a connection, where a set's table (at most 3/5 full, grown
    fourfold) takes 26 to 52 at 10,000 connections.  A removed connection
    is marked (its ``transport`` set to None) and stays in the list until
    the marked ones are half of it, so removal is O(1) amortized.
    Iterating gives a snapshot of the open ones, safe to close them in.
    """

    __slots__ = ("_items", "count")

    def __init__(self) -> None:
        self._items: list[Connection] = []
        self.count = 0  # open connections (an attribute: len() would be a Python call per connection)

    def add(self, conn: Connection) -> None:
        self._items.append(conn)
        self.count += 1

    def remove(self, conn: Connection) -> None:
        """Forget ``conn`` (added before, removed once)."""
        conn.transport = None
        self.count -= 1
        if len(self._items) > 2 * self.count + COMPACT_SLACK:
            self._items = [c for c in self._items if c.transport is not None]

    def __iter__(self) -> Iterator[Connection]:
        return iter([c for c in self._items if c.transport is not None])


class Worker:
    """Accepts on one listening socket and serves until asked to stop.

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
        self.sock = sock
        self.log = log
        self.conn_log = conn_log if conn_log is not None else log
        #: log_closed(event, fields): the close line's call, without keyword packing when the logger has one.
        self.log_closed: Callable[[str, dict[str, Any]], None] = getattr(
            self.conn_log, "info_fields", lambda event, fields: self.conn_log.info(event, **fields)
        )
        self._family = sock.family
        self.on_ready = on_ready
        self.parent_pid = parent_pid
        self.stats = Stats()
        self.metrics = metrics
        self.answers = zen.answers if metrics is None else metrics.counting_answers(self.stats)
        self.proxy_versions = proxy.MODES[settings.proxy_protocol]
        self.proxy_trusted = proxy.parse_networks(settings.proxy_trusted)
        self.connection_class = ProxiedConnection if self.proxy_versions else Connection
        self.spare_reader = QuestionReader(settings.max_request_bytes)  # lent to connections that hold none
        self.max_question = settings.max_request_bytes
        #: (high, low) water marks of a connection's unsent answers: reading pauses above high, resumes below low.
        self.write_limits = (settings.max_unsent_bytes, settings.max_unsent_bytes // 4)
        self.conns = Connections()
        self.pending = 0  # accepted by us, connection_made not run yet
        self.accepting = False
        self.native: asyncio.AbstractServer | None = None  # libuv accepting (see NATIVE_ENTER)
        # The cap libuv must stay clear of: connections, and descriptors (EMFILE).
        self._native_cap = min(settings.max_connections, derived_max_connections())
        self.accept_headroom = native_headroom(settings.backlog, libuv_version())
        self.draining = False
        self.paused_full = False
        self._backoff = 0.0
        self._backoff_until = 0.0
        self._backoff_logged = 0.0
        self._backoff_count = 0
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
        self.sock.setblocking(False)
        self._start_accepting()
        self._sweep_due = _monotonic() + self._tick
        self.loop.call_later(self._tick, self._sweep)
        self.log.info("worker_ready", max_connections=self.settings.max_connections)
        if self.on_ready is not None:
            self.on_ready()
        await self._stop.wait()
        await self._drain()

    async def _drain(self) -> None:
        self._stop_accepting(final=True)
        self.draining = True
        await asyncio.sleep(0)  # connection_made of what libuv accepted last is already queued
        deadline = _monotonic() + self.settings.graceful_timeout
        self.log.info("worker_draining", connections=self.conns.count)
        # ``pending``: accepted (the final accept above takes the whole queue)
        # but not wrapped yet; leaving now would close them unanswered.
        while (self.conns.count or self.pending) and not self._quit and _monotonic() < deadline:
            assert self._stop is not None
            self._stop.clear()
            self._close_quiet()
            try:
                await asyncio.wait_for(self._stop.wait(), TICK_DRAINING)
            except TimeoutError:
                pass
        for conn in self.conns:
            conn.abort("shutdown")
        await asyncio.sleep(0)  # let connection_lost run for the aborted ones
        self._flush_metrics(None)
        self.log.info("worker_stopped", aborted=self.conns.count, **self._summary())

    def _summary(self) -> dict[str, Any]:
        s = self.stats
        return {"accepted": s.accepted, "answered": s.answered, "closes": dict(s.closes)}

    # -- accepting -----------------------------------------------------------

    def _start_accepting(self) -> None:
        if not self.accepting and not self.draining:
            assert self.loop is not None
            self.accepting = True
            if self._native_fits(NATIVE_ENTER):
                self._open_native()
            else:
                self.loop.add_reader(self.sock.fileno(), self._on_acceptable)

    def _stop_accepting(self, *, final: bool = False) -> None:
        assert self.loop is not None
        if self.accepting:
            if self.native is not None:
                self._close_native()
            else:
                self.loop.remove_reader(self.sock.fileno())
            self.accepting = False
        if final and self.sock.fileno() >= 0:
            # Take what is already queued: if ours is the listener's last
            # descriptor, closing it would reset those connections.
            self._accept_some(limit=1 << 30)
            self.sock.close()

    def _native_fits(self, queues: int) -> bool:
        """True while ``queues`` headrooms fit below every limit."""
        return self.conns.count + self.pending + queues * self.accept_headroom < self._native_cap

    def _open_native(self) -> None:
        assert self.loop is not None
        dup = self.sock.dup()
        coro = self.loop.create_server(self._native_connection, sock=dup, backlog=self.settings.backlog)
        try:
            coro.send(None)  # uvloop's create_server(sock=) never suspends
        except StopIteration as done:
            self.native = done.value
        else:
            coro.close()
            dup.close()
            raise RuntimeError("create_server(sock=) suspended; this loop cannot accept natively")

    def _close_native(self) -> None:
        assert self.native is not None
        self.native.close()  # closes the duplicate only: the queue stays
        self.native = None

    def _native_connection(self) -> Connection:
        self.stats.accepted += 1
        return self.connection_class(self)

    def _switch_accept_mode(self) -> None:
        """Native accepting while far from the limits, our own near them."""
        if not self.accepting:
            return
        native = self.native is not None
        if self._native_fits(NATIVE_LEAVE if native else NATIVE_ENTER) != native:
            self._stop_accepting()
            self._start_accepting()
            self.log.debug("accept_mode", native=self.native is not None, connections=self.conns.count)

    def _on_acceptable(self) -> None:
        self._accept_some(ACCEPT_BATCH)

    def _accept_some(self, limit: int) -> None:
        assert self.loop is not None
        for _ in range(limit):
            if self.conns.count + self.pending >= self.settings.max_connections:
                self._pause_full()
                return
            try:
                fd, _addr = self.sock._accept()  # type: ignore[attr-defined]  # noqa: SLF001 - accept() minus its enum conversions
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._accept_backoff(exc)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            self._backoff = 0.0
            self.pending += 1
            self.stats.accepted += 1
            conn = socket.socket(self._family, socket.SOCK_STREAM, 0, fd)
            self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        assert self.loop is not None
        try:
            await self.loop.connect_accepted_socket(lambda: self.connection_class(self), conn)
        except OSError as exc:  # the peer was gone before we could wrap it
            conn.close()
            self.log.debug("connection_setup_failed", error=str(exc))
        finally:
            self.pending -= 1

    def _pause_full(self) -> None:
        if self.accepting:
            self._stop_accepting()
            self.paused_full = True
            self.log.warning("accept_paused", reason="max_connections", connections=self.conns.count)

    def _accept_backoff(self, exc: OSError) -> None:
        self._stop_accepting()
        self._backoff = min(BACKOFF_CAP, max(BACKOFF_FIRST, self._backoff * 2))
        self._backoff_until = _monotonic() + self._backoff
        self.stats.accept_backoffs += 1
        self._backoff_count += 1
        now = _monotonic()
        if now - self._backoff_logged >= BACKOFF_LOG_EVERY:
            self.log.warning(
                "accept_backoff",
                error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                delay=self._backoff,
                count=self._backoff_count,
                connections=self.conns.count,
            )
            self._backoff_logged = now
            self._backoff_count = 0
        assert self.loop is not None
        self.loop.call_later(self._backoff, self._start_accepting)

    # -- connections ----------------------------------------------------------

    def take_spare_reader(self) -> QuestionReader:
        """The spare reader, for a connection that must keep it; a new one becomes the spare."""
        reader = self.spare_reader
        self.spare_reader = QuestionReader(self.settings.max_request_bytes)
        return reader

    def connection_made(self, conn: Connection) -> bool:
        """Track ``conn``; False if it is over the cap (libuv took a longer queue than allowed for)."""
        if self.conns.count >= self.settings.max_connections:
            return False
        self.conns.add(conn)
        if self.native is not None and self.conns.count + NATIVE_LEAVE * self.accept_headroom >= self._native_cap:
            self._switch_accept_mode()  # (the inline of not _native_fits(NATIVE_LEAVE): once per connection)
        return True

    def connection_lost(self, conn: Connection, reason: str, fields: dict[str, Any]) -> None:
        peer = conn.peer()  # before remove() lets go of the transport
        if conn.closing != OVER_CAPACITY:  # those were never added
            self.conns.remove(conn)
        stats = self.stats
        stats.answered += conn.answered
        stats.closes[reason] = stats.closes.get(reason, 0) + 1
        elapsed = _monotonic() - conn.opened
        if self.metrics is not None:
            self.metrics.connection_closed(elapsed)
        line = {
            "peer": peer,
            "reason": reason,
            "answered": conn.answered,
            "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out,
            "duration_ms": int(elapsed * 1e6) / 1000,  # not round(): it formats and parses
        }
        if fields:
            line.update(fields)
        self.log_closed("connection_closed", line)
        if self.paused_full and self.conns.count + self.pending < self.settings.max_connections:
            self.paused_full = False
            self.log.info("accept_resumed", connections=self.conns.count)
            self._start_accepting()
        elif self.native is None and self.accepting and self._native_fits(NATIVE_ENTER):
            self._switch_accept_mode()
        if self.draining and not self.conns.count and self._stop is not None:
            self._stop.set()

    def _close_quiet(self) -> None:
        now = _monotonic()
        quiet = self.settings.drain_quiet
        for conn in self.conns:
            if not conn.closing and conn.idle() and now - conn.last_rx >= quiet:
                conn.close("shutdown")

    def _sweep(self) -> None:
        """Periodic: timeouts, stalled closes, and the parent's death."""
        assert self.loop is not None
        now = _monotonic()
        s = self.settings
        for conn in self.conns:
            if conn.lingering:
                assert conn.started_at is not None  # the lingering clock
                if now - conn.last_rx > LINGER_QUIET or now - conn.started_at > LINGER_MAX:
                    conn.abort("too_long")  # keeps the reason it closes for
            elif conn.closing:
                if now - conn.last_rx > s.idle_timeout:
                    conn.abort("idle_timeout")
            elif conn.started_at is not None and now - conn.started_at > s.request_timeout and not conn.paused:
                conn.expire("request_timeout")
            elif now - conn.active > s.idle_timeout:
                conn.expire("idle_timeout")
        if self.parent_pid is not None and os.getppid() != self.parent_pid and not self.draining:
            self.log.warning("parent_died", parent=self.parent_pid)
            self.request_stop()
        self._flush_metrics(now - self._sweep_due)
        tick = TICK_DRAINING if self.draining else self._tick
        self._sweep_due = now + tick
        self.loop.call_later(tick, self._sweep)

    def _flush_metrics(self, lag: float | None) -> None:
        """Move the plain counters into the metric files (never per request)."""
        if self.metrics is not None:
            live = sum(conn.answered for conn in self.conns)
            self.metrics.flush(self.stats, self.conns.count, live, lag)


def libuv_version() -> int:
    """The version of uvloop's libuv as ``major << 16 | minor << 8 | patch``; 0 if uvloop does not say."""
    import uvloop.loop  # noqa: PLC0415 - the master never runs a loop

    version: int = getattr(uvloop.loop, "libuv_get_version", lambda: 0)()
    return version


def native_headroom(backlog: int, libuv: int) -> int:
    """NATIVE_HEADROOM, or a whole accept queue with a libuv that accepts in a loop."""
    return NATIVE_HEADROOM if libuv >= _LIBUV_ONE_ACCEPT_PER_POLL else listener.queue_limit(backlog)


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


def serve_worker_process(settings: Settings, *, fd: int, slot: int, ready_fd: int, parent_pid: int) -> int:
    """Process-wide start-up of a worker, then serve; returns the exit code.

    The one place per worker process that sets up logging, uvloop and
    signal handlers (gunicorn ``workers/base.py``).  SIGTERM = graceful
    stop, SIGQUIT = immediate stop, SIGINT is left to the master (a Ctrl-C
    reaches the whole process group).
    """
    import uvloop  # noqa: PLC0415 - the master never runs a loop

    from app import logs  # noqa: PLC0415

    logs.configure(settings)
    log = logs.get_logger(worker=slot, pid=os.getpid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _die_with_parent(parent_pid):
        log.warning("parent_died", parent=parent_pid)
        return Exit.OK
    sock = socket.socket(fileno=fd)
    beat = Heartbeat.from_settings(settings, ready_fd)  # R once ready, then beats until the process ends
    ready = beat.start
    conn_log = logs.HotLogger(settings, worker=slot, pid=os.getpid())
    metrics = None
    if settings.admin_port:
        from app.server.metrics import WorkerMetrics  # noqa: PLC0415 - prometheus-client only with metrics on

        metrics = WorkerMetrics(settings)
    worker = Worker(settings, sock, log=log, conn_log=conn_log, on_ready=ready, parent_pid=parent_pid, metrics=metrics)
    beat.answered = lambda: worker.stats.answered + sum(c.answered for c in worker.conns)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
        loop.add_signal_handler(signal.SIGQUIT, worker.request_quit)
        await worker.serve()

    uvloop.run(main())
    return Exit.OK
