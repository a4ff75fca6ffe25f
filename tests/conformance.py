"""docs/protocol.md's conformance table, runnable against any server on (host, port).

Every server of the project (the production worker and every architecture in
``app.lab``) must pass every case in :data:`CASES` through
:func:`check_case`, over real sockets.

Note for servers: after ``Error: request too long.`` the server must still
deliver that answer although the client keeps sending; closing a socket
with unread input makes Linux send a reset that can destroy the answer, so
write it, shut down the sending side, read and discard until EOF (or a short
linger deadline), then close (nginx's "lingering close").
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from app.core import zen

Q1, Q2, Q3 = b"Beautiful is better than?", b"Explicit is better than?", b"Simple is better than?"
A1, A2, A3 = b"Ugly.", b"Implicit.", b"Complex."


@dataclass(frozen=True)
class Step:
    """Send ``send`` (in pieces of ``split`` bytes when non-zero), then expect exactly ``expect``."""

    send: bytes
    expect: bytes = b""
    split: int = 0


@dataclass(frozen=True)
class Case:
    """One row of the table: steps, then optionally a half-close and the server's EOF."""

    id: str
    steps: tuple[Step, ...]
    half_close: bool = False
    expect_eof: bool = False


CASES: tuple[Case, ...] = (
    Case("one-question", (Step(Q1, A1),)),
    Case("three-in-one-segment", (Step(Q1 + Q2 + Q3, A1 + A2 + A3),)),
    Case("one-byte-at-a-time", (Step(Q2, A2, split=1),)),
    Case("answer-before-rest", (Step(Q1 + b"Simp", A1), Step(b"le is better than?", A3))),
    Case("binary-unknown", (Step(b"\x00\x01?\xff\xfe?", zen.UNKNOWN * 2), Step(Q3, A3))),
    Case("leading-crlf", (Step(b"\r\n" + Q3, A3),)),
    Case("line-typing", (Step(b"Beautiful is better than?\n", A1), Step(b"  \tSimple is better than?\r\n", A3))),
    Case("unknown-keeps-connection", (Step(b"What is better than?", zen.UNKNOWN), Step(Q1, A1))),
    Case("one-mib-no-question-mark", (Step(b"x" * (1 << 20), zen.TOO_LONG),), expect_eof=True),
    Case("question-then-half-close", (Step(Q1, A1),), half_close=True, expect_eof=True),
    Case("pipelined-then-half-close", (Step(Q1 + Q2 + Q3),), half_close=True, expect_eof=True),
    Case("unfinished-at-eof", (Step(b"Beautiful is bet"),), half_close=True, expect_eof=True),
)

#: What each half-closed case must receive in total before EOF.
_EOF_EXPECT = {"pipelined-then-half-close": A1 + A2 + A3}

BIG_SEND = 1 << 16  # above this, send from a thread while reading (the server may answer first)


def _send(sock: socket.socket, step: Step) -> threading.Thread | None:
    if len(step.send) > BIG_SEND:

        def pump() -> None:
            try:
                sock.sendall(step.send)
            except OSError:
                pass  # the server may close once it has answered

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread
    if step.split:
        for i in range(0, len(step.send), step.split):
            sock.sendall(step.send[i : i + step.split])
            time.sleep(0.001)  # pacing, so the pieces leave as separate segments
    else:
        sock.sendall(step.send)
    return None


class Receiver(Protocol):
    """Anything with a socket's ``recv``: a socket, or test_tls's stream over a TLS object."""

    def recv(self, bufsize: int, /) -> bytes: ...


def recv_exactly(sock: Receiver, count: int) -> bytes:
    """Read ``count`` bytes (fewer only if the server closes first)."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recv_until_eof(sock: Receiver, limit: int = 1 << 20) -> bytes:
    """Read until the server closes; raises on timeout."""
    data = b""
    while len(data) <= limit:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"server sent more than {limit} bytes without closing")


def check_case(host: str, port: int, case: Case, *, timeout: float = 10.0) -> None:
    """Run ``case`` against the server; raise ``AssertionError`` on any deviation."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threads = []
        for step in case.steps:
            thread = _send(sock, step)
            if thread is not None:
                threads.append(thread)
            got = recv_exactly(sock, len(step.expect))
            assert got == step.expect, f"{case.id}: expected {step.expect!r}, got {got!r}"
        if case.half_close:
            sock.shutdown(socket.SHUT_WR)
        if case.expect_eof:
            rest = recv_until_eof(sock)
            want = _EOF_EXPECT.get(case.id, b"")
            assert rest == want, f"{case.id}: expected {want!r} then EOF, got {rest!r}"
        for thread in threads:
            thread.join(timeout)
