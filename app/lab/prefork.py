"""A pre-forked pool of processes (multiprocessing), each calling accept() on one socket.

Owns: starting ``LAB_POOL_SIZE`` children with the "fork" start method,
which inherit the listening socket, and ending them when it stops.  Its
weakness is the fixed pool's: N+1 idle clients make the next one wait; and
each child is a whole interpreter.
Never: respawns a child; ``app.server.master`` is the production version of this idea.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
from typing import Any

from app.config import Settings
from app.core.policy import Limits
from app.lab.shell import accept_one, announce_ready, connection_limits, open_listener, serve_conversation


def _child(listener: socket.socket, limits: Limits) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent ends us
    while True:
        conn = accept_one(listener)
        if conn is not None:
            serve_conversation(conn, limits)


def serve(settings: Settings, *, name: str, **_options: Any) -> int:
    """Start the pool, wait for it; terminate and join it on SIGTERM/SIGINT."""
    ctx = multiprocessing.get_context("fork")
    limits = connection_limits(settings)
    with open_listener(settings) as listener:
        procs = [
            ctx.Process(target=_child, args=(listener, limits), daemon=True) for _ in range(settings.lab_pool_size)
        ]
        try:
            for proc in procs:
                proc.start()
            announce_ready(name, listener, settings, pool=len(procs))
            for proc in procs:
                proc.join()
        finally:
            for proc in procs:
                if proc.pid is not None:
                    proc.terminate()
            for proc in procs:
                if proc.pid is not None:
                    proc.join(5.0)
    return 0
