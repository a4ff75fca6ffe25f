"""The log line per connection (logs.HotLogger): the same line as structlog's, written once."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import socket
from collections.abc import Iterator

import pytest
import structlog

from app import logs
from app.config import Settings

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)
    structlog.reset_defaults()


def lines(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        data = b""
    return data.decode().splitlines()


FIELDS = {"peer": "127.0.0.1:40000", "reason": "eof", "answered": 3, "duration_ms": 0.123}


def test_json_line_is_structlogs_line(pipe: tuple[int, int]) -> None:
    r, w = pipe
    settings = Settings(log_format="json")
    logs.configure(settings, fd=w)
    logs.HotLogger(settings, fd=w, worker=1, pid=42).info("connection_closed", **FIELDS)
    logs.get_logger(worker=1, pid=42).info("connection_closed", **FIELDS)
    hot, slow = (json.loads(line) for line in lines(r))
    assert list(hot) == list(slow) == ["worker", "pid", *FIELDS, "event", "level", "timestamp"]
    assert TIMESTAMP.match(hot["timestamp"])
    assert TIMESTAMP.match(slow["timestamp"])
    del hot["timestamp"], slow["timestamp"]
    assert hot == slow


def test_json_escapes_client_text_and_needs_no_bound_fields(pipe: tuple[int, int]) -> None:
    r, w = pipe
    settings = Settings(log_format="json")
    logger = logs.HotLogger(settings, fd=w)
    logger.info("connection_closed", unfinished='say "hi"\\\n')
    logger.info("bare")
    logs.HotLogger(settings, fd=w, worker=2).info("bound_only")
    first, bare, bound_only = (json.loads(line) for line in lines(r))
    assert first["unfinished"] == 'say "hi"\\\n'
    assert list(bare) == ["event", "level", "timestamp"]
    assert list(bound_only) == ["worker", "event", "level", "timestamp"]


def test_timestamps_follow_the_clock(pipe: tuple[int, int]) -> None:
    r, w = pipe
    seconds = (
        1_700_000_000.0004,
        1_700_000_000.0009,
        1_700_000_000.0015,
        1_700_000_000.0995,
        1_700_000_000.9991,
        1_700_000_061.5,
    )
    times = iter(seconds)
    logger = logs.HotLogger(Settings(log_format="json"), fd=w, clock=lambda: next(times))
    for _ in seconds:
        logger.info("tick")
    stamps = [json.loads(line)["timestamp"] for line in lines(r)]
    assert stamps == [
        "2023-11-14T22:13:20.000Z",
        "2023-11-14T22:13:20.000Z",
        "2023-11-14T22:13:20.001Z",
        "2023-11-14T22:13:20.099Z",
        "2023-11-14T22:13:20.999Z",
        "2023-11-14T22:14:21.500Z",
    ]


def test_levels_above_info_drop_the_line(pipe: tuple[int, int]) -> None:
    r, w = pipe
    settings = Settings(log_format="json", log_level="warning")
    logs.configure(settings, fd=w)
    logs.HotLogger(settings, fd=w).info("connection_closed", **FIELDS)
    assert lines(r) == []


def test_console_format_goes_through_structlog(pipe: tuple[int, int]) -> None:
    r, w = pipe
    settings = Settings(log_format="console")
    logs.configure(settings, fd=w)
    logs.HotLogger(settings, fd=w, worker=3).info("connection_closed", **FIELDS)
    (line,) = lines(r)
    assert not line.startswith("{")
    for part in ("connection_closed", "peer=127.0.0.1:40000", "worker=3"):
        assert part in line


@pytest.fixture
def datagrams() -> Iterator[tuple[socket.socket, int]]:
    """A datagram socket pair: each write(2) on the fd arrives as one datagram."""
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    r.setblocking(False)
    yield r, w.fileno()
    r.close()
    w.close()
    structlog.reset_defaults()


def writes(sock: socket.socket) -> list[bytes]:
    """The write(2)s made so far, one each."""
    chunks = []
    while True:
        try:
            chunks.append(sock.recv(1 << 16))
        except BlockingIOError:
            return chunks


def test_lines_wait_for_the_flush_interval_then_go_out_in_one_write(datagrams: tuple[socket.socket, int]) -> None:
    r, w = datagrams
    logger = logs.HotLogger(Settings(log_format="json", log_flush_interval=0.05), fd=w, worker=0)

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        for answered in range(3):
            logger.info("connection_closed", answered=answered)
        before = writes(r)
        await asyncio.sleep(0.2)
        return before, writes(r)

    before, after = asyncio.run(scenario())
    assert before == []
    assert len(after) == 1
    assert [json.loads(line)["answered"] for line in after[0].decode().splitlines()] == [0, 1, 2]


def test_a_batch_never_exceeds_pipe_buf(datagrams: tuple[socket.socket, int]) -> None:
    r, w = datagrams
    logger = logs.HotLogger(Settings(log_format="json", log_flush_interval=5.0), fd=w)

    async def scenario() -> list[bytes]:
        for answered in range(100):
            logger.info("connection_closed", peer="127.0.0.1:40000", answered=answered)
        written = writes(r)
        logger.flush()
        return written + writes(r)

    chunks = asyncio.run(scenario())
    assert len(chunks) > 1
    assert all(len(chunk) <= logs.BATCH_BYTES and chunk.endswith(b"\n") for chunk in chunks)
    answered = [json.loads(line)["answered"] for chunk in chunks for line in chunk.decode().splitlines()]
    assert answered == list(range(100))


def test_another_line_of_the_process_flushes_the_batch_first(pipe: tuple[int, int]) -> None:
    r, w = pipe
    settings = Settings(log_format="json", log_flush_interval=5.0)
    logs.configure(settings, fd=w)
    hot = logs.HotLogger(settings, fd=w)

    async def scenario() -> None:
        hot.info("connection_closed", answered=1)
        logs.get_logger().warning("accept_paused")

    asyncio.run(scenario())
    assert [json.loads(line)["event"] for line in lines(r)] == ["connection_closed", "accept_paused"]


def test_a_logger_dropped_with_lines_waiting_still_has_them_written_first(pipe: tuple[int, int]) -> None:
    r, w = pipe
    settings = Settings(log_format="json", log_flush_interval=5.0)
    logs.configure(settings, fd=w)

    async def scenario() -> None:
        hot = logs.HotLogger(settings, fd=w)
        hot.info("connection_closed", answered=1)
        del hot  # the process holds a logger while it has lines to write
        gc.collect()
        logs.get_logger().warning("accept_paused")

    asyncio.run(scenario())
    assert [json.loads(line)["event"] for line in lines(r)] == ["connection_closed", "accept_paused"]


def test_interval_zero_writes_each_line_at_once(datagrams: tuple[socket.socket, int]) -> None:
    r, w = datagrams
    logger = logs.HotLogger(Settings(log_format="json", log_flush_interval=0), fd=w)

    async def scenario() -> list[bytes]:
        logger.info("connection_closed", answered=1)
        logger.info("connection_closed", answered=2)
        return writes(r)

    assert len(asyncio.run(scenario())) == 2


def test_info_fields_is_info_without_keyword_packing(pipe: tuple[int, int]) -> None:
    r, w = pipe
    settings = Settings(log_format="json", log_flush_interval=0)
    logger = logs.HotLogger(settings, fd=w, worker=1)
    logger.info("connection_closed", **FIELDS)
    logger.info_fields("connection_closed", dict(FIELDS))
    by_keywords, by_dict = (json.loads(line) for line in lines(r))
    del by_keywords["timestamp"], by_dict["timestamp"]
    assert list(by_keywords.items()) == list(by_dict.items())
