"""The weakness probes: what each architecture of the chapter cannot do, shown on a running server.

Owns: four behavioural checks against a server started by
``app.tools.process``: does a second client get an answer while the first is
connected and idle; does client N+1 get an answer while N idle clients are
connected; what N held connections cost in memory, threads and processes;
how many processes and cores a load really uses.  ``app.tools.compare`` reports
them for every server; the integration tests assert them.

Never: starts or stops a server, and never sends anywhere but the server's
own address on loopback.  Every wait is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from app.core import zen
from app.tools.process import RunningServer

QUESTION: Final = zen.PROBE_QUESTION
ANSWER: Final = zen.PROBE_ANSWER


@contextlib.contextmanager
def open_clients(server: RunningServer, count: int, *, wait: float) -> Iterator[tuple[list[socket.socket], int]]:
    """Connect ``count`` clients, ask one question on each; yield (sockets, how many were answered in ``wait`` s).

    The connections stay open (idle) until the context exits.  A client the
    server does not serve still connects (the kernel's backlog accepts it),
    so unanswered ones are counted, not failed.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((server.host, server.port), timeout=wait)
            socks.append(sock)
            sock.sendall(QUESTION)
        yield socks, _count_answers(socks, wait)
    finally:
        for sock in socks:
            sock.close()


def _count_answers(socks: list[socket.socket], wait: float) -> int:
    """Wait up to ``wait`` seconds for the answer on every socket; return how many came right."""
    received = dict.fromkeys(socks, b"")
    answered = 0
    deadline = time.monotonic() + wait
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, sock)
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _mask in sel.select(left):
                client: socket.socket = key.data
                try:
                    data = client.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                received[client] += data
                if not data or len(received[client]) >= len(ANSWER):
                    sel.unregister(client)
                    answered += received[client] == ANSWER
    for sock in socks:
        sock.setblocking(True)
    return answered


@dataclass
class WaitResult:
    """Whether a probe client was answered while ``idle`` other clients were connected and idle."""

    idle: int
    idle_answered: int
    answered_while_idle: bool
    answered_after_close: bool


def probe_while_idle(server: RunningServer, idle: int, *, wait: float = 1.0) -> WaitResult:
    """Connect ``idle`` clients (each asks once, then idles), then ask from one more.

    ``answered_after_close`` tells whether the probe was served once the
    idle clients left: it was queued, not refused.
    """
    with open_clients(server, idle, wait=wait) as (_socks, idle_answered):
        probe = socket.create_connection((server.host, server.port), timeout=wait)
        with probe:
            probe.sendall(QUESTION)
            during = _count_answers([probe], wait) == 1
            if during:
                return WaitResult(idle, idle_answered, answered_while_idle=True, answered_after_close=True)
            for sock in _socks:
                sock.close()
            after = _count_answers([probe], wait + 2.0) == 1
    return WaitResult(idle, idle_answered, answered_while_idle=False, answered_after_close=after)


@dataclass
class MemoryResult:
    """What ``connections`` idle connections (``answered`` of them served) cost the server's process tree."""

    connections: int
    answered: int
    rss_before: int
    rss_after: int
    uss_before: int
    uss_after: int
    processes_before: int
    processes_after: int
    threads_before: int
    threads_after: int

    @property
    def uss_per_connection(self) -> float:
        """Bytes of memory private to the server per served connection (USS: shared pages once)."""
        return (self.uss_after - self.uss_before) / max(1, self.answered)

    @property
    def rss_per_connection(self) -> float:
        """RSS growth per served connection (shared pages counted in every process)."""
        return (self.rss_after - self.rss_before) / max(1, self.answered)


def memory_at(server: RunningServer, connections: int, *, wait: float = 10.0, settle: float = 0.3) -> MemoryResult:
    """Hold ``connections`` answered-once, idle connections and measure the server's tree."""
    before = server.tree(uss=True)
    with open_clients(server, connections, wait=wait) as (_socks, answered):
        time.sleep(settle)  # let threads/processes that just served finish touching their pages
        after = server.tree(uss=True)
    return MemoryResult(
        connections,
        answered,
        before.rss,
        after.rss,
        before.uss,
        after.uss,
        before.processes,
        after.processes,
        before.threads,
        after.threads,
    )
