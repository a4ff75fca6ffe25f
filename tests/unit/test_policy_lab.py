"""The policy's backpressure rules (app.core.policy), for servers that pause reading (the lab's poll and asyncio)."""

from __future__ import annotations

from app.core.policy import CloseReason, Conversation, Limits, resume

LIMITS = Limits(max_question=64, request_timeout=10.0, idle_timeout=60.0, linger_quiet=1.0, linger_max=5.0)
Q = b"Beautiful is better than?"


def test_a_paused_question_is_judged_by_the_idle_clock_only() -> None:
    conv = Conversation(LIMITS, now=0.0)
    conv.receive(Q + b"Beauti", 1.0)  # answered one, the next began
    assert conv.overdue(12.0) is CloseReason.REQUEST_TIMEOUT
    assert conv.overdue(12.0, paused=False) is CloseReason.REQUEST_TIMEOUT
    assert conv.overdue(12.0, paused=True) is None  # the wait is the server's
    assert conv.overdue(61.5, paused=True) is CloseReason.IDLE_TIMEOUT  # a client that never reads


def test_lingering_is_not_paused() -> None:
    conv = Conversation(LIMITS, now=0.0)
    conv.receive(b"x" * 100, 0.0)
    assert conv.overdue(1.5, paused=True) is CloseReason.TOO_LONG


def test_resume_restarts_the_request_clock_only() -> None:
    conv = Conversation(LIMITS, now=0.0)
    conv.receive(Q + b"Beauti", 1.0)
    resume(conv, 8.0)
    assert conv.deadline() == (18.0, CloseReason.REQUEST_TIMEOUT)
    idle = Conversation(LIMITS, now=0.0)
    idle.receive(Q, 1.0)
    resume(idle, 8.0)
    assert idle.deadline() == (61.0, CloseReason.IDLE_TIMEOUT)  # no question: the idle clock is progress's
    linger = Conversation(LIMITS, now=0.0)
    linger.receive(b"x" * 100, 2.0)
    resume(linger, 2.5)
    assert linger.deadline() == (3.5, CloseReason.TOO_LONG)  # the lingering clock keeps its start
