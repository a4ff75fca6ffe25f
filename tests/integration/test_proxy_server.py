"""The worker behind a load balancer: PROXY headers over real sockets, trust, rejection, logs."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from app.core import proxy, zen
from app.server.connection import Connection, ProxiedConnection
from tests.conformance import recv_exactly, recv_until_eof
from tests.integration.conftest import FAST, RunningWorker, run_worker
from tests.server import start_server

Q1, A1 = b"Beautiful is better than?", b"Ugly."
Q2, A2 = b"Simple is better than?", b"Complex."
CLIENT = ("203.0.113.7", 40001)  # TEST-NET-3: only ever written into headers, never dialled
SERVER = ("198.51.100.1", 1060)
LOOPBACK = ("127.0.0.0/8",)


def proxied(mode: str = "v2", trusted: tuple[str, ...] = LOOPBACK, **changes: float) -> Iterator[RunningWorker]:
    with run_worker(FAST.replace(proxy_protocol=mode, proxy_trusted=trusted, **changes)) as running:
        yield running


@pytest.fixture
def v2_worker() -> Iterator[RunningWorker]:
    yield from proxied("v2")


@pytest.fixture
def any_worker() -> Iterator[RunningWorker]:
    yield from proxied("any")


def connect(worker: RunningWorker) -> socket.socket:
    sock = socket.create_connection((worker.host, worker.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def local_name(sock: socket.socket) -> str:
    return "{}:{}".format(*sock.getsockname())


def closed_event(worker: RunningWorker, sock: socket.socket) -> dict[str, object]:
    """The connection_closed line of the connection whose load-balancer side is ``sock`` (still open)."""
    name = local_name(sock)
    return worker.log.wait_for("connection_closed", lambda e: e.get("via") == name or e["peer"] == name)


def test_class_is_chosen_at_construction() -> None:
    with run_worker() as plain:
        assert plain.worker.connection_class is Connection
    with run_worker(FAST.replace(proxy_protocol="v1")) as v1:
        assert v1.worker.connection_class is ProxiedConnection


def test_v2_header_gives_the_client_address(v2_worker: RunningWorker) -> None:
    with connect(v2_worker) as sock:
        sock.sendall(proxy.v2_header(CLIENT, SERVER) + Q1)
        assert recv_exactly(sock, len(A1)) == A1
        sock.sendall(Q2)
        assert recv_exactly(sock, len(A2)) == A2
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
        event = closed_event(v2_worker, sock)
        assert event["via"] == local_name(sock)
    assert event["peer"] == "203.0.113.7:40001"
    assert event["reason"] == "eof"
    assert event["answered"] == 2
    assert event["bytes_in"] == 28 + len(Q1) + len(Q2)
    assert v2_worker.worker.stats.proxy_headers == {"PROXY": 1}


def test_v2_ipv6_client_and_crc32c(v2_worker: RunningWorker) -> None:
    with connect(v2_worker) as sock:
        sock.sendall(proxy.v2_header(("2001:db8::7", 5), ("2001:db8::1", 1060), crc=True) + Q1 + Q2)
        assert recv_exactly(sock, len(A1 + A2)) == A1 + A2
        sock.shutdown(socket.SHUT_WR)
        event = closed_event(v2_worker, sock)
    assert event["peer"] == "[2001:db8::7]:5"


def test_v2_local_header_of_health_checks_uses_the_real_peer(v2_worker: RunningWorker) -> None:
    with connect(v2_worker) as sock:
        sock.sendall(proxy.v2_header(None, None) + Q1)
        assert recv_exactly(sock, len(A1)) == A1
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
        event = v2_worker.log.wait_for("connection_closed", lambda e: e["peer"] == local_name(sock))
    assert event["reason"] == "eof"
    assert "via" not in event
    assert v2_worker.worker.stats.proxy_headers == {"LOCAL": 1}


def test_v1_and_v2_in_any_mode(any_worker: RunningWorker) -> None:
    for header in (proxy.v1_line(CLIENT, SERVER), proxy.v2_header(CLIENT, SERVER)):
        with connect(any_worker) as sock:
            sock.sendall(header + Q1)
            assert recv_exactly(sock, len(A1)) == A1
            sock.shutdown(socket.SHUT_WR)
            assert closed_event(any_worker, sock)["peer"] == "203.0.113.7:40001"


def test_header_and_questions_split_byte_by_byte(any_worker: RunningWorker) -> None:
    for header in (proxy.v1_line(CLIENT, SERVER), proxy.v2_header(CLIENT, SERVER, crc=True)):
        with connect(any_worker) as sock:
            for byte in header + Q1:
                sock.send(bytes([byte]))
            assert recv_exactly(sock, len(A1)) == A1
            sock.shutdown(socket.SHUT_WR)
            assert closed_event(any_worker, sock)["peer"] == "203.0.113.7:40001"


def test_missing_header_closes_without_an_answer(v2_worker: RunningWorker) -> None:
    with connect(v2_worker) as sock:
        sock.sendall(Q1)
        assert recv_until_eof(sock) == b""
        event = closed_event(v2_worker, sock)
    assert event["reason"] == "proxy_missing"
    assert "Beautiful" in str(event["proxy_error"])


def test_header_of_the_other_version_is_a_missing_header(v2_worker: RunningWorker) -> None:
    with connect(v2_worker) as sock:
        sock.sendall(proxy.v1_line(CLIENT, SERVER) + Q1)
        assert recv_until_eof(sock) == b""
        assert closed_event(v2_worker, sock)["reason"] == "proxy_missing"


@pytest.mark.parametrize(
    "header",
    [
        proxy.V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        proxy.V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # too short for IPv4
        proxy.v2_header(CLIENT, SERVER, crc=True)[:-1] + b"\x00",  # checksum wrong
        b"PROXY TCP4 203.0.113.7 198.51.100.1 040001 1060\r\n",  # leading zero (any mode reads v1)
    ],
)
def test_malformed_header_closes_and_is_logged(any_worker: RunningWorker, header: bytes) -> None:
    with connect(any_worker) as sock:
        sock.sendall(header + Q1)
        assert recv_until_eof(sock) == b""
        event = closed_event(any_worker, sock)
    assert event["reason"] == "proxy_invalid"
    assert event["proxy_error"]


def test_end_of_stream_inside_the_header(v2_worker: RunningWorker) -> None:
    with connect(v2_worker) as sock:
        sock.sendall(proxy.v2_header(CLIENT, SERVER)[:20])
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
        event = closed_event(v2_worker, sock)
    assert event["reason"] == "proxy_invalid"
    assert "unfinished" in event


def test_untrusted_peer_is_closed_even_with_a_valid_header() -> None:
    for running in proxied("v2", ("10.0.0.0/8", "192.168.0.0/16")):
        with connect(running) as sock:
            try:
                sock.sendall(proxy.v2_header(CLIENT, SERVER) + Q1)
            except ConnectionError:
                pass  # closed before our bytes arrived
            try:
                assert recv_until_eof(sock) == b""
            except ConnectionResetError:
                pass  # closed with our bytes unread: the kernel resets
            event = running.log.wait_for("connection_closed", lambda e: e["peer"] == local_name(sock))
        assert event["reason"] == "proxy_untrusted"
        assert event["answered"] == 0


def test_a_header_that_never_completes_times_out() -> None:
    for running in proxied("v2", request_timeout=0.5, idle_timeout=5.0):
        with connect(running) as sock:
            sock.sendall(proxy.V2_SIGNATURE)
            started = time.monotonic()
            assert recv_until_eof(sock) == b""
            assert time.monotonic() - started < 4.0
            assert closed_event(running, sock)["reason"] == "request_timeout"


def test_connect_and_close_without_bytes_is_a_plain_eof(v2_worker: RunningWorker) -> None:
    # HAProxy's plain TCP checks (no check-send-proxy) connect and close.
    with connect(v2_worker) as sock:
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
        assert v2_worker.log.wait_for("connection_closed", lambda e: e["peer"] == local_name(sock))["reason"] == "eof"


def test_too_long_after_a_header_still_answers_and_closes(v2_worker: RunningWorker) -> None:
    with connect(v2_worker) as sock:
        sock.sendall(proxy.v2_header(CLIENT, SERVER) + b"x" * (FAST.max_request_bytes + 10))
        assert recv_until_eof(sock) == zen.TOO_LONG
        assert closed_event(v2_worker, sock)["reason"] == "too_long"


def test_python_m_app_reads_proxy_settings() -> None:
    env = {"PROXY_PROTOCOL": "v1", "PROXY_TRUSTED": "127.0.0.1/32", "WORKERS": "1"}
    with start_server(env) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(proxy.v1_line(("192.0.2.9", 7), ("192.0.2.1", 1060)) + Q1)
            assert recv_exactly(sock, len(A1)) == A1
        event = server.wait_event("connection_closed")
    assert event["peer"] == "192.0.2.9:7"
    assert event["via"].startswith("127.0.0.1:")
