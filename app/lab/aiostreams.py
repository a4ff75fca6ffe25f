"""asyncio with coroutines: one handler per connection over streams (book: srv_asyncio2.py).

Owns: the streams shell over the policy's ``Conversation``: each read under
``asyncio.timeout`` until the conversation's deadline, ``await drain()``
after each write (backpressure), and a proper close (``close()`` then
``await wait_closed()``); on the stock loop or uvloop.  Its weakness: one
event loop is one core, and a task per connection.
Never: blocks the loop, or decides what to answer and when to close (``app.core.policy``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from app.config import Settings
from app.core.policy import Conversation, Limits, Next, resume
from app.lab.shell import RECV_SIZE, announce_ready, connection_limits, open_listener, run_asyncio


async def handle(stream: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: Limits) -> None:
    """Answer one client until the policy closes the connection, or an error; always closes.

    The mirror image of ``shell.serve_conversation``, awaiting where it blocks.
    """
    conv = Conversation(limits, time.monotonic())
    try:
        while True:
            async with asyncio.timeout(conv.deadline()[0] - time.monotonic()):
                data = await stream.read(RECV_SIZE)
            now = time.monotonic()
            if conv.lingering:
                if conv.discard(data, now):
                    return
                continue
            reply = conv.receive(data, now)
            if reply.out:
                writer.write(reply.out)
                async with asyncio.timeout(limits.idle_timeout):
                    await writer.drain()
                resume(conv, time.monotonic())
            if reply.next is Next.CLOSE:
                return
            if reply.next is Next.LINGER:
                writer.write_eof()  # the answer and a FIN; read and discard on
    except (OSError, TimeoutError):
        writer.transport.abort()  # gone, or too slow: drop what is unsent, so the close cannot wait on it
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _main(settings: Settings, name: str) -> None:
    limits = connection_limits(settings)
    listener = open_listener(settings, blocking=False)
    server = await asyncio.start_server(lambda r, w: handle(r, w, limits), sock=listener)
    announce_ready(name, listener, settings, loop=type(asyncio.get_running_loop()).__module__)
    async with server:
        await server.serve_forever()


def serve(settings: Settings, *, name: str, uvloop: bool = False, **_options: Any) -> int:
    """Serve forever (until SIGTERM) on the stock loop or uvloop."""
    return run_asyncio(_main(settings, name), uvloop=uvloop)
