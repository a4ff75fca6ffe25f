"""The log sink (app.logsink): never blocks on a stalled reader, drops whole lines, reports drops."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from app.logsink import PIPE_BUF, LogSink, _chunks

F_SETPIPE_SZ = 1031


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)  # one page: fills after a few lines
    yield r, w
    os.close(r)
    os.close(w)


def drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


def line(i: int) -> bytes:
    return json.dumps({"event": "e", "i": i, "pad": "x" * 40}).encode() + b"\n"


def test_chunks_are_whole_lines_of_at_most_pipe_buf() -> None:
    data = b"".join(line(i) for i in range(500))
    chunks = _chunks(data)
    assert b"".join(chunks) == data
    assert all(len(c) <= PIPE_BUF and c.endswith(b"\n") for c in chunks)
    long = b"y" * (PIPE_BUF * 2) + b"\n"
    assert _chunks(line(1) + long + line(2)) == [line(1), long, line(2)]


def test_unread_pipe_never_blocks_drops_whole_lines_and_reports(pipe: tuple[int, int]) -> None:
    r, w = pipe
    sink = LogSink(w, limit=8192)
    for i in range(2000):
        sink.write(line(i))  # a blocking write would hang here (pytest-timeout fails the test)
    assert sink.dropped_total > 0
    assert sink.pending()
    received = drain(r)
    while sink.pending():
        sink.flush()
        received += drain(r)
    events = [json.loads(raw) for raw in received.splitlines()]  # every line whole
    numbered = [e["i"] for e in events if e["event"] == "e"]
    assert numbered == sorted(numbered)  # in order
    reports = [k for k, e in enumerate(events) if e["event"] == "logs_dropped"]
    assert reports
    assert sum(events[k]["dropped"] for k in reports) == sink.dropped_total == 2000 - len(numbered)
    # Each report stands where its lines were dropped: it counts exactly the gap in the numbers.
    for k in reports:
        before = max((e["i"] for e in events[:k] if e["event"] == "e"), default=-1)
        after = min((e["i"] for e in events[k:] if e["event"] == "e"), default=2000)
        assert events[k]["dropped"] == after - before - 1


def test_slow_reader_loses_nothing_while_the_buffer_holds(pipe: tuple[int, int]) -> None:
    r, w = pipe
    sink = LogSink(w, limit=1 << 20)
    received = b""
    for i in range(3000):
        sink.write(line(i))
        if i % 50 == 0:  # a trickle: a little now and then
            os.set_blocking(r, False)
            try:
                received += os.read(r, 512)
            except BlockingIOError:
                pass
    while sink.pending() or not received.endswith(line(2999)):
        sink.flush()
        received += drain(r)
    assert sink.dropped_total == 0
    assert received == b"".join(line(i) for i in range(3000))


def test_event_loop_drains_when_the_reader_comes_back(pipe: tuple[int, int]) -> None:
    r, w = pipe

    async def main() -> bytes:
        sink = LogSink(w, limit=1 << 20)
        for i in range(400):
            sink.write(line(i))
        assert sink.pending()
        received = b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (sink.pending() or not received.endswith(line(399))) and loop.time() < deadline:
            received += drain(r)
            await asyncio.sleep(0.01)  # the loop's writer callback does the flushing
        sink.close()
        return received

    assert asyncio.run(main()) == b"".join(line(i) for i in range(400))


def test_a_regular_file_stays_blocking() -> None:
    with tempfile.TemporaryFile() as f:
        sink = LogSink(f.fileno())
        assert not sink.nonblocking
        assert os.get_blocking(f.fileno())
        sink.write(line(1))
        f.seek(0)
        assert f.read() == line(1)


def test_a_reader_gone_is_not_an_error(pipe: tuple[int, int]) -> None:
    r, w = os.pipe()
    os.close(r)
    sink = LogSink(w)
    sink.write(line(1))
    assert not sink.pending()
    os.close(w)


def test_drain_waits_for_a_slow_reader_within_its_bound(pipe: tuple[int, int]) -> None:
    r, w = pipe
    sink = LogSink(w, limit=1 << 20)
    lines = [b'{"n":%d}\n' % i for i in range(2000)]
    for data in lines:
        sink.write(data)
    assert sink.pending()
    received = bytearray()

    def trickle() -> None:
        while len(received) < len(b"".join(lines)):
            received.extend(drain(r))
            time.sleep(0.005)

    reader = threading.Thread(target=trickle)
    reader.start()
    assert sink.drain(10.0)
    reader.join(10)
    assert [int(line[5:-1]) for line in bytes(received).splitlines()] == list(range(2000))


def test_drain_gives_up_at_its_bound_with_nobody_reading(pipe: tuple[int, int]) -> None:
    _, w = pipe
    sink = LogSink(w, limit=1 << 20)
    while not sink.pending():
        sink.write(b"x" * 100 + b"\n")
    started = time.monotonic()
    assert not sink.drain(0.2)
    assert 0.15 < time.monotonic() - started < 2
