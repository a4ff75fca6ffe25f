"""Random bytes, bounded in time: hypothesis over the protocol core and over a live server.

The oracle is a reference model written from docs/protocol.md alone (whitespace
skipped before a question, a question ends at ``?``, longer than the limit
-> too long and nothing after it, an unfinished question at EOF gets
nothing), independent of :class:`QuestionReader`'s implementation.
"""

from __future__ import annotations

import itertools
import random
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.core import zen
from app.core.protocol import AnswerReader, QuestionReader

from .server import Server, open_server

pytestmark = pytest.mark.slow

LIMIT = 64  # MAX_REQUEST_BYTES of the live server: small, so random input reaches it
WHITESPACE = b" \t\r\n"

#: Bytes that matter to the framing, mixed with arbitrary ones.
_interesting = st.sampled_from([b"?", b" ", b"\n", b"\r", b"\t", b".", b"Beautiful is better than?", b"\x00", b"\xff"])
payloads = st.lists(st.one_of(st.binary(max_size=40), _interesting), max_size=30).map(b"".join)


def reference(data: bytes, limit: int) -> tuple[list[bytes], bool]:
    """(complete questions, too long?) for ``data`` followed by EOF, from docs/protocol.md."""
    questions: list[bytes] = []
    pos = 0
    while True:
        while pos < len(data) and data[pos] in WHITESPACE:
            pos += 1
        if pos >= len(data):
            return questions, False
        mark = data.find(b"?", pos)
        length = (mark + 1 - pos) if mark >= 0 else len(data) - pos
        if length > limit or (mark < 0 and length >= limit):
            return questions, True
        if mark < 0:
            return questions, False  # unfinished at EOF: no answer
        questions.append(data[pos : mark + 1])
        pos = mark + 1


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=3000, deadline=None)
@given(payloads, st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=8), st.integers(1, 80))
def test_core_matches_the_reference_for_any_bytes_and_any_split(data: bytes, cuts: list[int], limit: int) -> None:
    reader = QuestionReader(limit)
    got: list[bytes] = []
    for piece in [*_split(data, cuts), b""]:
        reader.receive_data(piece)
        got.extend(reader.next_questions(7))
        got.extend(reader.next_questions())
        # Resource bound: an unfinished question never buffers past the limit.
        assert reader.too_long or len(reader.partial) < limit + 1
    questions, too_long = reference(data, limit)
    assert got == questions
    assert reader.too_long == too_long


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_answer_reader_never_crashes_on_random_bytes(data: bytes, cuts: list[int]) -> None:
    reader = AnswerReader(max_size=64)
    answers: list[bytes] = []
    try:
        for piece in _split(data, cuts):
            answers.extend(reader.receive_data(piece))
    except ValueError:
        return  # an over-long answer is refused, never buffered
    assert b"".join(answers) + reader.partial == data


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[Server]:
    with open_server({"MAX_REQUEST_BYTES": str(LIMIT)}) as server:
        yield server


def _exchange(server: Server, pieces: list[bytes]) -> tuple[bytes, str]:
    with socket.create_connection(server.addr, timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return got, "reset"
            if not data:
                return got, "eof"
            got += data


_LIVE: dict[str, int] = {"examples": 0, "bytes": 0}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads, st.lists(st.integers(0, 1 << 16), max_size=4))
def test_live_server_answers_random_bytes_like_the_reference(fuzz_server: Server, data: bytes, cuts: list[int]) -> None:
    questions, too_long = reference(data, LIMIT)
    expected = b"".join(zen.answer(q) for q in questions) + (zen.TOO_LONG if too_long else b"")
    got, how = _exchange(fuzz_server, _split(data, cuts))
    assert (got, how) == (expected, "eof"), data
    _LIVE["examples"] += 1
    _LIVE["bytes"] += len(data)


def test_live_server_random_blast(fuzz_server: Server) -> None:
    """1 MiB of seeded random bytes (about one in five a '?'), in random-sized pieces, answered like the reference."""
    rng = random.Random(1060)
    alphabet = bytes(range(256)) + b"?" * 64 + WHITESPACE * 8
    data = bytes(rng.choices(alphabet, k=1 << 20))
    questions, too_long = reference(data, LIMIT)
    assert len(questions) > 10_000, "the blast must be mostly questions to mean anything"
    pieces, pos = [], 0
    while pos < len(data):
        size = rng.randint(1, 8192)
        pieces.append(data[pos : pos + size])
        pos += size
    expected = b"".join(zen.answer(q) for q in questions) + (zen.TOO_LONG if too_long else b"")
    got, how = _exchange(fuzz_server, pieces)
    assert how == "eof"
    assert got == expected
    _LIVE["examples"] += 1
    _LIVE["bytes"] += len(data)


def test_live_server_survived_the_fuzzing(fuzz_server: Server, figures: dict[str, Any]) -> None:
    """Runs after the live fuzz (same module server): same workers, no error, still answering."""
    assert len(fuzz_server.workers()) == 2
    assert not fuzz_server.log.named("worker_exited")
    fuzz_server.assert_clean_log()
    with socket.create_connection(fuzz_server.addr, timeout=5) as sock:
        sock.sendall(b"Simple is better than?")
        assert sock.recv(16) == b"Complex."
    figures["fuzz_live"] = dict(_LIVE)
