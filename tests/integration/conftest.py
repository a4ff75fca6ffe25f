"""A real worker on a real socket (127.0.0.1, port 0), its loop (uvloop or asyncio's) in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvloop

from app.config import Settings
from app.server.listener import bind_socket
from app.server.worker import Worker


class EventLog:
    """A stand-in structlog logger that keeps events (the worker only calls its methods)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def _log(self, event: str, **fields: Any) -> None:
        with self._cond:
            self.events.append({"event": event, **fields})
            self._cond.notify_all()

    debug = info = warning = error = _log

    def wait_for(self, name: str, predicate: Callable[[dict[str, Any]], bool] = lambda _e: True,
                 timeout: float = 10.0) -> dict[str, Any]:  # fmt: skip
        with self._cond:
            found: list[dict[str, Any]] = []

            def match() -> bool:
                found[:] = [e for e in self.events if e["event"] == name and predicate(e)]
                return bool(found)

            assert self._cond.wait_for(match, timeout), f"no {name} event in {[e['event'] for e in self.events]}"
            return found[0]


class RunningWorker:
    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop, log: EventLog, port: int) -> None:
        self.worker, self.loop, self.log, self.port = worker, loop, log, port
        self.host = "127.0.0.1"

    def call(self, func: Callable[[], Any]) -> Any:
        """Run ``func`` in the worker's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(_call(func), self.loop).result(5)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.worker.request_stop)


async def _call(func: Callable[[], Any]) -> Any:
    return func()


FAST = Settings(request_timeout=5.0, idle_timeout=10.0, graceful_timeout=5.0, drain_quiet=0.2, max_connections=1000)
#: The two ways a worker accepts (accept.NATIVE_ENTER): libuv while far below
#: the cap, its own accept loop near it (two headrooms of 64 connections).
NATIVE = FAST.replace(max_connections=10_000)
OWN = FAST.replace(max_connections=100)
#: The loops a worker runs on (LOOP).  Only uvloop accepts natively: on asyncio's
#: loop the worker accepts in its own loop whatever the distance to the cap.
LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
#: The ``worker`` fixture's kinds: (loop, settings, accepts natively).  On
#: asyncio's loop a worker far below its cap still accepts in its own loop.
WORKER_KINDS = {
    "uvloop-native": ("uvloop", NATIVE, True),
    "uvloop-own": ("uvloop", OWN, False),
    "asyncio": ("asyncio", NATIVE, False),
}


@contextmanager
def run_worker(settings: Settings = FAST, loop_name: str = "uvloop") -> Iterator[RunningWorker]:
    """Serve on 127.0.0.1:0 in a thread, on ``loop_name``'s loop, until the block ends, then drain."""
    sock = bind_socket("127.0.0.1", 0, backlog=settings.backlog, reuse_port=False)
    port = sock.getsockname()[1]
    log = EventLog()
    ready = threading.Event()
    worker = Worker(settings, sock, log=log, on_ready=ready.set)
    loop = LOOPS[loop_name]()
    thread = threading.Thread(target=loop.run_until_complete, args=(worker.serve(),), daemon=True)
    thread.start()
    assert ready.wait(5), "worker did not become ready"
    assert log.wait_for("worker_ready")["loop"] == loop_name
    running = RunningWorker(worker, loop, log, port)
    try:
        yield running
    finally:
        running.stop()
        thread.join(15)
        assert not thread.is_alive(), "worker did not stop"
        loop.close()


@pytest.fixture(params=sorted(LOOPS))
def loop_name(request: pytest.FixtureRequest) -> str:
    """Each loop a worker runs on, for the tests that build their own worker (``run_worker``)."""
    name: str = request.param
    return name


@pytest.fixture(params=list(WORKER_KINDS))
def worker(request: pytest.FixtureRequest) -> Iterator[RunningWorker]:
    """A worker on each loop, in each accept mode that loop has."""
    loop_name, settings, native = WORKER_KINDS[request.param]
    with run_worker(settings, loop_name) as running:
        assert (running.worker.acceptor.native is not None) == native
        yield running
