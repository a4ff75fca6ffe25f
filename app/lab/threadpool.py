"""A fixed pool of threads, each calling accept() on the one listening socket.

Owns: the book's ``srv_threaded.py`` shape (the kernel hands each new
connection to one thread blocked in accept()).  Its weakness: with
``LAB_POOL_SIZE`` slow or idle clients connected, client N+1 waits.
Never: grows the pool; that is the thread-per-connection server.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from app.config import Settings
from app.core.policy import Limits
from app.lab.shell import accept_one, announce_ready, connection_limits, open_listener, serve_conversation


def _accept_forever(listener: socket.socket, limits: Limits) -> None:
    while True:
        conn = accept_one(listener)
        if conn is not None:
            serve_conversation(conn, limits)


def serve(settings: Settings, *, name: str, **_options: Any) -> int:
    """Start the pool and wait for it (forever, until SIGTERM ends the process)."""
    size = settings.lab_pool_size
    limits = connection_limits(settings)
    with open_listener(settings) as listener:
        threads = [
            threading.Thread(target=_accept_forever, args=(listener, limits), name=f"pool-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in threads:
            thread.start()
        announce_ready(name, listener, settings, pool=size)
        for thread in threads:
            thread.join()  # daemon threads die with the process on SIGTERM
    return 0
