"""What every lab server shares: the listener, the ready event, the blocking conversation.

Owns: binding a lab server's one listening socket, logging ``server_ready``
with its port, the blocking per-connection loop over ``QuestionReader``
(used by the single, thread, fork and pool servers) and the lingering close
after ``Error: request too long.``

Never: decides how connections are waited for; that is what each lab
module shows, and the only thing in which they differ.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Coroutine
from typing import Any, Final

from app import logs
from app.config import Settings
from app.core import zen
from app.core.protocol import QuestionReader
from app.server.listener import bind_socket, tune_accepted

#: One recv() per wakeup; 64 KiB is the loopback segment size and asyncio's default.
RECV_SIZE: Final = 65536
#: Lingering close (nginx's lingering_time/lingering_timeout): after the
#: too-long answer, read and discard the client's input for at most this long
#: and this much, so that closing with unread input does not send a reset
#: that destroys the answer in flight.
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 4 << 20


def open_listener(settings: Settings, *, blocking: bool = True) -> socket.socket:
    """Bind the one listening socket of a lab server (caller closes it)."""
    sock = bind_socket(settings.host, settings.port, backlog=settings.backlog, reuse_port=False)
    sock.setblocking(blocking)
    return sock


def announce_ready(name: str, sock: socket.socket, settings: Settings, **fields: Any) -> None:
    """Log the ``server_ready`` event with the bound port (tests and ``compare`` wait for it)."""
    port = sock.getsockname()[1]
    logs.get_logger(server=name, pid=os.getpid()).info("server_ready", host=settings.host, port=port, **fields)


def accept_one(listener: socket.socket) -> socket.socket | None:
    """Accept one connection (blocking listener); None on a transient error (aborted, EMFILE)."""
    try:
        conn, _addr = listener.accept()
    except (ConnectionAbortedError, InterruptedError):
        return None
    except OSError:
        time.sleep(0.05)  # EMFILE/ENFILE/ENOBUFS: back off instead of spinning
        return None
    tune_accepted(conn)
    return conn


def serve_conversation(conn: socket.socket, settings: Settings) -> None:
    """Answer every question on blocking ``conn`` until EOF, a limit or an error; closes ``conn``.

    The request timeout applies while a question is started, the idle
    timeout otherwise.  ``sendall`` blocking is the backpressure: a client
    that does not read stops us reading.
    """
    reader = QuestionReader(settings.max_request_bytes)
    with conn:
        try:
            while True:
                conn.settimeout(settings.request_timeout if reader.started else settings.idle_timeout)
                reader.receive_data(conn.recv(RECV_SIZE))
                questions = reader.next_questions()
                if questions:
                    conn.sendall(zen.answers(questions))
                if reader.too_long:
                    conn.sendall(zen.TOO_LONG)
                    linger_close(conn)
                    return
                if reader.eof:
                    return
        except OSError:  # timeout, reset: the client is gone or too slow
            return


def linger_close(conn: socket.socket) -> None:
    """Half-close, then read and discard until EOF or the linger bounds; the caller closes."""
    try:
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        discarded = 0
        while discarded < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn.settimeout(left)
            data = conn.recv(RECV_SIZE)
            if not data:
                return
            discarded += len(data)
    except OSError:
        return


def run_asyncio(main: Coroutine[Any, Any, None], *, uvloop: bool) -> int:
    """Run an asyncio lab server's ``main`` on the stock loop or on uvloop; returns 0."""
    if uvloop:
        import uvloop as _uvloop  # noqa: PLC0415 - only the uvloop variants load it

        _uvloop.run(main)
    else:
        asyncio.run(main)
    return 0
