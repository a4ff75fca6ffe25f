"""asyncio with coroutines: one handler per connection over streams (book: srv_asyncio2.py).

Owns: the streams shell over ``QuestionReader``: ``await drain()`` after
each write (backpressure), ``asyncio.timeout`` for the request and idle
timeouts, a lingering close after an oversize question, and a proper close
(``close()`` then ``await wait_closed()``); on the stock loop or uvloop.
Its weakness: one event loop is one core, and a task per connection.
Never: blocks the loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from app.config import Settings
from app.core import zen
from app.core.protocol import QuestionReader
from app.lab.shell import LINGER_BYTES, LINGER_SECONDS, RECV_SIZE, announce_ready, open_listener, run_asyncio


async def _linger(stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write_eof()
    discarded = 0
    async with asyncio.timeout(LINGER_SECONDS):  # TimeoutError: handle() closes
        while discarded < LINGER_BYTES:
            data = await stream.read(RECV_SIZE)
            if not data:
                return
            discarded += len(data)


async def handle(stream: asyncio.StreamReader, writer: asyncio.StreamWriter, settings: Settings) -> None:
    """Answer one client until EOF, a limit, a timeout or an error; always closes."""
    reader = QuestionReader(settings.max_request_bytes)
    try:
        while True:
            async with asyncio.timeout(settings.request_timeout if reader.started else settings.idle_timeout):
                data = await stream.read(RECV_SIZE)
            reader.receive_data(data)
            questions = reader.next_questions()
            if questions:
                writer.write(zen.answers(questions))
                await writer.drain()
            if reader.too_long:
                writer.write(zen.TOO_LONG)
                await writer.drain()
                await _linger(stream, writer)
                return
            if reader.eof:
                return
    except (OSError, TimeoutError):
        return
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _main(settings: Settings, name: str) -> None:
    listener = open_listener(settings, blocking=False)
    server = await asyncio.start_server(lambda r, w: handle(r, w, settings), sock=listener)
    announce_ready(name, listener, settings, loop=type(asyncio.get_running_loop()).__module__)
    async with server:
        await server.serve_forever()


def serve(settings: Settings, *, name: str, uvloop: bool = False, **_options: Any) -> int:
    """Serve forever (until SIGTERM) on the stock loop or uvloop."""
    return run_asyncio(_main(settings, name), uvloop=uvloop)
