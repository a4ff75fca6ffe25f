"""The measuring instrument measured: the load generator counts each kind of failure it claims to.

"Nothing lost" means something only if the load generator would have seen
a loss.  A small misbehaving server (one thread per connection, on
127.0.0.1) answers wrongly, closes with a question outstanding, resets,
closes politely between questions, or is not there at all; each must land
in its own counter.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
from collections.abc import Iterator

import pytest

from app.core import zen
from app.core.protocol import QuestionReader
from tests.server import free_port

from .load import LoadGenerator, Tally

pytestmark = pytest.mark.slow

#: The "DRAIN_QUIET" of the misbehaving server; the persistent clients pause 2.5 times this now and then.
QUIET = 0.05


class _Misbehaving(socketserver.BaseRequestHandler):
    """Answers correctly, except as ``server.mode`` says.

    wrong / eof / reset: on every 5th question of a connection, answer
    wrongly, close with it outstanding, or reset.  close_between: close once
    the client has been quiet for a while after its answers.
    """

    def handle(self) -> None:
        mode = self.server.mode  # type: ignore[attr-defined]
        reader = QuestionReader()
        asked = 0
        while data := self.request.recv(4096):
            reader.receive_data(data)
            for question in reader.next_questions():
                asked += 1
                if asked % 5 == 0 and mode in ("wrong", "eof", "reset"):
                    self._misbehave(mode)
                    return
                self.request.sendall(zen.answer(question))
            if mode == "close_between" and self._quiet_for(QUIET * 2):
                return  # a polite close: between questions, after a quiet spell (as a draining worker does)

    def _quiet_for(self, seconds: float) -> bool:
        """True when nothing arrives within ``seconds`` (peeked, not consumed)."""
        self.request.settimeout(seconds)
        try:
            return not self.request.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return True
        finally:
            self.request.settimeout(None)

    def _misbehave(self, mode: str) -> None:
        if mode == "wrong":
            self.request.sendall(b"Wrong.")
        elif mode == "reset":
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # "eof": return, and the handler closes with the question outstanding


@contextlib.contextmanager
def misbehaving_server(mode: str) -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Misbehaving)
    server.daemon_threads = True
    server.mode = mode  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        server.server_close()


def _run(addr: tuple[str, int], churn: int, persistent: int, answered: int) -> Tally:
    load = LoadGenerator(addr, churn=churn, persistent=persistent, answer_timeout=3, quiet=QUIET)
    load.start()
    try:
        load.wait_answered(answered)
    finally:
        tally = load.stop()
    return tally


def test_a_good_server_gives_zero_failures() -> None:
    with misbehaving_server("good") as addr:
        tally = _run(addr, 2, 2, 300)
    assert tally.failures == []
    assert tally.answered >= 300


@pytest.mark.parametrize("mode", ["wrong", "eof", "reset"])
def test_each_failure_is_counted_as_what_it_is(mode: str) -> None:
    with misbehaving_server(mode) as addr:
        tally = _run(addr, 0, 3, 100)  # persistent clients reach a 5th question
    kinds = tally.kinds()
    assert kinds, f"{mode}: no failure counted"
    expected = {"wrong": {"wrong"}, "eof": {"eof"}, "reset": {"reset", "eof"}}[mode]
    assert set(kinds) <= expected, kinds
    assert all(f.local_port for f in tally.failures)


def test_a_close_between_questions_is_not_a_failure() -> None:
    with misbehaving_server("close_between") as addr:
        tally = _run(addr, 0, 3, 100)
    assert tally.failures == [], tally.summary()
    assert tally.server_closes > 0


def test_a_refused_connect_is_a_failure_unless_the_server_is_down() -> None:
    addr = ("127.0.0.1", free_port())  # nothing listens there
    load = LoadGenerator(addr, churn=1, persistent=1)
    load.start()
    try:
        load.wait_for_failures(2)
        load.mark_down()
        before = len(load.tally.failures)
        load.wait_for_down_refusals(2)
    finally:
        tally = load.stop()
    assert set(tally.kinds()) == {"refused"}
    assert len(tally.failures) <= before + 2  # at most the connects already in flight at mark_down()
