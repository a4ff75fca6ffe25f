"""A connection's reads (``Connection.data_received``): the shortcut for whole questions answers as the reader does."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import Settings
from app.core import zen
from app.server.connection import ANSWER_BATCH, Connection
from app.server.worker import Worker

Q1, Q2 = b"Beautiful is better than?", b"Explicit is better than?"
MAX = 64  # this module's MAX_REQUEST_BYTES: small, so that the size limit is reached too


class _Log:
    def info(self, *_args: object, **_fields: object) -> None:
        pass


class _Transport:
    """What a connection calls on its transport, recorded (it never pauses: no backpressure here)."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.eof = self.closed = False

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert not self.eof
        assert not self.closed
        self.written += data

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with socket.socket() as sock:
        yield Worker(Settings(max_request_bytes=MAX), sock, log=_Log())


def _run(worker: Worker, chunks: list[bytes]) -> tuple[Connection, _Transport]:
    conn, transport = Connection(worker.context), _Transport()
    conn.connection_made(transport)
    for chunk in chunks:
        conn.data_received(chunk)
    return conn, transport


def _state(conn: Connection, transport: _Transport) -> tuple[object, ...]:
    return (
        bytes(transport.written),
        transport.eof,
        transport.closed,
        conn.answered,
        conn.bytes_in,
        conn.bytes_out,
        conn.closing,
        conn.partial,
        conn.started_at is None,
    )


_PIECES = [Q1, Q2, b"zz?", b"?", b" ", b"\r\n", b"\t", b"\x0b", b"Q", b"x" * 70, b"x" * 60 + b"?"]


@given(
    st.lists(st.sampled_from(_PIECES), max_size=40).map(b"".join),
    st.lists(st.integers(0, 1200), max_size=8),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_split_answers_as_one_byte_reads_do(worker: Worker, stream: bytes, cuts: list[int]) -> None:
    """Reads cut anywhere (so whole-question reads take the shortcut) end as reads of one byte each do.

    One-byte reads go through the reader for all but a lone ``?``: the same
    answers, "too long" and lingering close, unfinished bytes and request
    clock, for arbitrary input split at arbitrary points.
    """
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True) if b > a]
    split = _state(*_run(worker, chunks))
    assert split == _state(*_run(worker, [stream[i : i + 1] for i in range(len(stream))]))
    written = split[0]
    assert isinstance(written, bytes)
    assert written.replace(zen.TOO_LONG, b"").count(b".") == split[3]  # every answer counted


def test_a_pipelined_read_is_answered_at_once(worker: Worker) -> None:
    conn, transport = _run(worker, [Q1 + b"\r\n" + Q2 + b"zz?"])
    assert bytes(transport.written) == b"Ugly.Implicit." + zen.UNKNOWN
    assert (conn.answered, conn.reader, conn.started_at) == (3, None, None)


def test_more_than_a_batch_in_one_read(worker: Worker) -> None:
    conn, transport = _run(worker, [Q1 * (ANSWER_BATCH + 3)])
    assert bytes(transport.written) == b"Ugly." * (ANSWER_BATCH + 3)
    assert (conn.answered, conn.reader) == (ANSWER_BATCH + 3, None)


def test_a_too_long_question_after_whole_ones(worker: Worker) -> None:
    conn, transport = _run(worker, [Q1 + b"x" * MAX + b"?" + Q2])
    assert bytes(transport.written) == b"Ugly." + zen.TOO_LONG
    assert transport.eof
    assert conn.lingering
