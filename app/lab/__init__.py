"""The architecture lab: every server of chapter 7, each a thin I/O shell over the same core.

Owns: the registry of lab servers (name -> module, one-line description) and
:func:`serve_lab`, which runs one of them in the foreground with the same
environment configuration as the production server (``HOST``, ``PORT``,
``MAX_REQUEST_BYTES``, ``LAB_POOL_SIZE``...).

Never: parses bytes, chooses answers, deadlines or closes (``app.core.policy`` does,
over ``app.core.protocol`` and ``app.core.zen``, for every server and production
alike, with production's limits), and never runs two servers in one process.

Every lab server logs one ``server_ready`` event carrying the bound port
(``PORT=0`` picks a free one), and stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import importlib
import signal
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Final

from app.config import Settings
from app.exits import Exit


@dataclass(frozen=True)
class LabServer:
    """One architecture: the module that serves it, options, and what it shows."""

    name: str
    module: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)


SERVERS: Final[tuple[LabServer, ...]] = (
    LabServer("single", "single", "one thread, blocking: one client at a time (book: srv_single.py)"),
    LabServer(
        "threadpool", "threadpool", "LAB_POOL_SIZE threads calling accept() on one socket (book: srv_threaded.py)"
    ),
    LabServer("thread", "thread", "a new thread per connection (book: socketserver's ThreadingMixIn)"),
    LabServer("fork", "fork", "a new process per connection, os.fork() (book: socketserver's ForkingMixIn)"),
    LabServer("prefork", "prefork", "LAB_POOL_SIZE pre-forked processes (multiprocessing) sharing one socket"),
    LabServer("poll", "poll", "one epoll loop keeping per-connection state itself (book: srv_async.py, fixed)"),
    LabServer("asyncio-protocol", "aioprotocol", "asyncio callbacks (Protocol), stock loop (book: srv_asyncio1.py)"),
    LabServer("asyncio-protocol-uvloop", "aioprotocol", "asyncio callbacks (Protocol) on uvloop", {"uvloop": True}),
    LabServer("asyncio-streams", "aiostreams", "asyncio coroutines (streams, drain), stock loop (srv_asyncio2.py)"),
    LabServer(
        "asyncio-streams-uvloop", "aiostreams", "asyncio coroutines (streams, drain) on uvloop", {"uvloop": True}
    ),
    LabServer("worker", "production", "the production worker in one process: one uvloop loop, one core"),
    LabServer("percore", "production", "the production server: master + one uvloop worker per core", {"percore": True}),
)

BY_NAME: Final = {s.name: s for s in SERVERS}


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every lab server, for ``lab --list``."""
    return [(s.name, s.description) for s in SERVERS]


def _stop_on_term(_signum: int, _frame: FrameType | None) -> None:
    # Unwinds the main thread out of accept()/join()/the loop, so each
    # server's ``finally`` ends the threads and processes it started.
    raise SystemExit(Exit.OK)


def serve_lab(name: str, settings: Settings) -> int:
    """Run lab server ``name`` in the foreground until SIGTERM/SIGINT; returns the exit code."""
    server = BY_NAME.get(name)
    if server is None:
        raise KeyError(name)
    module = importlib.import_module(f"app.lab.{server.module}")
    if not server.options.get("percore"):
        from app import logs  # noqa: PLC0415

        logs.configure(settings)
    signal.signal(signal.SIGTERM, _stop_on_term)
    try:
        result: int = module.serve(settings, name=name, **server.options)
    except KeyboardInterrupt:
        return Exit.OK
    return result
