"""Each architecture's documented weakness really shows, and the production server does not have it.

Behaviour, not speed: who gets an answer, how many threads and processes
exist, which processes did the work.  Every wait has a deadline of a second
or two; every server is stopped by the fixture, children included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from app.tools import bench
from app.tools.process import RunningServer, running_server
from app.tools.scenarios import memory_at, probe_while_idle

POOL = 3
ENV = {"LAB_POOL_SIZE": str(POOL), "WORKERS": "2"}
HELD = 100


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    with running_server(request.param, env=ENV) as running:
        yield running


def _params(*names: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("server", names, indirect=True)


@_params("single")
def test_single_threaded_makes_a_second_client_wait_while_the_first_idles(server: RunningServer) -> None:
    result = probe_while_idle(server, 1, wait=1.0)
    assert result.idle_answered == 1
    assert not result.answered_while_idle
    assert result.answered_after_close, "the second client was queued, and is served once the first leaves"


@_params("threadpool", "thread", "poll", "asyncio-streams", "worker", "percore")
def test_an_idle_client_does_not_block_the_others(server: RunningServer) -> None:
    assert probe_while_idle(server, 1, wait=5.0).answered_while_idle


@_params("threadpool", "prefork")
def test_a_fixed_pool_is_exhausted_by_pool_size_idle_clients(server: RunningServer) -> None:
    assert probe_while_idle(server, POOL - 1, wait=5.0).answered_while_idle, "below its size the pool serves"
    full = probe_while_idle(server, POOL, wait=1.0)
    assert full.idle_answered == POOL
    assert not full.answered_while_idle
    assert full.answered_after_close


@_params("thread", "fork", "percore")
def test_pool_size_idle_clients_do_not_exhaust_the_others(server: RunningServer) -> None:
    assert probe_while_idle(server, POOL, wait=5.0).answered_while_idle


@_params("thread")
def test_thread_per_connection_grows_a_thread_and_memory_per_client(server: RunningServer) -> None:
    mem = memory_at(server, HELD)
    assert mem.answered == HELD
    assert mem.threads_after - mem.threads_before >= HELD
    assert mem.rss_per_connection >= 8 * 1024, "a thread's stack and state cost at least two pages"


@_params("fork")
def test_process_per_connection_grows_a_process_and_memory_per_client(server: RunningServer) -> None:
    mem = memory_at(server, HELD)
    assert mem.answered == HELD
    assert mem.processes_after - mem.processes_before >= HELD
    assert mem.uss_per_connection >= 100 * 1024, "a forked interpreter dirties well over 100 KiB"


@_params("percore", "poll")
def test_event_loops_hold_clients_without_threads_or_processes(server: RunningServer) -> None:
    mem = memory_at(server, HELD)
    assert mem.answered == HELD
    assert mem.processes_after == mem.processes_before
    assert mem.threads_after == mem.threads_before


def _busy_processes(server: RunningServer) -> tuple[int, int, int]:
    """Run a short pipelined load; (processes, threads, processes that used CPU)."""
    marks = []
    spec = bench.LoadSpec(server.host, server.port, mode="pipeline", connections=16, depth=32, duration=1.5)
    tally = bench.run_load(spec, on_start=lambda: marks.append(server.tree()))
    after = server.tree()
    assert tally.errors == 0
    assert tally.answers > 0
    before = marks[0]
    busy = [pid for pid, cpu in after.cpu_by_pid.items() if cpu - before.cpu_by_pid.get(pid, 0.0) >= 0.02]
    return after.processes, after.threads, len(busy)


@_params("asyncio-protocol-uvloop", "worker")
def test_a_single_event_loop_is_one_thread_on_one_core(server: RunningServer) -> None:
    processes, threads, busy = _busy_processes(server)
    assert (processes, threads, busy) == (1, 1, 1)


@_params("percore")
def test_the_per_core_server_spreads_the_load_over_every_worker(server: RunningServer) -> None:
    start = time.monotonic()
    processes, _threads, busy = _busy_processes(server)
    assert processes == 3  # the master and WORKERS=2 workers
    assert busy == 2, "both workers served (the master only supervises)"
    assert time.monotonic() - start < 30
