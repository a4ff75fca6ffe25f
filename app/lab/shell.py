"""What every lab server shares: the listener, the ready event, production's limits, the blocking conversation.

Owns: binding a lab server's one listening socket, logging ``server_ready``
with its port, the :class:`~app.core.policy.Limits` of a connection built
from the settings exactly as production's (:func:`connection_limits`), and
the blocking per-connection loop (:func:`serve_conversation`, used by the
single, thread, fork and pool servers): ``recv`` with a socket timeout that
ends at the conversation's deadline.

Never: decides what to answer, which deadline applies or when to linger and
close (``app.core.policy`` does, for every server and production alike), or
how connections are waited for: that is what each lab module shows, and the
only thing in which they differ.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Coroutine
from typing import Any, Final

from app import logs
from app.config import Settings
from app.core.policy import Conversation, Limits, Next, resume
from app.server.listener import bind_socket, tune_accepted
from app.server.loops import ASYNCIO, UVLOOP, LoopUnavailableError, choose_loop

#: One recv() per wakeup; 64 KiB is the loopback segment size and asyncio's default.
RECV_SIZE: Final = 65536


def connection_limits(settings: Settings) -> Limits:
    """The bounds of one connection, as production's: the settings' limits, the policy's linger bounds."""
    return Limits(
        max_question=settings.max_request_bytes,
        request_timeout=settings.request_timeout,
        idle_timeout=settings.idle_timeout,
    )


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


def serve_conversation(conn: socket.socket, limits: Limits) -> None:
    """Answer every question on blocking ``conn`` until the policy closes it, or an error; closes ``conn``.

    Each ``recv`` may wait until the conversation's deadline and no longer
    (a timeout is the close).  ``sendall`` blocking is the backpressure: a
    client that does not read stops us reading, for at most the idle
    timeout; once it has read, the request clock restarts (as production's).
    """
    conv = Conversation(limits, time.monotonic())
    with conn:
        try:
            while True:
                left = conv.deadline()[0] - time.monotonic()
                if left <= 0:
                    return
                conn.settimeout(left)
                data = conn.recv(RECV_SIZE)
                now = time.monotonic()
                if conv.lingering:
                    if conv.discard(data, now):
                        return
                    continue
                reply = conv.receive(data, now)
                if reply.out:
                    conn.settimeout(limits.idle_timeout)
                    conn.sendall(reply.out)
                    resume(conv, time.monotonic())
                if reply.next is Next.CLOSE:
                    return
                if reply.next is Next.LINGER:
                    conn.shutdown(socket.SHUT_WR)  # the answer and a FIN; read and discard on
        except OSError:  # a timeout, a reset: the client is gone or too slow
            return


def run_asyncio(main: Coroutine[Any, Any, None], *, uvloop: bool) -> int:
    """Run an asyncio lab server's ``main`` on the stock loop or on uvloop; returns 0.

    A variant named for uvloop runs on it or not at all (``loops.LoopUnavailableError``):
    its figures must not silently be the stock loop's.
    """
    try:
        chosen = choose_loop(UVLOOP if uvloop else ASYNCIO)
    except LoopUnavailableError:
        main.close()  # never awaited
        raise
    chosen.run(main)
    return 0
