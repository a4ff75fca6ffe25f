"""A new thread for every connection.

Owns: the accept loop that starts one daemon thread per accepted connection
(socketserver's ``ThreadingMixIn``).  Its weakness: memory and scheduling
cost grow with the number of clients (a stack and a thread state each).
Never: bounds the number of threads; the only bound is ``ulimit -n``.
"""

from __future__ import annotations

import threading
from typing import Any

from app.config import Settings
from app.lab.shell import accept_one, announce_ready, connection_limits, open_listener, serve_conversation


def serve(settings: Settings, *, name: str, **_options: Any) -> int:
    """Serve forever (until SIGTERM), one thread per client."""
    limits = connection_limits(settings)
    with open_listener(settings) as listener:
        announce_ready(name, listener, settings)
        while True:
            conn = accept_one(listener)
            if conn is not None:
                threading.Thread(target=serve_conversation, args=(conn, limits), daemon=True).start()
