"""The featureless peer: the fewest lines of plain uvloop that answer Zen questions correctly.

``bench/run.py`` measures it beside ``zenref`` and our server: it is the best
a uvloop ``asyncio.Protocol`` server can do, with none of the production
features (no limits, timeouts, backpressure, logs, metrics, PROXY headers,
draining), so ours costing less than it, with every feature on, is the
claim worth making.

Usage: python bench/minimal.py PORT   (127.0.0.1, one process, until SIGTERM)

Never: imports the project; it is a peer measured beside it, not a part of it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import uvloop

APHORISMS = {
    b"Beautiful is better than?": b"Ugly.",
    b"Explicit is better than?": b"Implicit.",
    b"Simple is better than?": b"Complex.",
    b"Complex is better than?": b"Complicated.",
    b"Flat is better than?": b"Nested.",
    b"Sparse is better than?": b"Dense.",
    b"Now is better than?": b"Never.",
}
UNKNOWN = b"Error: unknown aphorism."


class Zen(asyncio.Protocol):
    """Answer every complete question (up to its ``?``, leading whitespace skipped); keep the rest."""

    __slots__ = ("rest", "transport")

    def __init__(self) -> None:
        self.rest = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        *questions, self.rest = (self.rest + data).split(b"?")
        if questions:
            get = APHORISMS.get
            self.transport.write(b"".join([get(q.lstrip() + b"?", UNKNOWN) for q in questions]))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stopped.set_result, None)
    server = await loop.create_server(Zen, "127.0.0.1", port, backlog=1024, reuse_address=True)
    async with server:
        await stopped


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
