"""A worker's signs of life to the master, over the pipe the master holds per worker.

Owns: the worker's end of that pipe and what travels on it, one byte at a
time: :data:`READY` once the worker accepts, then :data:`BEAT` every
:data:`INTERVAL` seconds from the event loop itself (a timer chain, so a
loop stuck in a blocking call or a C extension goes silent, which a thread
would hide), and :data:`RECYCLE` with each beat once the worker has
answered its MAX_REQUESTS (the master replaces it, then ignores the
repeats).  And the stack dump: :func:`install_dump` registers
``faulthandler`` on :data:`DUMP_SIGNAL`, so the master can get a Python
stack of every thread even from a loop stuck in C.

Never: blocks (the pipe is non-blocking; a full pipe means the master is
behind, and a full pipe proves life as well as one more byte would),
decides anything about other workers, or writes to the log.

The dump goes to this pipe, not to stdout: the master reads it and logs it
as one ``worker_stack_dump`` event.  ``faulthandler`` writes a frame at a
time, which on a shared stdout would interleave with the other processes'
lines and, the pipe being non-blocking (``app.logsink``), could be cut.
``chain=True`` on a signal whose default action is to terminate makes the
dump the worker's last act: once written, the default action ends the
process, so a worker that was merely stopped (SIGSTOP, then the master's
SIGCONT) dies before it runs one more loop turn, and never accepts a
connection it could not finish.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import random
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from app.config import Settings

READY: Final = b"R"
BEAT: Final = b"."
RECYCLE: Final = b"M"
#: Twice a second: the master's WORKER_TIMEOUT (2 s at least) then spans
#: several beats, so a loop that is merely late never looks silent.
INTERVAL: Final = 0.5
#: The master's request for a stack dump (then the worker's end).  SIGUSR1:
#: its default action terminates, and neither uvloop nor this server uses it.
DUMP_SIGNAL: Final = signal.SIGUSR1


def install_dump(fd: int) -> None:
    """Have :data:`DUMP_SIGNAL` write every thread's stack to ``fd``, then end the process."""
    faulthandler.register(DUMP_SIGNAL, file=fd, all_threads=True, chain=True)


def recycle_threshold(max_requests: int, jitter: int, rand: Callable[[int, int], int] = random.randint) -> int:
    """MAX_REQUESTS plus this worker's share of the jitter (0: never recycle)."""
    if max_requests <= 0:
        return 0
    return max_requests + (rand(0, jitter) if jitter > 0 else 0)


class Heartbeat:
    """The worker's end of the master's pipe: ready, beats, and the recycle request.

    ``answered`` returns the questions the worker has answered so far; it is
    called once per beat, and only when ``threshold`` is set (see
    :func:`recycle_threshold`).

    Resource handling: owns ``fd`` from construction; :meth:`stop` stops
    the beats, and the descriptor closes with the process (the master reads
    end of file: the worker is gone).
    """

    def __init__(self, fd: int, *, threshold: int = 0, answered: Callable[[], int] = lambda: 0) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.threshold = threshold
        self.answered = answered
        self.recycling = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def from_settings(cls, settings: Settings, fd: int) -> Heartbeat:
        """The worker's heartbeat on ``fd``, with its MAX_REQUESTS threshold, and the stack dump installed."""
        install_dump(fd)
        threshold = recycle_threshold(settings.max_requests, settings.max_requests_jitter)
        return cls(fd, threshold=threshold)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Report ready, then beat from ``loop`` (default: the running one) until :meth:`stop`."""
        self._loop = loop or asyncio.get_running_loop()
        self._timer = self._loop.call_later(INTERVAL, self._beat)
        self._send(READY)

    def stop(self) -> None:
        """No more beats (the master then sees the worker silent, or its end of file)."""
        if self._timer is not None:
            self._timer.cancel()
        self._loop = self._timer = None

    def request_recycle(self) -> None:
        """Ask the master for a successor: every beat from now on says so."""
        self.recycling = True
        self._send(RECYCLE)

    def _beat(self) -> None:
        if not self.recycling and self.threshold and self.answered() >= self.threshold:
            self.recycling = True
        if self._loop is not None:
            self._timer = self._loop.call_later(INTERVAL, self._beat)
        self._send(RECYCLE if self.recycling else BEAT)

    def _send(self, byte: bytes) -> None:
        try:
            os.write(self.fd, byte)
        except BlockingIOError:
            pass  # the master is behind; the bytes already waiting prove life as well
        except OSError:
            self.stop()  # the master is gone (EPIPE): the parent-death check stops us
