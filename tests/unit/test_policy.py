"""The per-connection policy (app.core.policy): replies, clocks, deadlines, reasons."""

from __future__ import annotations

import pytest

from app.core import zen
from app.core.policy import (
    CloseReason,
    Conversation,
    Limits,
    Next,
    Reply,
    after,
    overdue,
    progress,
    respond,
    respond_more,
)
from app.core.protocol import QuestionReader

Q = b"Beautiful is better than?"
A = zen.APHORISMS[Q]
LIMITS = Limits(max_question=64, request_timeout=10.0, idle_timeout=60.0, linger_quiet=1.0, linger_max=5.0)


def test_close_reasons_are_the_log_strings() -> None:
    assert str(CloseReason.TOO_LONG) == "too_long"
    assert f"{CloseReason.REQUEST_TIMEOUT}" == "request_timeout"
    assert {r.value for r in CloseReason} >= {"eof", "reset", "idle_timeout", "shutdown", "over_capacity"}


@pytest.mark.parametrize(
    ("chunks", "out", "nxt"),
    [
        ([Q], A, Next.READ),
        ([Q + b" " + Q], A + A, Next.READ),
        ([b"Beautiful is", b" better than?"], A, Next.READ),
        ([Q, b""], A, Next.CLOSE),
        ([b"x" * 65], zen.TOO_LONG, Next.LINGER),
        ([Q + b"x" * 65], A + zen.TOO_LONG, Next.LINGER),
        ([b"Who?"], zen.UNKNOWN, Next.READ),
        ([b"half", b""], b"", Next.CLOSE),
    ],
)
def test_respond(chunks: list[bytes], out: bytes, nxt: Next) -> None:
    reader = QuestionReader(64)
    replies = [respond(reader, chunk) for chunk in chunks]
    assert b"".join(r.out for r in replies) == out
    assert replies[-1].next is nxt


def test_respond_paces_with_a_limit() -> None:
    reader = QuestionReader(64)
    first = respond(reader, Q * 5 + b"x" * 65, limit=2)
    assert first == Reply(A * 2, 2, Next.READ)
    second = respond_more(reader, limit=2)
    assert second == Reply(A * 2, 2, Next.READ)
    last = respond_more(reader, limit=2)
    assert last == Reply(A + zen.TOO_LONG, 1, Next.LINGER)


def test_after_names_what_follows() -> None:
    reader = QuestionReader(8)
    assert after(reader) is Next.READ
    reader.receive_data(b"")
    assert after(reader) is Next.CLOSE
    reader = QuestionReader(8)
    reader.feed(b"123456789")
    assert after(reader) is Next.LINGER


def test_progress_is_not_reset_per_byte() -> None:
    assert progress(5.0, 0, True, None) == 5.0  # a question began
    assert progress(6.0, 0, True, 5.0) == 5.0  # more bytes of it: the clock keeps running
    assert progress(7.0, 1, True, 5.0) == 7.0  # answered one, the next began in this read
    assert progress(7.0, 1, False, 5.0) is None  # nothing unfinished


@pytest.mark.parametrize(
    ("kwargs", "now", "reason"),
    [
        ({"started_at": None, "active": 0.0, "last_rx": 0.0}, 59.0, None),
        ({"started_at": None, "active": 0.0, "last_rx": 0.0}, 61.0, CloseReason.IDLE_TIMEOUT),
        ({"started_at": 0.0, "active": 0.0, "last_rx": 9.5}, 10.5, CloseReason.REQUEST_TIMEOUT),
        ({"started_at": 0.0, "active": 0.0, "last_rx": 9.5, "paused": True}, 10.5, None),
        ({"started_at": 0.0, "active": 0.0, "last_rx": 9.5, "paused": True}, 61.0, CloseReason.IDLE_TIMEOUT),
        ({"started_at": 0.0, "active": 0.0, "last_rx": 0.0, "lingering": True}, 0.9, None),
        ({"started_at": 0.0, "active": 0.0, "last_rx": 0.0, "lingering": True}, 1.1, CloseReason.TOO_LONG),
        ({"started_at": 0.0, "active": 0.0, "last_rx": 4.9, "lingering": True}, 5.1, CloseReason.TOO_LONG),
        ({"started_at": None, "active": 0.0, "last_rx": 0.0, "closing": True}, 61.0, CloseReason.IDLE_TIMEOUT),
    ],
)
def test_overdue(kwargs: dict[str, object], now: float, reason: CloseReason | None) -> None:
    assert overdue(LIMITS, now, **kwargs) == reason  # type: ignore[arg-type]


def test_conversation_slowloris_meets_the_request_deadline() -> None:
    conv = Conversation(LIMITS, now=0.0)
    for second in range(20):
        conv.receive(b"B", float(second))  # one byte a second, never a '?'
    when, reason = conv.deadline()
    assert (when, reason) == (10.0, CloseReason.REQUEST_TIMEOUT)
    assert conv.overdue(10.5) is CloseReason.REQUEST_TIMEOUT


def test_conversation_idle_and_whitespace() -> None:
    conv = Conversation(LIMITS, now=0.0)
    assert conv.receive(Q, 1.0).out == A
    assert conv.deadline() == (61.0, CloseReason.IDLE_TIMEOUT)
    conv.receive(b"\n\n", 30.0)  # whitespace is no progress
    assert conv.deadline() == (61.0, CloseReason.IDLE_TIMEOUT)


def test_conversation_lingers_after_too_long() -> None:
    conv = Conversation(LIMITS, now=0.0)
    reply = conv.receive(b"x" * 100, 2.0)
    assert reply.next is Next.LINGER
    assert reply.out == zen.TOO_LONG
    assert conv.deadline() == (3.0, CloseReason.TOO_LONG)
    assert not conv.discard(b"y" * 10, 2.5)
    assert conv.deadline() == (3.5, CloseReason.TOO_LONG)
    assert conv.discard(b"", 2.6)
    big = Conversation(Limits(max_question=4, linger_bytes=10), now=0.0)
    big.receive(b"12345", 0.0)
    assert big.discard(b"z" * 11, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "now", "reason"),
    [
        # A client that neither reads its answers nor sends: paused, a question held, idle for too long.
        ({"started_at": 0.0, "active": 0.0, "last_rx": 0.0, "paused": True}, 61.0, CloseReason.IDLE_TIMEOUT),
        # The idle clock also runs while a question does, should it be the shorter.
        ({"started_at": 0.0, "active": 0.0, "last_rx": 0.0}, 6.0, None),
    ],
)
def test_overdue_keeps_the_idle_clock_under_a_started_question(
    kwargs: dict[str, object], now: float, reason: CloseReason | None
) -> None:
    assert overdue(LIMITS, now, **kwargs) == reason  # type: ignore[arg-type]
    short_idle = Limits(request_timeout=10.0, idle_timeout=5.0)
    assert overdue(short_idle, 6.0, started_at=0.0, active=0.0, last_rx=0.0) is CloseReason.IDLE_TIMEOUT


def test_conversation_deadline_is_the_earlier_clock() -> None:
    conv = Conversation(Limits(request_timeout=10.0, idle_timeout=5.0), now=0.0)
    conv.receive(b"Beautiful", 1.0)
    assert conv.deadline() == (6.0, CloseReason.IDLE_TIMEOUT)
    assert conv.overdue(5.9) is None
    assert conv.overdue(6.1) is CloseReason.IDLE_TIMEOUT
