"""One epoll loop (selectors) that keeps every connection's state itself.

Owns: the book's ``srv_async.py`` idea, non-blocking sockets and a readiness
loop, with per-connection state in a :class:`Conn` (reader, unsent bytes,
deadline), without the book's bug: the book keyed its state by file
descriptor, so an event of a socket closed earlier in the same batch was
applied to a new connection that had just reused that descriptor.  Here an
event carries the :class:`Conn` it was registered with, and a closed Conn
ignores it.
Never: blocks in anything but ``select()``.  Its weakness: one core.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable
from typing import Any, Final

from app.config import Settings
from app.core import zen
from app.core.protocol import QuestionReader
from app.lab.shell import LINGER_BYTES, LINGER_SECONDS, RECV_SIZE, announce_ready, open_listener
from app.server.listener import tune_accepted

#: Timeouts are checked by one sweep at most this often (like the worker's).
TICK: Final = 0.5
_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE


class Conn:
    """One connection's state: what came in, what is still to send, and when it expires."""

    __slots__ = ("closed", "deadline", "discarded", "done", "lingering", "out", "reader", "sel", "settings", "sock")

    def __init__(self, sock: socket.socket, sel: selectors.BaseSelector, settings: Settings) -> None:
        self.sock, self.sel, self.settings = sock, sel, settings
        self.reader = QuestionReader(settings.max_request_bytes)
        self.out = bytearray()
        self.closed = self.done = self.lingering = False
        self.discarded = 0
        self.deadline = time.monotonic() + settings.idle_timeout
        sel.register(sock, _R, self)

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
        if self.lingering:
            self.discarded += len(data)
            if not data or self.discarded > LINGER_BYTES:
                self.close()
            return
        reader = self.reader
        reader.receive_data(data)
        self.out += zen.answers(reader.next_questions())
        if reader.too_long:
            self.out += zen.TOO_LONG
        self.done = reader.too_long or reader.eof
        limit = self.settings.request_timeout if reader.started else self.settings.idle_timeout
        self.deadline = time.monotonic() + limit

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
        """Choose the events to wait for; finish the connection once all is sent."""
        if self.done and not self.out and not self.lingering:
            if not self.reader.too_long:
                self.close()
                return
            self.lingering = True  # see shell.LINGER_SECONDS
            self.deadline = time.monotonic() + LINGER_SECONDS
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close()
                return
        # Backpressure: stop reading while the unsent answers exceed the bound.
        reading = self.lingering or (not self.done and len(self.out) < self.settings.max_unsent_bytes)
        events = (_R if reading else 0) | (_W if self.out else 0)
        if events != self.sel.get_key(self.sock).events:
            self.sel.modify(self.sock, events, self)

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
                for conn in [c for c in conns if c.closed or c.deadline < now]:
                    conn.close()
                    conns.discard(conn)
