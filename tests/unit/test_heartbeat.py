"""The worker's end of the master's pipe: ready, beats from the loop, recycling, the stack dump.

A real pipe, a real event loop, and for the dump a real child process
killed by its own dump signal; the master's end (``WorkerProcesses``)
reads it back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from app.config import Settings
from app.server import heartbeat
from app.server.heartbeat import BEAT, DUMP_SIGNAL, READY, RECYCLE, Heartbeat, recycle_threshold
from app.server.master import WorkerProcesses
from tests.server import REPO
from tests.unit.test_master import FakeLog


def read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


def run_loop(beat: Heartbeat, seconds: float) -> None:
    async def main() -> None:
        beat.start()
        await asyncio.sleep(seconds)
        beat.stop()

    asyncio.run(main())


@pytest.fixture
def pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    monkeypatch.setattr(heartbeat, "INTERVAL", 0.01)
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)
    os.close(w)


def test_ready_then_beats_from_the_loop_and_nothing_once_stopped(pipe: tuple[int, int]) -> None:
    r, w = pipe
    run_loop(Heartbeat(w), 0.2)
    said = read_all(r)
    assert said[:1] == READY
    assert set(said[1:]) == set(BEAT)
    assert len(said) >= 5
    assert read_all(r) == b""


def test_a_worker_over_its_threshold_asks_to_be_recycled_every_beat(pipe: tuple[int, int]) -> None:
    r, w = pipe
    answered = [0]
    beat = Heartbeat(w, threshold=100, answered=lambda: answered[0])

    async def main() -> None:
        beat.start()
        await asyncio.sleep(0.05)
        answered[0] = 100
        await asyncio.sleep(0.05)
        beat.stop()

    asyncio.run(main())
    said = read_all(r)
    assert said[:1] == READY
    first = said.index(RECYCLE)
    assert set(said[1:first]) == set(BEAT)
    assert set(said[first:]) == set(RECYCLE)
    assert said.count(RECYCLE) >= 2


def test_request_recycle_asks_at_once(pipe: tuple[int, int]) -> None:
    r, w = pipe
    beat = Heartbeat(w)
    beat.request_recycle()
    assert read_all(r) == RECYCLE


def test_a_full_pipe_never_blocks_the_loop(pipe: tuple[int, int]) -> None:
    _, w = pipe
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    beat = Heartbeat(w)
    started = time.monotonic()
    run_loop(beat, 0.05)  # EAGAIN on every beat
    assert time.monotonic() - started < 5
    assert beat.recycling is False


def test_the_recycle_threshold_adds_a_share_of_the_jitter() -> None:
    assert recycle_threshold(0, 50) == 0
    assert recycle_threshold(1000, 0) == 1000
    assert recycle_threshold(1000, 50, lambda lo, hi: hi) == 1050
    assert recycle_threshold(1000, 50, lambda lo, hi: lo) == 1000
    assert {recycle_threshold(10, 3) for _ in range(200)} == {10, 11, 12, 13}
    assert Heartbeat.from_settings(Settings(max_requests=7), os.dup(1)).threshold == 7


CHILD = """
import os, sys, time
from app.server.heartbeat import install_dump
fd = int(sys.argv[1])
install_dump(fd)
def stuck_in_a_call():
    os.write(fd, b"R")
    time.sleep(60)
stuck_in_a_call()
"""


def test_the_dump_signal_writes_every_stack_to_the_pipe_then_ends_the_worker() -> None:
    log = FakeLog()
    procs = WorkerProcesses(Settings(), log=log, spawner=lambda *_: 0)
    r, w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(w)], cwd=REPO, pass_fds=(w,))
    os.close(w)
    procs.pipes[child.pid] = r
    try:
        os.set_blocking(r, True)
        assert os.read(r, 1) == READY
        os.set_blocking(r, False)
        os.kill(child.pid, signal.SIGSTOP)  # stands for a loop stuck in C: it cannot even take a signal
        procs.signal(child.pid, DUMP_SIGNAL)
        procs.signal(child.pid, signal.SIGCONT)
        assert child.wait(10) == -DUMP_SIGNAL  # the dump's chained default action ended it
        while procs.read(child.pid) is not None:  # the dump is collected, not passed on
            pass
    finally:
        if child.poll() is None:
            child.kill()
    assert procs.pipes == {}
    (dump,) = log.named("worker_stack_dump")
    assert dump["pid"] == child.pid
    assert "most recent call first" in dump["stack"]
    assert "in stuck_in_a_call" in dump["stack"]
