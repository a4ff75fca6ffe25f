"""The per-connection policy: what to send, which deadline applies, when to linger or close.

Owns: the rules every server of the project applies to one connection, as
functions of bytes and of times handed in: answering what a read completed
(:func:`respond`), the two clocks (a started question has
``request_timeout`` from its first byte, never reset per byte; a connection
with no question started has ``idle_timeout`` from its last progress), the
lingering close after ``Error: request too long.`` (answer, half-close,
discard input until the client is done, a quiet spell or a bound), and the
reasons a connection closes (:class:`CloseReason`, the ``reason`` field of
every ``connection_closed`` line).

Never: reads a clock, touches a socket or a loop.  The production
connection (``app.server.connection``) keeps these clocks in its own slots,
for memory; the lab servers keep them in a :class:`Conversation`.  Both call
the functions below, so the lab differs from production only in how it
waits for bytes, which is what the lab is there to show.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, NamedTuple

from app.core import zen
from app.core.protocol import DEFAULT_MAX_QUESTION, QuestionReader

#: After "request too long" the answer must survive although the client may
#: still be sending: closing with unread input makes Linux send a reset that
#: destroys the answer in flight.  So the server half-closes and discards
#: input until EOF, LINGER_QUIET seconds without a byte, LINGER_MAX seconds
#: in all, or LINGER_BYTES discarded (nginx's lingering_timeout/_time).
LINGER_QUIET: Final = 1.0
LINGER_MAX: Final = 5.0
LINGER_BYTES: Final = 4 << 20


class CloseReason(enum.StrEnum):
    """Why a connection closed: the ``reason`` of its ``connection_closed`` line."""

    EOF = "eof"  #: the client closed its side and every answer was sent
    RESET = "reset"  #: the client reset the connection
    TOO_LONG = "too_long"  #: a question over MAX_REQUEST_BYTES (after the lingering close)
    REQUEST_TIMEOUT = "request_timeout"  #: a started question did not complete in time
    IDLE_TIMEOUT = "idle_timeout"  #: no question started for too long, or a close that stalled
    SHUTDOWN = "shutdown"  #: closed by a graceful stop (quiet between questions) or at its deadline
    OVER_CAPACITY = "over_capacity"  #: accepted beyond MAX_CONNECTIONS (never served)
    PROXY_UNTRUSTED = "proxy_untrusted"  #: PROXY protocol on, peer not in PROXY_TRUSTED
    PROXY_MISSING = "proxy_missing"  #: PROXY protocol on, the connection did not start with a header
    PROXY_INVALID = "proxy_invalid"  #: PROXY protocol on, a malformed or cut header
    TLS_ERROR = "tls_error"  #: TLS on, a failed handshake or record (field ``tls_error``: the SSL error)


class Next(enum.Enum):
    """What a server does once it has sent what :func:`respond` returned."""

    READ = "read"  #: wait for more bytes
    LINGER = "linger"  #: half-close, then discard input (see LINGER_QUIET)
    CLOSE = "close"  #: close: the client is done and everything is answered


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds of one connection (built from the settings by each server)."""

    max_question: int = DEFAULT_MAX_QUESTION
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    linger_quiet: float = LINGER_QUIET
    linger_max: float = LINGER_MAX
    linger_bytes: int = LINGER_BYTES


class Reply(NamedTuple):
    """The outcome of one :func:`respond`: bytes to send, how many answers they hold, what next."""

    out: bytes
    answered: int
    next: Next


def respond(reader: QuestionReader, data: bytes, limit: int = 1 << 30) -> Reply:
    """Take ``data`` in (``b""``: end of stream) and answer up to ``limit`` complete questions.

    ``out`` ends with ``Error: request too long.`` when a question is over
    the limit; :attr:`Reply.next` says whether to read on, linger or close.
    When ``limit`` answers leave complete questions held (a caller pacing
    its writes for backpressure), ``next`` is READ and :func:`respond_more`
    takes the rest.
    """
    questions = reader.feed(data, limit) if data else _eof_questions(reader, limit)
    return _reply(reader, questions, limit)


def respond_more(reader: QuestionReader, limit: int = 1 << 30) -> Reply:
    """Answer up to ``limit`` more complete questions already held (after a pause in writing)."""
    return _reply(reader, reader.next_questions(limit), limit)


def _eof_questions(reader: QuestionReader, limit: int) -> list[bytes]:
    reader.receive_data(b"")
    return reader.next_questions(limit)


def _reply(reader: QuestionReader, questions: list[bytes], limit: int) -> Reply:
    out = zen.answers(questions) if questions else b""
    if len(questions) >= limit and reader.has_complete:
        return Reply(out, len(questions), Next.READ)  # more to answer: the caller paces
    nxt = after(reader)
    if nxt is Next.LINGER:
        out += zen.TOO_LONG
    return Reply(out, len(questions), nxt)


def after(reader: QuestionReader) -> Next:
    """What follows once every complete question is answered (the too-long answer not sent yet)."""
    if reader.too_long:
        return Next.LINGER
    if reader.eof:
        return Next.CLOSE
    return Next.READ


def progress(now: float, answered: int, partial: bool, started_at: float | None) -> float | None:
    """The request clock after a read: when the unfinished question began, or None.

    A question left unfinished began in this read if answers went out (they
    ended the one before it), else it began when it first did; with nothing
    unfinished there is no request clock.  Whitespace alone is not a
    question (the reader skips it), so it never starts the clock, and more
    bytes of the same question never restart it: a slowloris sending one
    byte a second is closed at ``request_timeout``.
    """
    if not partial:
        return None
    if answered or started_at is None:
        return now
    return started_at


def overdue(
    limits: Limits,
    now: float,
    *,
    started_at: float | None,
    active: float,
    last_rx: float,
    lingering: bool = False,
    closing: bool = False,
    paused: bool = False,
) -> CloseReason | None:
    """The reason to close a connection whose clock has run out at ``now``, or None.

    ``started_at``: when the unfinished question began (the lingering
    close's start while lingering); ``active``: the last progress (answers,
    or bytes of a question); ``last_rx``: the last byte received at all.  A
    connection whose answers wait on a client that does not read
    (``paused``) is not blamed for the question it cannot finish, but it
    still has ``idle_timeout`` from its last progress (so a client that
    neither reads nor sends cannot hold it for ever); the idle clock also
    applies while a question runs, in case ``idle_timeout`` is the shorter;
    a close that does not complete is dropped after ``idle_timeout``.
    """
    if lingering:
        assert started_at is not None
        if now - last_rx > limits.linger_quiet or now - started_at > limits.linger_max:
            return CloseReason.TOO_LONG
        return None
    if closing:
        return CloseReason.IDLE_TIMEOUT if now - last_rx > limits.idle_timeout else None
    if started_at is not None and not paused and now - started_at > limits.request_timeout:
        return CloseReason.REQUEST_TIMEOUT
    return CloseReason.IDLE_TIMEOUT if now - active > limits.idle_timeout else None


class Conversation:
    """One connection's state in one object, for servers that can afford it (the lab).

    Feed it what ``recv()`` returned with the time of the read; it says what
    to send and what next, and :meth:`deadline` says until when the server
    may wait for the next byte and why it closes then.
    """

    __slots__ = ("active", "discarded", "last_rx", "limits", "lingering", "reader", "started_at")

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.reader = QuestionReader(limits.max_question)
        self.started_at: float | None = None
        self.active = self.last_rx = now
        self.lingering = False
        self.discarded = 0

    def receive(self, data: bytes, now: float) -> Reply:
        """Take one read's bytes (``b""``: end of stream); the reply to send."""
        self.last_rx = now
        reply = respond(self.reader, data)
        partial = self.reader.started
        if reply.answered or partial:
            self.active = now
        self.started_at = progress(now, reply.answered, partial, self.started_at)
        if reply.next is Next.LINGER:
            self.lingering = True
            self.started_at = now  # now the lingering clock
        return reply

    def discard(self, data: bytes, now: float) -> bool:
        """While lingering: drop ``data``; True when the lingering close is over."""
        self.last_rx = now
        self.discarded += len(data)
        return not data or self.discarded > self.limits.linger_bytes

    def deadline(self) -> tuple[float, CloseReason]:
        """When the connection's clock runs out, and the reason it closes then."""
        limits = self.limits
        if self.lingering:
            assert self.started_at is not None
            quiet = self.last_rx + limits.linger_quiet
            return min(quiet, self.started_at + limits.linger_max), CloseReason.TOO_LONG
        idle = self.active + limits.idle_timeout
        if self.started_at is not None:
            request = self.started_at + limits.request_timeout
            if request <= idle:  # (the usual case: request_timeout is the shorter)
                return request, CloseReason.REQUEST_TIMEOUT
        return idle, CloseReason.IDLE_TIMEOUT

    def overdue(self, now: float, *, paused: bool = False) -> CloseReason | None:
        """The reason to close at ``now``, or None (the same rule as the production sweep).

        ``paused``: reading is paused because the client does not read its
        answers; the unfinished question then waits on the server, so only
        the idle clock runs (a client that never reads is still closed).
        """
        return overdue(
            self.limits,
            now,
            started_at=self.started_at,
            active=self.active,
            last_rx=self.last_rx,
            lingering=self.lingering,
            paused=paused,
        )


def resume(conv: Conversation, now: float) -> None:
    """Reading resumes after a backpressure pause: the wait was the server's, so the request clock restarts."""
    conv.last_rx = now
    if conv.started_at is not None and not conv.lingering:
        conv.started_at = now
