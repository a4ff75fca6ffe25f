"""asyncio with callbacks: one ``asyncio.Protocol`` per connection (book: srv_asyncio1.py).

Owns: the Protocol shell over the policy's ``Conversation``: bytes in from
``data_received``, the reply written to the transport, write-buffer
backpressure (pause_writing -> pause_reading), and a once-per-TICK sweep of
the deadlines; on the stock loop or uvloop.  Its weakness: one event loop
is one core.
Never: blocks the loop, or decides what to answer and when to close (``app.core.policy``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from app.config import Settings
from app.core.policy import CloseReason, Conversation, Limits, Next, Reply, resume
from app.lab.shell import announce_ready, connection_limits, open_listener, run_asyncio

#: Timeouts are checked by one sweep at most this often (like the worker's).
TICK: Final = 0.5


class ZenProtocol(asyncio.Protocol):
    """One connection: bytes in, answers out, in order."""

    def __init__(self, limits: Limits, max_unsent: int, conns: set[ZenProtocol]) -> None:
        self.max_unsent, self.conns = max_unsent, conns
        self.conv = Conversation(limits, time.monotonic())
        self.transport: Any = None
        self.paused = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=self.max_unsent)
        self.conns.add(self)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.conv.lingering:
            if self.conv.discard(data, now):
                self.transport.close()
            return
        self._send(self.conv.receive(data, now))

    def eof_received(self) -> bool:
        if self.conv.lingering:
            return False  # the client is done: the transport closes
        self._send(self.conv.receive(b"", time.monotonic()))  # closes once the answers are out
        return True

    def _send(self, reply: Reply) -> None:
        if reply.out:
            self.transport.write(reply.out)
        if reply.next is Next.LINGER:
            self.transport.write_eof()  # the answer and a FIN; read and discard on
        elif reply.next is Next.CLOSE:
            self.transport.close()

    def pause_writing(self) -> None:
        if not self.conv.lingering:  # lingering reads only to discard
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.paused:
            self.paused = False
            resume(self.conv, time.monotonic())
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def overdue(self, now: float) -> CloseReason | None:
        """Why the sweep closes this connection at ``now``, or None (the policy's clocks)."""
        return self.conv.overdue(now, paused=self.paused)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio API
        self.conns.discard(self)


def _sweep(loop: asyncio.AbstractEventLoop, conns: set[ZenProtocol]) -> None:
    now = time.monotonic()
    for conn in [c for c in conns if c.overdue(now)]:
        conn.transport.abort()
    loop.call_later(TICK, _sweep, loop, conns)


async def _main(settings: Settings, name: str) -> None:
    loop = asyncio.get_running_loop()
    conns: set[ZenProtocol] = set()
    limits = connection_limits(settings)
    listener = open_listener(settings, blocking=False)
    server = await loop.create_server(lambda: ZenProtocol(limits, settings.max_unsent_bytes, conns), sock=listener)
    loop.call_later(TICK, _sweep, loop, conns)
    announce_ready(name, listener, settings, loop=type(loop).__module__)
    async with server:
        await server.serve_forever()


def serve(settings: Settings, *, name: str, uvloop: bool = False, **_options: Any) -> int:
    """Serve forever (until SIGTERM) on the stock loop or uvloop."""
    return run_asyncio(_main(settings, name), uvloop=uvloop)
