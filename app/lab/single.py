"""Single-threaded, blocking: serve one connection to its end, then accept the next.

Owns: the accept loop of the book's ``srv_single.py``.  Its weakness is the
lesson: while one client is connected (even idle), every other client waits.
Never: parses bytes itself (``shell.serve_conversation`` over the core).
"""

from __future__ import annotations

from typing import Any

from app.config import Settings
from app.lab.shell import accept_one, announce_ready, connection_limits, open_listener, serve_conversation


def serve(settings: Settings, *, name: str, **_options: Any) -> int:
    """Serve forever (until SIGTERM), one client at a time."""
    limits = connection_limits(settings)
    with open_listener(settings) as listener:
        announce_ready(name, listener, settings)
        while True:
            conn = accept_one(listener)
            if conn is not None:
                serve_conversation(conn, limits)
