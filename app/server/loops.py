"""Which event loop a process runs: the ``LOOP`` setting, resolved once.

Owns: the three choices (``auto``, ``uvloop``, ``asyncio``, as uvicorn's
``--loop``), importing uvloop (the only module that does, besides the
acceptor asking uvloop its libuv version), the runner that drives a
coroutine on the chosen loop, and telling which kind of loop is running
(:func:`name_of`).

Never: logs, exits or decides what a missing uvloop means for the process
(the worker does: a warning under ``auto``, a boot failure under
``uvloop``), reads the environment (``config``) or creates sockets.

uvloop is an optional dependency: platforms without a wheel (a brand-new
CPython, a free-threaded build, PyPy) install and run without it, on
asyncio's default loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

#: Drives ``main`` to completion on a new loop, then closes that loop.
Runner = Callable[[Coroutine[Any, Any, None]], None]

UVLOOP: Final = "uvloop"
ASYNCIO: Final = "asyncio"
AUTO: Final = "auto"


class LoopUnavailableError(Exception):
    """``LOOP=uvloop`` and uvloop does not import; ``str()`` says why and what to do."""


@dataclass(frozen=True, slots=True)
class Chosen:
    """The loop a ``LOOP`` value resolved to."""

    name: str  # UVLOOP or ASYNCIO
    run: Runner
    #: Under ``auto`` without uvloop: why it did not import (the warning's text); else "".
    fallback: str = ""


def choose_loop(wanted: str) -> Chosen:
    """Resolve ``wanted`` (a ``LOOP`` value); raises :class:`LoopUnavailableError` for ``uvloop`` without uvloop."""
    if wanted == ASYNCIO:
        return Chosen(ASYNCIO, asyncio.run)
    try:
        import uvloop  # noqa: PLC0415 - optional, and only processes that run a loop need it
    except ImportError as exc:
        if wanted == UVLOOP:
            msg = f"LOOP=uvloop but uvloop does not import ({exc}); install it, or set LOOP=auto or LOOP=asyncio"
            raise LoopUnavailableError(msg) from None
        return Chosen(ASYNCIO, asyncio.run, fallback=str(exc) or "uvloop does not import")
    return Chosen(UVLOOP, uvloop.run)


def name_of(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` if ``loop`` is one of uvloop's, else ``asyncio`` (without importing uvloop)."""
    return UVLOOP if type(loop).__module__.partition(".")[0] == UVLOOP else ASYNCIO
