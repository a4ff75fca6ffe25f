"""Where a process's log lines go: its stdout, written without ever blocking.

Owns: the one writer per process to the log file descriptor.  Serving beats
logging: a log reader that stalls (a stuck log shipper, a Docker logging
driver that blocks, a busy supervisord) must not stop the server, so a pipe
or socket on stdout is made non-blocking, lines that cannot be written at
once wait in a bounded buffer (LOG_BUFFER_BYTES), and lines beyond the
bound are dropped and counted, never cut.  Where lines were dropped, the
reader finds a ``logs_dropped`` event with their number, in their place:
after the lines queued before them, before every line written after them.

Every ``write(2)`` is whole lines of at most PIPE_BUF bytes, which a pipe
takes whole or not at all, so the lines of the master and its workers, who
share the pipe, never interleave and no half line reaches the reader.

Never: renders events (``logs`` does) or decides what is logged.  A
terminal or a regular file stays blocking: a file does not wait on a
reader, and a terminal's flags are shared with the shell that started us.

Who drains the buffer: each write first tries the queued lines; a worker's
event loop watches the descriptor (``add_writer``) while lines wait, and
the master's main loop calls :meth:`LogSink.flush` when :meth:`pending`.
At exit (``logs``), :meth:`LogSink.drain` waits a bounded time for a slow
reader to take what is left.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, Final

#: A pipe takes a write of at most this many bytes whole, or not at all.
PIPE_BUF: Final = select.PIPE_BUF
#: The default bound of the buffer (LOG_BUFFER_BYTES in app.config says why).
DEFAULT_LIMIT: Final = 1 << 20


def _nonblocking_capable(fd: int) -> bool:
    """True for a pipe or a socket: the descriptors a stalled reader can block."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _chunks(data: bytes) -> list[bytes]:
    """``data`` (whole lines) cut at line ends into pieces of at most PIPE_BUF (a longer line alone)."""
    if len(data) <= PIPE_BUF:
        return [data]
    out: list[bytes] = []
    start = 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + PIPE_BUF) + 1
        if end <= start:  # one line longer than PIPE_BUF: it goes alone
            end = data.find(b"\n", start) + 1 or len(data)
        out.append(data[start:end])
        start = end
    return out


class LogSink:
    """The non-blocking, bounded writer of one process's log lines (thread-safe)."""

    def __init__(self, fd: int, limit: int = DEFAULT_LIMIT, dropped_line: Callable[[int], bytes] | None = None) -> None:
        self.fd = fd
        self.limit = limit
        self.nonblocking = _nonblocking_capable(fd)
        if self.nonblocking:
            os.set_blocking(fd, False)
        self._dropped_line = dropped_line or (lambda n: b'{"event":"logs_dropped","dropped":%d}\n' % n)
        # Chunks of whole lines, and in the place of dropped lines their count.
        self._queue: collections.deque[bytes | int] = collections.deque()
        self._queued = 0  # bytes of the queued chunks
        self.dropped_total = 0  # every line this process dropped (a metric)
        self._lock = threading.Lock()
        self._watched: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def write(self, data: bytes) -> None:
        """Write ``data`` (whole lines, each ending in a newline) now, or queue it, or drop it."""
        with self._lock:
            if self._closed:
                return
            if self._queue:
                self._flush_locked()
            for chunk in _chunks(data):
                if self._queue or not self._write_now(chunk):
                    self._enqueue(chunk)
            self._watch()

    def pending(self) -> bool:
        """True while lines wait for the descriptor (or a drop waits to be reported)."""
        return bool(self._queue)

    def flush(self) -> bool:
        """Write what waits, as far as the descriptor takes it; True when nothing waits any more."""
        with self._lock:
            self._flush_locked()
            self._watch()
            return not self._queue

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the descriptor to take what waits; True when nothing does."""
        deadline = time.monotonic() + timeout
        while not self.flush():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                select.select([], [self.fd], [], left)
            except (OSError, ValueError):
                return False
        return True

    def close(self) -> None:
        """Stop watching the descriptor; later writes are dropped silently (the process is ending)."""
        with self._lock:
            self._flush_locked()
            self._unwatch()
            self._closed = True

    # -- internals (called with the lock held) --------------------------------

    def _write_now(self, chunk: bytes) -> bool:
        """One ``write(2)``; True if the whole chunk went out (or can never go: a reader gone)."""
        try:
            written = os.write(self.fd, chunk)
        except BlockingIOError:
            return False
        except (BrokenPipeError, OSError):
            return True  # nobody reads any more: keeping it would only fill the buffer
        if written < len(chunk):  # a socket took part of a long line: the rest must come next
            self._queue.appendleft(chunk[written:])
            self._queued += len(chunk) - written
        return True

    def _enqueue(self, chunk: bytes) -> None:
        if self._queued + len(chunk) > self.limit:
            lines = chunk.count(b"\n") or 1
            self.dropped_total += lines
            if self._queue and isinstance(self._queue[-1], int):
                self._queue[-1] += lines
            else:
                self._queue.append(lines)
            return
        self._queue.append(chunk)
        self._queued += len(chunk)

    def _flush_locked(self) -> None:
        queue = self._queue
        while queue:
            head = queue.popleft()
            if isinstance(head, int):  # the place of dropped lines: report them there
                if not self._write_now(self._dropped_line(head)):
                    queue.appendleft(head)
                    return
                continue
            chunk = head
            self._queued -= len(chunk)
            # Coalesce small chunks into one write of at most PIPE_BUF.
            while queue and not isinstance(queue[0], int) and len(chunk) + len(queue[0]) <= PIPE_BUF:
                nxt = queue.popleft()
                assert isinstance(nxt, bytes)
                self._queued -= len(nxt)
                chunk += nxt
            if not self._write_now(chunk):
                queue.appendleft(chunk)
                self._queued += len(chunk)
                return

    def _watch(self) -> None:
        """While lines wait, have this thread's running event loop call back when the fd is writable."""
        if not self._queue:
            self._unwatch()
            return
        if self._watched is not None or not self.nonblocking:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop in this thread (the master, the admin thread): the master's loop flushes
        loop.add_writer(self.fd, self._on_writable)
        self._watched = loop

    def _unwatch(self) -> None:
        if self._watched is not None:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                _remove_writer(self._watched, self.fd)
            self._watched = None

    def _on_writable(self) -> None:
        self.flush()


def _remove_writer(loop: Any, fd: int) -> None:
    """``loop.remove_writer(fd)``, its result unused and unchecked.

    The loop is typed Any on purpose: typeshed says ``remove_writer`` returns
    bool, uvloop returns None, and code compiled by mypyc checks a declared
    bool (a TypeError at run time).
    """
    loop.remove_writer(fd)
