"""Every server closes where production's policy says, however it waits (app.core.policy).

One server process per architecture (module-scoped) with short timeouts;
each test is one client over a real socket on 127.0.0.1 that measures when
the server closes: a slowloris at the request deadline although its bytes
keep arriving, an idle client at the idle deadline, and after a too-long
question the answer intact, then the close at the lingering bounds.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest

from app.core import policy, zen
from app.lab import SERVERS
from app.tools.process import RunningServer, running_server
from tests.conformance import recv_exactly

REQUEST = 1.0
IDLE = 2.5
MAX = 1024
#: How late a close may be seen: a sweep's tick (the lab's 0.5 s), and a loaded machine.
SLACK = 1.0
#: A client's pace: each trickled byte comes long before any quiet bound.
PACE = 0.3
ENV = {
    "REQUEST_TIMEOUT": str(REQUEST),
    "IDLE_TIMEOUT": str(IDLE),
    "MAX_REQUEST_BYTES": str(MAX),
    "WORKERS": "2",
    "LAB_POOL_SIZE": "4",
}
Q, A = b"Beautiful is better than?", b"Ugly."


@pytest.fixture(scope="module", params=[s.name for s in SERVERS])
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    with running_server(request.param, env=ENV) as running:
        yield running


def _connect(server: RunningServer) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=IDLE + 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _closed_within(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed (EOF or reset) within ``timeout``; it must send nothing."""
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        return False
    try:
        data = sock.recv(64)
    except ConnectionResetError:
        return True
    assert data == b"", f"unexpected bytes {data!r}"
    return True


def _trickle_until_closed(
    sock: socket.socket, byte: bytes, bound: float, *, fin_seen: bool = False
) -> tuple[float, int]:
    """Send ``byte`` every PACE seconds until the server closes; (seconds it took, bytes sent).

    ``fin_seen``: the server has half-closed already, so only a failed send tells its close.
    """
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < bound:
        try:
            sock.send(byte)
        except OSError:  # the server closed, and answered our last byte with a reset
            break
        sent += 1
        if fin_seen:
            time.sleep(PACE)
        elif _closed_within(sock, PACE):
            break
    else:
        pytest.fail(f"still open after {bound} s, {sent} bytes sent")
    return time.monotonic() - start, sent


def test_a_slowloris_is_closed_at_the_request_deadline(server: RunningServer) -> None:
    with _connect(server) as sock:
        sock.sendall(Q)
        assert recv_exactly(sock, len(A)) == A  # served (single and the pools serve one at a time)
        elapsed, sent = _trickle_until_closed(sock, b"B", REQUEST + 3 * SLACK)  # never a '?'
    assert sent >= 3, "bytes kept arriving"
    assert REQUEST - 0.1 <= elapsed <= REQUEST + SLACK


def test_a_silent_client_is_closed_at_the_idle_deadline(server: RunningServer) -> None:
    with _connect(server) as sock:
        start = time.monotonic()
        assert _closed_within(sock, IDLE + 3 * SLACK), "a silent client was never closed"
        elapsed = time.monotonic() - start
    assert IDLE - 0.1 <= elapsed <= IDLE + SLACK


def test_whitespace_after_an_answer_is_no_progress(server: RunningServer) -> None:
    with _connect(server) as sock:
        sock.sendall(Q)
        assert recv_exactly(sock, len(A)) == A
        elapsed, sent = _trickle_until_closed(sock, b"\n", IDLE + 3 * SLACK)
    assert sent >= 3
    assert IDLE - 0.1 <= elapsed <= IDLE + SLACK


def _too_long(sock: socket.socket) -> bytes:
    """Send a question over MAX without a '?'; the server's every byte until its FIN."""
    sock.sendall(b"x" * (2 * MAX))
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_too_long_is_answered_and_lingers_while_the_client_keeps_sending(server: RunningServer) -> None:
    with _connect(server) as sock:
        assert _too_long(sock) == zen.TOO_LONG, "the answer and the FIN, although more is on its way"
        elapsed, sent = _trickle_until_closed(sock, b"x", policy.LINGER_MAX + 3 * SLACK, fin_seen=True)
    assert sent >= 3, "the lingering server took the client's bytes"
    # Never quiet for LINGER_QUIET, far below LINGER_BYTES: closed at LINGER_MAX
    # (seen up to two paced sends late: the first draws the reset, the second fails).
    assert policy.LINGER_MAX - 0.5 <= elapsed <= policy.LINGER_MAX + SLACK + 2 * PACE


def test_too_long_then_quiet_closes_after_the_quiet_bound(server: RunningServer) -> None:
    with _connect(server) as sock:
        assert _too_long(sock) == zen.TOO_LONG
        time.sleep(policy.LINGER_QUIET + SLACK)  # a measured pause: the bound under test
        assert _send_fails(sock), "still lingering after LINGER_QUIET without a byte"


def _send_fails(sock: socket.socket) -> bool:
    """True if the server has closed: the first byte draws a reset, the second send fails."""
    try:
        for _ in range(2):
            sock.send(b"x")
            time.sleep(0.1)
    except OSError:  # BrokenPipeError or ConnectionResetError
        return True
    return False
