"""The worker's sweep asks each connection whether it is overdue (``Connection.overdue``), and it closes itself.

Real connections on socket pairs in a real uvloop loop; the sweep is run
at a chosen time (``Worker.expire_overdue(now)``) instead of waiting for
the clocks.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
import uvloop

from app.config import Settings
from app.core import zen
from app.core.policy import LINGER_QUIET, CloseReason
from app.server.connection import Connection
from app.server.worker import Worker

SETTINGS = Settings(request_timeout=5.0, idle_timeout=10.0, max_request_bytes=64)


class _Log:
    """Keeps the close lines (the worker calls these methods only)."""

    def __init__(self) -> None:
        self.closed: list[dict[str, Any]] = []

    def info(self, event: str, **fields: Any) -> None:
        if event == "connection_closed":
            self.closed.append(fields)

    debug = warning = info


class _Bench:
    """A worker that does not accept; connections are handed to it on socket pairs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listening: socket.socket) -> None:
        self.loop = loop
        self.log = _Log()
        self.worker = Worker(SETTINGS, listening, log=self.log)
        self.clients: list[socket.socket] = []

    async def connect(self) -> tuple[socket.socket, Connection]:
        client, server = socket.socketpair()
        client.setblocking(False)
        self.clients.append(client)
        conn = self.worker.new_connection()  # an asyncio protocol by its methods, not its type
        await self.loop.connect_accepted_socket(cast("Callable[[], asyncio.Protocol]", lambda: conn), server)
        return client, conn

    async def recv(self, client: socket.socket) -> bytes:
        return await asyncio.wait_for(self.loop.sock_recv(client, 100), 5)

    async def until(self, predicate: Callable[[], bool]) -> None:
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached")

    def run(self, coro: Awaitable[None]) -> None:
        self.loop.run_until_complete(asyncio.wait_for(coro, 10))


@pytest.fixture
def bench() -> Iterator[_Bench]:
    loop = uvloop.new_event_loop()
    with socket.socket() as listening:
        bench = _Bench(loop, listening)
        try:
            yield bench
        finally:
            for client in bench.clients:
                client.close()
            loop.run_until_complete(asyncio.sleep(0.05))  # connection_lost of the rest
            loop.close()


def test_each_connection_is_closed_for_its_own_clock(bench: _Bench) -> None:
    async def scenario() -> None:
        idle, idle_conn = await bench.connect()
        slow, slow_conn = await bench.connect()
        fresh, _ = await bench.connect()
        slow.send(b"Beautiful is")  # a question started: the request clock runs
        await bench.until(lambda: slow_conn.started_at is not None)
        start = time.monotonic()
        bench.worker.expire_overdue(start + SETTINGS.request_timeout + 0.5)
        await bench.until(lambda: len(bench.log.closed) == 1)
        assert bench.log.closed[0]["reason"] == "request_timeout"
        assert bench.log.closed[0]["unfinished"] == "Beautiful is"
        assert bench.worker.conns.count == 2
        await asyncio.sleep(0.2)  # not a wait: a gap between the two idle clocks
        fresh.send(zen.PROBE_QUESTION)  # progress restarts its idle clock
        assert await bench.recv(fresh) == zen.PROBE_ANSWER
        bench.worker.expire_overdue(idle_conn.active + SETTINGS.idle_timeout + 0.1)
        await bench.until(lambda: len(bench.log.closed) == 2)
        assert [line["reason"] for line in bench.log.closed] == ["request_timeout", "idle_timeout"]
        assert await bench.recv(idle) == b""  # closed politely: nothing was unsent
        assert list(bench.worker.conns) == [c for c in bench.worker.conns if c.closing is None]
        assert bench.worker.conns.count == 1
        assert bench.worker.stats.closes == {"request_timeout": 1, "idle_timeout": 1}

    bench.run(scenario())


def test_a_lingering_close_is_dropped_after_a_quiet_spell(bench: _Bench) -> None:
    async def scenario() -> None:
        client, conn = await bench.connect()
        client.send(b"x" * 100)  # over max_request_bytes: answer, then linger
        await bench.until(lambda: conn.lingering)
        assert conn.overdue(conn.active + LINGER_QUIET / 2, bench.worker.limits) is None
        bench.worker.expire_overdue(conn.active + LINGER_QUIET + 0.1)
        await bench.until(lambda: len(bench.log.closed) == 1)
        assert bench.log.closed[0]["reason"] == CloseReason.TOO_LONG
        assert await bench.recv(client) == zen.TOO_LONG

    bench.run(scenario())


def test_the_close_line_reason_is_a_plain_string(bench: _Bench) -> None:
    async def scenario() -> None:
        client, _conn = await bench.connect()
        client.close()
        await bench.until(lambda: len(bench.log.closed) == 1)
        reason = bench.log.closed[0]["reason"]
        assert type(reason) is str  # the JSON line and the metric label: the value, not an enum
        assert reason == "eof"
        assert all(type(key) is str for key in bench.worker.stats.closes)

    bench.run(scenario())


@pytest.mark.parametrize(
    ("clocks", "reason"),
    [
        ({}, None),
        ({"active": -11.0}, CloseReason.IDLE_TIMEOUT),
        ({"started_at": -6.0}, CloseReason.REQUEST_TIMEOUT),
        ({"started_at": -6.0, "paused": True}, None),  # its answers wait on the client, not the reverse
        ({"closing": CloseReason.EOF, "active": -11.0}, CloseReason.IDLE_TIMEOUT),  # a close that stalled
        ({"closing": CloseReason.TOO_LONG, "started_at": 0.0, "active": -1.5}, CloseReason.TOO_LONG),
    ],
)
def test_a_connection_applies_the_policy_to_its_clocks(clocks: dict[str, Any], reason: CloseReason | None) -> None:
    with socket.socket() as listening:
        worker = Worker(SETTINGS, listening, log=_Log())
    conn = Connection(worker.context)
    conn.active = 0.0
    for name, value in clocks.items():
        setattr(conn, name, value)
    assert conn.overdue(0.0, worker.limits) == reason
