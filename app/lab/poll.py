"""One epoll loop (selectors) that keeps every connection's state itself.

Owns: the book's ``srv_async.py`` idea, non-blocking sockets and a readiness
loop, with per-connection state in a :class:`Conn` (the policy's
``Conversation``, unsent bytes, what comes next) and one sweep of the
deadlines, without the book's bug: the book keyed its state by file
descriptor, so an event of a socket closed earlier in the same batch was
applied to a new connection that had just reused that descriptor.  Here an
event carries the :class:`Conn` it was registered with, and a closed Conn
ignores it.
Never: blocks in anything but ``select()``, or decides what to answer and
when to close (``app.core.policy``).  Its weakness: one core.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable
from typing import Any, Final

from app.config import Settings
from app.core.policy import CloseReason, Conversation, Next, resume
from app.core.protocol import QuestionReader
from app.lab.shell import RECV_SIZE, announce_ready, connection_limits, open_listener
from app.server.listener import tune_accepted

#: Timeouts are checked by one sweep at most this often (like the worker's).
TICK: Final = 0.5
_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE


class Conn:
    """One connection's state: its conversation, what is still to send, and what comes next."""

    __slots__ = ("closed", "conv", "max_unsent", "next", "out", "paused", "sel", "shut", "sock")

    def __init__(self, sock: socket.socket, sel: selectors.BaseSelector, settings: Settings) -> None:
        self.sock, self.sel, self.max_unsent = sock, sel, settings.max_unsent_bytes
        self.conv = Conversation(connection_limits(settings), time.monotonic())
        self.out = bytearray()
        self.next = Next.READ
        self.closed = self.paused = self.shut = False
        sel.register(sock, _R, self)

    @property
    def reader(self) -> QuestionReader:
        """The conversation's question reader (what came in and is not answered yet)."""
        return self.conv.reader

    def on_event(self, mask: int) -> None:
        if mask & _R:
            self._read()
        if not self.closed and self.out:
            self._flush()
        if not self.closed:
            self._update()

    def _read(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        now = time.monotonic()
        if self.conv.lingering:
            if self.conv.discard(data, now):
                self.next = Next.CLOSE  # once the answer is out
            return
        reply = self.conv.receive(data, now)
        self.out += reply.out
        self.next = reply.next

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del self.out[:sent]

    def _update(self) -> None:
        """Finish the connection once all is sent, or choose the events to wait for."""
        if not self.out and self.next is not Next.READ:
            if self.next is Next.CLOSE:
                self.close()
                return
            if not self.shut:  # lingering: the answer is out, now the FIN; read and discard on
                self.shut = True
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self.close()
                    return
        # Backpressure: stop reading while the unsent answers exceed the bound.
        paused = self.next is Next.READ and len(self.out) >= self.max_unsent
        if self.paused and not paused:
            resume(self.conv, time.monotonic())
        self.paused = paused
        reading = self.next is Next.LINGER or (self.next is Next.READ and not paused)
        events = (_R if reading else 0) | (_W if self.out else 0)
        if events != self.sel.get_key(self.sock).events:
            self.sel.modify(self.sock, events, self)

    def overdue(self, now: float) -> CloseReason | None:
        """Why the sweep closes this connection at ``now``, or None (the policy's clocks)."""
        return self.conv.overdue(now, paused=self.paused)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sel.unregister(self.sock)
            self.sock.close()


def _accept_all(listener: socket.socket, sel: selectors.BaseSelector, conns: set[Conn], settings: Settings) -> None:
    while True:
        try:
            sock, _addr = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError:  # EMFILE and friends: leave the rest queued for the next event
            return
        sock.setblocking(False)
        tune_accepted(sock)
        conns.add(Conn(sock, sel, settings))


def dispatch(events: list[tuple[selectors.SelectorKey, int]], accept: Callable[[], None]) -> None:
    """Act on one batch of events; an event of a connection closed earlier in the batch is dropped.

    The fix of the book's bug: the event names the :class:`Conn` it was
    registered for (``key.data``), not a file descriptor that a connection
    accepted earlier in this same batch may already have reused.
    """
    for key, mask in events:
        conn: Conn | None = key.data
        if conn is None:
            accept()
        elif not conn.closed:
            conn.on_event(mask)


def serve(settings: Settings, *, name: str, **_options: Any) -> int:
    """Serve forever (until SIGTERM) from one thread and one epoll set."""
    sel = selectors.DefaultSelector()
    conns: set[Conn] = set()
    with open_listener(settings, blocking=False) as listener:
        sel.register(listener, _R, None)
        announce_ready(name, listener, settings, selector=type(sel).__name__)
        next_sweep = time.monotonic() + TICK
        while True:
            dispatch(sel.select(TICK), lambda: _accept_all(listener, sel, conns, settings))
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + TICK
                for conn in [c for c in conns if c.closed or c.overdue(now)]:
                    conn.close()
                    conns.discard(conn)
