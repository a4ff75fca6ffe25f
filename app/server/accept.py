"""Accepting connections on one worker's listening socket.

Owns: the two ways to accept (libuv's while far from every limit, our own
accept loop near them) and the switch between them; the exact
MAX_CONNECTIONS cap (pause when full, resume when a connection closes); the
back-off on EMFILE/ENFILE/ENOBUFS/ENOMEM (:class:`Backoff`) with its
rate-limited ``accept_backoff`` event.

Never: tracks, serves or times out connections (the worker's registry and
``connection.Connection`` do), binds sockets (``listener``) or reads the
environment (``config``).  It reads the number of open connections from
the worker's registry and hands each accepted socket to the worker's
connection factory.

Resource handling: from :meth:`Acceptor.start` on, the acceptor owns the
listening socket; :meth:`Acceptor.close` takes what is queued, then closes
it.  A socket accepted by our own loop is closed if wrapping it fails.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from app.config import Settings, derived_max_connections
from app.server import listener, loops

if TYPE_CHECKING:
    from app.server.stats import Stats

#: Accepts per readiness event, so a connection storm cannot starve reads.
ACCEPT_BATCH: Final = 64
#: Two ways to accept.  While the connection count is far from every limit,
#: libuv accepts (``loop.create_server`` on a duplicate of the listening
#: descriptor): no task, socket object or context copy per connection, and
#: less memory per idle connection (churn p99 is higher, as libuv accepts
#: one connection per loop iteration).  But libuv cannot pause accepting,
#: and answers EMFILE by accepting and closing every queued connection; so
#: near a limit the acceptor accepts itself (``_accept_some``): an exact
#: cap, and a back-off that keeps the queue.  "Far" = more than NATIVE_ENTER
#: headrooms below the cap; it goes back to its own loop at NATIVE_LEAVE
#: headrooms, so the mode does not flap.
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
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: ``Acceptor.leave_at`` while our own loop accepts: no count reaches it.
_NEVER: Final = sys.maxsize

_monotonic = time.monotonic


class OpenConnections(Protocol):
    """What the acceptor reads of the worker's registry: how many connections are open."""

    @property
    def count(self) -> int: ...


class Backoff:
    """The capped exponential pause after a failed accept, and when to report it.

    Pure: the caller hands in the time.  Every failure doubles the pause
    (from BACKOFF_FIRST up to BACKOFF_CAP); a successful accept resets it.
    Failures are reported at most once per BACKOFF_LOG_EVERY, with how many
    happened since the last report, so a file-descriptor shortage logs a
    few lines, not one per failure.
    """

    __slots__ = ("_logged_at", "_unreported", "delay")

    def __init__(self) -> None:
        self.delay = 0.0  # the current pause; 0 after a success
        self._unreported = 0
        self._logged_at = float("-inf")

    def failed(self, now: float) -> int:
        """Count a failure at ``now`` and lengthen :attr:`delay`; the failures to report now (0: none)."""
        self.delay = min(BACKOFF_CAP, max(BACKOFF_FIRST, self.delay * 2))
        self._unreported += 1
        if now - self._logged_at < BACKOFF_LOG_EVERY:
            return 0
        count, self._unreported, self._logged_at = self._unreported, 0, now
        return count

    def succeeded(self) -> None:
        """An accept worked: the next failure starts from BACKOFF_FIRST."""
        self.delay = 0.0


class Acceptor:
    """Accepts on one listening socket for one worker, in the mode its distance to the cap calls for.

    The worker calls :meth:`switch_mode` when the open count reaches
    :attr:`leave_at` (one compare per connection instead of a call) and
    :meth:`connection_removed` after a close while :attr:`native` is None.
    """

    def __init__(
        self,
        sock: socket.socket,
        settings: Settings,
        *,
        conns: OpenConnections,
        factory: Callable[[], asyncio.Protocol],
        stats: Stats,
        log: Any,  # a structlog bound logger
    ) -> None:
        self.sock = sock
        self.settings = settings
        self._conns = conns
        self._factory = factory
        self._stats = stats
        self.log = log
        self._family = sock.family
        self.pending = 0  # accepted by our loop, connection_made not run yet
        self.accepting = False
        self.closed = False
        self.paused_full = False
        self.native: asyncio.AbstractServer | None = None  # libuv accepting (see NATIVE_ENTER)
        # The cap libuv must stay clear of: connections, and descriptors (EMFILE).
        self.cap = min(settings.max_connections, derived_max_connections())
        #: libuv accepting needs uvloop: on asyncio's loop, our own loop only (:meth:`start`).
        self.native_capable = False
        self.headroom = NATIVE_HEADROOM  # set by start() from uvloop's libuv
        self.leave_at = _NEVER  # the open count at which libuv accepting must stop
        self._backoff = Backoff()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the worker's calls ----------------------------------------------------

    def start(self) -> None:
        """Start accepting, in the running loop."""
        self._loop = asyncio.get_running_loop()
        # asyncio's create_server may suspend and accepts a batch per event,
        # with no headroom to tell: it never accepts for us.
        self.native_capable = loops.name_of(self._loop) == loops.UVLOOP
        if self.native_capable:
            self.headroom = native_headroom(self.settings.backlog, libuv_version())
        self.sock.setblocking(False)
        self._start()

    def close(self) -> None:
        """Stop for good: take what is already queued, then close the listening socket.

        If ours is the listener's last descriptor, closing it with
        connections queued would reset them.
        """
        self._stop()
        self.closed = True
        if self.sock.fileno() >= 0:
            self._accept_some(limit=1 << 30)
            self.sock.close()

    def switch_mode(self) -> None:
        """Native accepting while far from the limits, our own near them."""
        if not self.accepting:
            return
        native = self.native is not None
        if self._fits(NATIVE_LEAVE if native else NATIVE_ENTER) != native:
            self._stop()
            self._start()
            self.log.debug("accept_mode", native=self.native is not None, connections=self._conns.count)

    def connection_removed(self) -> None:
        """A connection closed: resume after a pause at the cap, or hand accepting back to libuv."""
        if self.paused_full and self._conns.count + self.pending < self.settings.max_connections:
            self.paused_full = False
            self.log.info("accept_resumed", connections=self._conns.count)
            self._start()
        elif self.native is None and self.accepting and self._fits(NATIVE_ENTER):
            self.switch_mode()

    # -- the two modes ----------------------------------------------------------

    def _start(self) -> None:
        if self.accepting or self.closed:
            return
        assert self._loop is not None
        self.accepting = True
        if self._fits(NATIVE_ENTER):
            self._open_native()
        else:
            self._loop.add_reader(self.sock.fileno(), self._accept_some, ACCEPT_BATCH)

    def _stop(self) -> None:
        if not self.accepting:
            return
        assert self._loop is not None
        if self.native is not None:
            self.native.close()  # closes the duplicate only: the queue stays
            self.native = None
            self.leave_at = _NEVER
        else:
            _remove_reader(self._loop, self.sock.fileno())
        self.accepting = False

    def _fits(self, queues: int) -> bool:
        """True while ``queues`` headrooms fit below every limit (never on a loop that cannot accept natively)."""
        return self.native_capable and self._conns.count + self.pending + queues * self.headroom < self.cap

    def _open_native(self) -> None:
        assert self._loop is not None
        dup = self.sock.dup()
        coro = self._loop.create_server(self._native_connection, sock=dup, backlog=self.settings.backlog)
        try:
            coro.send(None)  # uvloop's create_server(sock=) never suspends
        except StopIteration as done:
            self.native = done.value
        else:
            coro.close()
            dup.close()
            raise RuntimeError("create_server(sock=) suspended; this loop cannot accept natively")
        self.leave_at = self.cap - NATIVE_LEAVE * self.headroom

    def _native_connection(self) -> asyncio.Protocol:
        self._stats.accepted += 1
        return self._factory()

    # -- our own accept loop ----------------------------------------------------

    def _accept_some(self, limit: int) -> None:
        assert self._loop is not None
        for _ in range(limit):
            if self._conns.count + self.pending >= self.settings.max_connections:
                self._pause_full()
                return
            try:
                fd, _addr = self.sock._accept()  # type: ignore[attr-defined]  # noqa: SLF001 - accept() minus its enum conversions
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._back_off(exc)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            self._backoff.succeeded()
            self.pending += 1
            self._stats.accepted += 1
            # proto given: asyncio's transport sets TCP_NODELAY only on a socket that says it is TCP.
            conn = socket.socket(self._family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd)
            self._loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError as exc:  # the peer was gone before we could wrap it
            conn.close()
            self.log.debug("connection_setup_failed", error=str(exc))
        finally:
            self.pending -= 1

    def _pause_full(self) -> None:
        if self.accepting:
            self._stop()
            self.paused_full = True
            self.log.warning("accept_paused", reason="max_connections", connections=self._conns.count)

    def _back_off(self, exc: OSError) -> None:
        self._stop()
        self._stats.accept_backoffs += 1
        backoff = self._backoff
        count = backoff.failed(_monotonic())
        if count:
            self.log.warning(
                "accept_backoff",
                error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                delay=backoff.delay,
                count=count,
                connections=self._conns.count,
            )
        assert self._loop is not None
        self._loop.call_later(backoff.delay, self._start)


def _remove_reader(loop: Any, fd: int) -> None:
    """``loop.remove_reader(fd)``, its result unused and unchecked.

    The loop is typed Any on purpose: typeshed says ``remove_reader`` returns
    bool, uvloop returns None, and code compiled by mypyc checks a declared
    bool (a TypeError at run time).
    """
    loop.remove_reader(fd)


def libuv_version() -> int:
    """The version of uvloop's libuv as ``major << 16 | minor << 8 | patch``; 0 if uvloop does not say."""
    import uvloop.loop  # noqa: PLC0415 - only on uvloop (start()); the master never runs a loop

    version: int = getattr(uvloop.loop, "libuv_get_version", lambda: 0)()
    return version


def native_headroom(backlog: int, libuv: int) -> int:
    """NATIVE_HEADROOM, or a whole accept queue with a libuv that accepts in a loop."""
    return NATIVE_HEADROOM if libuv >= _LIBUV_ONE_ACCEPT_PER_POLL else listener.queue_limit(backlog)
