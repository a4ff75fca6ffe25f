"""asyncio with callbacks: one ``asyncio.Protocol`` per connection (book: srv_asyncio1.py).

Owns: the Protocol shell over ``QuestionReader`` with write-buffer
backpressure (pause_writing -> pause_reading), a lingering close after an
oversize question, and a once-per-TICK timeout sweep; on the stock loop or
uvloop.  Its weakness: one event loop is one core.
Never: blocks the loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from app.config import Settings
from app.core import zen
from app.core.protocol import QuestionReader
from app.lab.shell import LINGER_BYTES, LINGER_SECONDS, announce_ready, open_listener, run_asyncio

TICK: Final = 0.5


class ZenProtocol(asyncio.Protocol):
    """One connection: bytes in, answers out, in order."""

    def __init__(self, settings: Settings, conns: set[ZenProtocol]) -> None:
        self.settings, self.conns = settings, conns
        self.reader = QuestionReader(settings.max_request_bytes)
        self.transport: Any = None
        self.lingering = False
        self.discarded = 0
        self.deadline = time.monotonic() + settings.idle_timeout

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=self.settings.max_unsent_bytes)
        self.conns.add(self)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.discarded += len(data)
            if self.discarded > LINGER_BYTES:
                self.transport.close()
            return
        reader = self.reader
        reader.receive_data(data)
        self._answer()
        limit = self.settings.request_timeout if reader.started else self.settings.idle_timeout
        self.deadline = time.monotonic() + limit

    def eof_received(self) -> bool:
        if not self.lingering:
            self.reader.receive_data(b"")
            self._answer()
        self.transport.close()
        return True

    def _answer(self) -> None:
        reader = self.reader
        questions = reader.next_questions()
        if questions:
            self.transport.write(zen.answers(questions))
        if reader.too_long:
            self.transport.write(zen.TOO_LONG)
            self.transport.write_eof()  # half-close after the answer; keep reading (lingering close)
            self.lingering = True
            self.deadline = time.monotonic() + LINGER_SECONDS

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio API
        self.conns.discard(self)


def _sweep(loop: asyncio.AbstractEventLoop, conns: set[ZenProtocol]) -> None:
    now = time.monotonic()
    for conn in [c for c in conns if c.deadline < now]:
        conn.transport.abort()
    loop.call_later(TICK, _sweep, loop, conns)


async def _main(settings: Settings, name: str) -> None:
    loop = asyncio.get_running_loop()
    conns: set[ZenProtocol] = set()
    listener = open_listener(settings, blocking=False)
    server = await loop.create_server(lambda: ZenProtocol(settings, conns), sock=listener)
    loop.call_later(TICK, _sweep, loop, conns)
    announce_ready(name, listener, settings, loop=type(loop).__module__)
    async with server:
        await server.serve_forever()


def serve(settings: Settings, *, name: str, uvloop: bool = False, **_options: Any) -> int:
    """Serve forever (until SIGTERM) on the stock loop or uvloop."""
    return run_asyncio(_main(settings, name), uvloop=uvloop)
