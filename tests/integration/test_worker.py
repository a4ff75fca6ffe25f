"""The production worker over real sockets, on uvloop and on asyncio's loop.

Every PROTOCOL.md rule, limits, timeouts, backpressure, drain.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from app.core import zen
from app.tools.client import ZenClient
from tests.conformance import CASES, Case, check_case, recv_exactly, recv_until_eof
from tests.integration.conftest import FAST, NATIVE, RunningWorker, run_worker

Q1, A1 = zen.PROBE_QUESTION, zen.PROBE_ANSWER


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_conformance(worker: RunningWorker, case: Case) -> None:
    check_case(worker.host, worker.port, case)


def test_every_answer_of_the_table(worker: RunningWorker) -> None:
    with ZenClient(worker.host, worker.port) as client:
        for question, answer in zen.APHORISMS.items():
            assert client.ask(question) == answer


def test_canonical_log_line_per_connection(worker: RunningWorker) -> None:
    with ZenClient(worker.host, worker.port) as client:
        assert client.ask_all([Q1, Q1, b"x?"]) == [A1, A1, zen.UNKNOWN]
        local = "{}:{}".format(*client.sock.getsockname())
    event = worker.log.wait_for("connection_closed", lambda e: e["peer"] == local)
    assert event["reason"] == "eof"
    assert event["answered"] == 3
    assert event["bytes_in"] == 2 * len(Q1) + 2
    assert event["bytes_out"] == 2 * len(A1) + len(zen.UNKNOWN)
    assert event["duration_ms"] >= 0


def test_a_connection_holds_a_reader_only_while_it_has_bytes(worker: RunningWorker) -> None:
    """Memory: between questions a connection borrows its worker's spare reader (connection.py)."""
    with ZenClient(worker.host, worker.port) as client:
        assert client.ask(Q1) == A1

        def readers() -> list[object]:
            return [c.reader for c in worker.worker.conns]

        assert worker.call(readers) == [None]
        client.send(Q1[:5])
        deadline = time.monotonic() + 5
        while worker.call(readers) == [None]:
            assert time.monotonic() < deadline, "the half question was never held"
            time.sleep(0.01)
        client.send(Q1[5:])
        assert client.read_answers(1) == [A1]
        assert worker.call(readers) == [None]


def test_reset_is_logged_as_reset(worker: RunningWorker) -> None:
    sock = socket.create_connection((worker.host, worker.port))
    sock.sendall(Q1)
    assert recv_exactly(sock, len(A1)) == A1
    local = "{}:{}".format(*sock.getsockname())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # SO_LINGER 0: the kernel sends RST
    event = worker.log.wait_for("connection_closed", lambda e: e["peer"] == local)
    assert event["reason"] == "reset"


def test_tcp_nodelay_on_accepted_connections(worker: RunningWorker) -> None:
    with ZenClient(worker.host, worker.port) as client:
        assert client.ask(Q1) == A1
        flags = worker.call(
            lambda: [
                c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                for c in worker.worker.conns
            ]
        )
    assert flags
    assert all(flags)


def test_size_limit_boundary(loop_name: str) -> None:
    with run_worker(FAST.replace(max_request_bytes=16), loop_name) as w:
        exact = b"x" * 15 + b"?"
        with ZenClient(w.host, w.port) as client:
            assert client.ask(exact) == zen.UNKNOWN
        with socket.create_connection((w.host, w.port), timeout=5) as sock:
            sock.sendall(b"y" * 16)  # 16 bytes and no '?': the question is at least 17
            assert recv_until_eof(sock) == zen.TOO_LONG
        event = w.log.wait_for("connection_closed", lambda e: e["reason"] == "too_long")
        assert "unfinished" not in event


def test_unfinished_question_at_eof_is_logged(worker: RunningWorker) -> None:
    with socket.create_connection((worker.host, worker.port), timeout=5) as sock:
        sock.sendall(b"Beautiful\n\x1b[31m")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    event = worker.log.wait_for("connection_closed", lambda e: "unfinished" in e)
    assert event["unfinished"] == "Beautiful\\n\\x1b[31m"  # escaped: cannot forge a log line


def test_request_timeout_counts_from_first_byte_not_per_byte(loop_name: str) -> None:
    with run_worker(FAST.replace(request_timeout=0.5), loop_name) as w:
        with socket.create_connection((w.host, w.port), timeout=5) as sock:
            start = time.monotonic()
            closed_after = None
            for byte in b"Beautiful is better than":  # one byte every 0.1 s: 2.4 s in all
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    closed_after = time.monotonic() - start
                    break
                sock.settimeout(0.1)
                try:
                    if sock.recv(100) == b"":
                        closed_after = time.monotonic() - start
                        break
                except TimeoutError:
                    pass
                except OSError:  # a byte sent after our close: the peer's reset
                    closed_after = time.monotonic() - start
                    break
            assert closed_after is not None, "a slow sender was never cut off"
            assert closed_after < 2.0
        event = w.log.wait_for("connection_closed", lambda e: e["reason"] == "request_timeout")
        assert event["unfinished"].startswith("Beaut")


def test_idle_timeout(loop_name: str) -> None:
    with run_worker(FAST.replace(idle_timeout=0.4), loop_name) as w:
        with socket.create_connection((w.host, w.port), timeout=5) as sock:
            sock.sendall(Q1)
            assert recv_exactly(sock, len(A1)) == A1
            start = time.monotonic()
            assert recv_until_eof(sock) == b""
            assert time.monotonic() - start >= 0.3
        w.log.wait_for("connection_closed", lambda e: e["reason"] == "idle_timeout")


def test_max_connections_pauses_accepting_then_resumes(loop_name: str) -> None:
    with run_worker(FAST.replace(max_connections=2), loop_name) as w:
        first, second = ZenClient(w.host, w.port), ZenClient(w.host, w.port, timeout=0.5)
        assert first.ask(Q1) == A1
        assert second.ask(Q1) == A1
        third = ZenClient(w.host, w.port, timeout=0.5)  # completes in the kernel's backlog
        third.send(Q1)
        with pytest.raises(TimeoutError):
            third.read_answers(1)
        w.log.wait_for("accept_paused")
        first.close()
        third.sock.settimeout(5)
        assert third.read_answers(1) == [A1]
        w.log.wait_for("accept_resumed")
        second.close()
        third.close()


def test_backpressure_bounds_unsent_answers(loop_name: str) -> None:
    """A client pipelining 10 MB without reading: reading pauses, nothing is lost."""
    settings = FAST.replace(max_unsent_bytes=16384, idle_timeout=30.0)
    with run_worker(settings, loop_name) as w:
        question = b"x?"  # 2 bytes in, 24 out: 10 MB in asks for 120 MB of answers
        count = 10_000_000 // len(question)
        sock = socket.create_connection((w.host, w.port), timeout=30)
        sent = threading.Event()

        def pump() -> None:
            sock.sendall(question * count)
            sent.set()

        sender = threading.Thread(target=pump, daemon=True)
        sender.start()
        assert not sent.wait(2.0), "the server read 10 MB although nobody read its answers"
        buffered = w.call(lambda: [c.transport.get_write_buffer_size() for c in w.worker.conns])
        assert buffered
        assert max(buffered) <= settings.max_unsent_bytes + 256 * len(zen.UNKNOWN)
        assert w.worker.stats.backpressure_pauses >= 1
        want = len(zen.UNKNOWN) * count
        got = dots = 0
        while got < want:
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed before every answer arrived"
            got += len(chunk)
            dots += chunk.count(b".")
        assert got == want
        assert dots == count
        assert sent.wait(10)
        sock.close()


def test_graceful_stop_finishes_question_in_progress(loop_name: str) -> None:
    with run_worker(FAST.replace(drain_quiet=0.3), loop_name) as w:
        busy = socket.create_connection((w.host, w.port), timeout=5)
        idle = socket.create_connection((w.host, w.port), timeout=5)
        busy.sendall(b"Beautiful is ")
        idle.sendall(Q1)
        assert recv_exactly(idle, len(A1)) == A1
        w.stop()
        w.log.wait_for("worker_draining")
        busy.sendall(b"better than?")
        assert recv_exactly(busy, len(A1)) == A1
        assert recv_until_eof(idle) == b""  # closed once quiet between questions
        assert recv_until_eof(busy) == b""
        w.log.wait_for("worker_stopped")
        with pytest.raises(OSError):
            socket.create_connection((w.host, w.port), timeout=1).close()
        busy.close()
        idle.close()
        reasons = [e["reason"] for e in w.log.events if e["event"] == "connection_closed"]
        assert reasons.count("shutdown") == 2


def test_accept_mode_follows_the_distance_to_the_cap() -> None:
    """libuv accepts while two headrooms fit below the cap; the worker's own loop near it; back again."""
    with run_worker(FAST.replace(max_connections=20)) as w:
        assert w.worker.acceptor.native is None  # 20 connections leave no room for two headrooms of 64
        w.worker.acceptor.headroom = 5  # own from 15 connections, libuv below 10
        w.call(w.worker.acceptor.switch_mode)
        assert w.worker.acceptor.native is not None
        clients = []
        for _ in range(20):
            client = ZenClient(w.host, w.port, timeout=5)
            assert client.ask(Q1) == A1
            clients.append(client)
        event = w.log.wait_for("accept_mode", lambda e: not e["native"] and e["connections"])
        assert event["connections"] == 15
        late = ZenClient(w.host, w.port, timeout=0.5)  # the 21st waits in the queue: the cap is exact
        late.send(Q1)
        with pytest.raises(TimeoutError):
            late.read_answers(1)
        for client in clients[:11]:
            client.close()
        late.sock.settimeout(5)
        assert late.read_answers(1) == [A1]
        w.log.wait_for("accept_mode", lambda e: e["native"] and e["connections"])
        assert w.call(lambda: w.worker.acceptor.native is not None)
        with ZenClient(w.host, w.port, timeout=5) as client:
            assert client.ask(Q1) == A1
        for client in [*clients[11:], late]:
            client.close()


def test_a_connection_over_the_cap_is_closed_and_logged() -> None:
    """The guard behind the headroom: a connection libuv accepted beyond the cap is closed, logged."""
    with run_worker(NATIVE) as w, ZenClient(w.host, w.port, timeout=5) as first:
        assert w.worker.acceptor.native is not None
        assert first.ask(Q1) == A1
        # Fault: the cap drops to what is open, as if libuv had run past it.
        w.call(lambda: setattr(w.worker, "settings", w.worker.settings.replace(max_connections=1)))
        sock = socket.create_connection((w.host, w.port), timeout=5)
        local = "{}:{}".format(*sock.getsockname())
        sock.sendall(Q1)
        with contextlib.suppress(ConnectionResetError):  # the unread question may turn the FIN into a reset
            assert recv_until_eof(sock) == b""
        sock.close()
        event = w.log.wait_for("connection_closed", lambda e: e["peer"] == local)
        assert event["reason"] == "over_capacity"
        assert event["answered"] == 0
        assert first.ask(Q1) == A1  # the others are served on
