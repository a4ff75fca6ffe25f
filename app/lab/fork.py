"""A new process for every connection, with os.fork().

Owns: forking per accepted connection, reaping children on SIGCHLD, and
ending the children it started when it stops (socketserver's
``ForkingMixIn``).  Its weakness: a whole process (page tables, the
interpreter's touched pages) per client.
Never: signals a PID it did not fork or has already reaped: SIGCHLD is
blocked between fork() and recording the child, so a child that exits at
once cannot be reaped (and its PID reused) before it is recorded.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

from app.config import Settings
from app.lab.shell import accept_one, announce_ready, connection_limits, open_listener, serve_conversation

_children: set[int] = set()


def _reap(_signum: int = 0, _frame: FrameType | None = None) -> None:
    while _children:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _children.discard(pid)


def serve(settings: Settings, *, name: str, **_options: Any) -> int:
    """Serve forever (until SIGTERM), one process per client; ends the children on the way out."""
    signal.signal(signal.SIGCHLD, _reap)
    limits = connection_limits(settings)
    with open_listener(settings) as listener:
        announce_ready(name, listener, settings)
        try:
            while True:
                conn = accept_one(listener)
                if conn is None:
                    continue
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
                try:
                    pid = os.fork()
                    if pid == 0:
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                        listener.close()
                        try:
                            serve_conversation(conn, limits)
                        finally:
                            os._exit(0)
                    _children.add(pid)
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                conn.close()
        finally:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for pid in list(_children):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
