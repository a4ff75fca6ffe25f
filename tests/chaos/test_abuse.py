"""Abusive clients against the real server while a well-behaved client keeps asking.

Each attack runs with a good client (one churn + one persistent
connection, :class:`LoadGenerator`) alongside; the test asserts the good
client lost nothing and stayed fast, and that the server's memory (master
plus workers, RSS) stayed bounded.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app.core import zen

from .load import LoadGenerator, Tally
from .server import Server, open_server, raise_nofile

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: A good client's answer must come within this, whatever the attack (generous: CI machines are noisy).
GOOD_MAX_LATENCY = 3.0
#: The chaos server's timeouts (server.CHAOS_ENV), and the sweep's tick at most one second late.
REQUEST_TIMEOUT = 3.0
IDLE_TIMEOUT = 5.0
TICK = 1.0
QUESTION = b"Beautiful is better than?"
TCP_REPAIR = 19  # linux/tcp.h: close without FIN or RST (CRIU); needs CAP_NET_ADMIN


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with open_server() as srv:
        yield srv


@contextlib.contextmanager
def good_client(server: Server, min_answered: int = 20) -> Iterator[LoadGenerator]:
    """A well-behaved client throughout the block; fails if it lost anything or waited too long."""
    load = LoadGenerator(server.addr, churn=1, persistent=1, answer_timeout=10.0)
    load.start()
    try:
        load.wait_answered(min_answered)
        yield load
        load.wait_answered(min_answered)
    finally:
        tally = load.stop()
    assert tally.failures == [], tally.summary()
    assert max(tally.latencies) < GOOD_MAX_LATENCY, tally.summary()


def _summary(tally: Tally) -> dict[str, Any]:
    return {
        "good_answered": tally.answered,
        "good_p99_ms": round(tally.percentile(0.99) * 1000, 1),
        "good_max_ms": round(max(tally.latencies) * 1000, 1),
    }


def _recv_all(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Read until EOF; (bytes, how it ended: eof | reset | timeout)."""
    sock.settimeout(timeout)
    got = b""
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return got, "timeout"
        except ConnectionResetError:
            return got, "reset"
        if not data:
            return got, "eof"
        got += data


# -- sizes -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [MiB, 100 * MiB], ids=["1MiB", "100MiB"])
def test_no_question_mark_is_cut_at_the_limit(server: Server, size: int, figures: dict[str, Any]) -> None:
    chunk = b"x" * MiB
    sent = [0]
    with good_client(server) as load, server.peak_rss() as peak:
        base = server.rss()
        sock = socket.create_connection(server.addr)

        def send() -> None:
            try:
                for _ in range(size // MiB):
                    sock.sendall(chunk)
                    sent[0] += len(chunk)
            except OSError:
                pass  # the server may end the lingering close before we are done

        sender = threading.Thread(target=send)
        sender.start()
        got, how = _recv_all(sock, 30)
        sender.join(30)
        sock.close()
    assert got == zen.TOO_LONG, (got[:100], how)
    closed = server.wait_event("connection_closed", reason="too_long", bytes_out=len(zen.TOO_LONG))
    grew = peak[0] - base
    figures[f"no_question_{size // MiB}MiB"] = {
        "client_sent_MiB": round(sent[0] / MiB, 1),
        "server_rss_growth_MiB": round(grew / MiB, 1),
        **_summary(load.tally),
    }
    assert closed
    assert grew < 16 * MiB, f"server RSS grew {grew / MiB:.1f} MiB"
    server.assert_clean_log()


def test_whitespace_flood_is_never_buffered(server: Server, figures: dict[str, Any]) -> None:
    """100 MiB of newlines before a question: skipped as it arrives, then the question is answered."""
    chunk = b"\r\n \t" * (MiB // 4)
    with good_client(server), server.peak_rss() as peak:
        base = server.rss()
        with socket.create_connection(server.addr) as sock:
            for _ in range(100):
                sock.sendall(chunk)
            sock.sendall(QUESTION)
            sock.shutdown(socket.SHUT_WR)
            got, how = _recv_all(sock, 30)
    assert (got, how) == (b"Ugly.", "eof")
    grew = peak[0] - base
    figures["whitespace_100MiB"] = {"server_rss_growth_MiB": round(grew / MiB, 1)}
    assert grew < 16 * MiB


# -- a client that never reads -------------------------------------------------------


def test_pipeliner_that_never_reads_is_paused_not_buffered(figures: dict[str, Any]) -> None:
    """10 s of pipelined questions, answers never read: the server stops reading (PROTOCOL rule 7)."""
    burst = QUESTION * 4096  # 100 KiB
    with open_server({"IDLE_TIMEOUT": "30"}) as server, good_client(server) as load:
        base = server.rss()
        sock = socket.create_connection(server.addr)
        sock.setblocking(False)
        sent = 0
        with server.peak_rss() as peak:
            end = time.monotonic() + 10
            while (left := end - time.monotonic()) > 0:
                _, writable, _ = select.select([], [sock], [], min(left, 0.2))
                if writable:
                    with contextlib.suppress(BlockingIOError):
                        sent += sock.send(burst)
        sock.close()
        closed = server.wait_for("the pipeliner's close", lambda: _biggest_close(server, MiB))
        grew = peak[0] - base
        server.assert_clean_log()
    figures["never_reads_10s"] = {
        "client_sent_MiB": round(sent / MiB, 1),
        "server_read_MiB": round(closed["bytes_in"] / MiB, 1),
        "answered_before_pause": closed["answered"],
        "server_rss_growth_MiB": round(grew / MiB, 1),
        **_summary(load.tally),
    }
    assert sent < 64 * MiB, "the server kept reading from a client that never reads"
    assert grew < 32 * MiB, f"server RSS grew {grew / MiB:.1f} MiB"


def _biggest_close(server: Server, at_least: int) -> dict[str, Any] | None:
    closes = server.log.named("connection_closed")
    biggest = max(closes, key=lambda e: int(e["bytes_in"]), default=None)
    return biggest if biggest is not None and biggest["bytes_in"] >= at_least else None


# -- slow clients ---------------------------------------------------------------------


def _slowloris(server: Server, count: int, byte: bytes, every: float, limit: float) -> tuple[float, int]:
    """``count`` connections each sending ``byte`` every ``every`` s; (seconds until the server closed all, open)."""
    socks = [socket.create_connection(server.addr) for _ in range(count)]
    start = time.monotonic()
    alive = list(socks)
    try:
        while alive and time.monotonic() - start < limit:
            for sock in alive:
                with contextlib.suppress(OSError):
                    sock.send(byte)
            deadline = time.monotonic() + every
            while alive and (left := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select(alive, [], [], left)
                for sock in readable:
                    with contextlib.suppress(OSError):
                        sock.recv(4096)  # EOF (or reset): the server closed it
                    alive.remove(sock)
        return time.monotonic() - start, len(alive)
    finally:
        for sock in socks:
            sock.close()


def test_slowloris_is_cut_by_the_request_timeout(server: Server, figures: dict[str, Any]) -> None:
    with good_client(server) as load, server.peak_rss() as peak:
        base = server.rss()
        took, left = _slowloris(server, 300, b"B", every=2.0, limit=REQUEST_TIMEOUT + 4 * TICK)
    grew = peak[0] - base
    figures["slowloris_300"] = {
        "closed_after_s": round(took, 2),
        "left_open": left,
        "server_rss_growth_MiB": round(grew / MiB, 1),
        **_summary(load.tally),
    }
    assert grew < 16 * MiB
    assert left == 0
    assert took <= REQUEST_TIMEOUT + 2 * TICK
    assert len(server.log.named("connection_closed", reason="request_timeout")) >= 300


def test_whitespace_slowloris_is_cut_by_the_idle_timeout(server: Server, figures: dict[str, Any]) -> None:
    """Whitespace is skipped, not a question: it must not keep a connection alive past IDLE_TIMEOUT."""
    with good_client(server) as load:
        took, left = _slowloris(server, 300, b"\n", every=1.0, limit=IDLE_TIMEOUT + 4 * TICK)
    figures["slowloris_whitespace_300"] = {"closed_after_s": round(took, 2), "left_open": left, **_summary(load.tally)}
    assert left == 0, f"{left} connections sending a newline a second outlived IDLE_TIMEOUT={IDLE_TIMEOUT}"
    assert took <= IDLE_TIMEOUT + 2 * TICK


# -- the idle horde ------------------------------------------------------------------------


def _readable(socks: list[socket.socket]) -> int:
    """How many of ``socks`` have something to read (here: an EOF), without blocking (poll: no FD_SETSIZE)."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    return len(poller.poll(0))


def test_idle_horde_of_10000(figures: dict[str, Any]) -> None:
    count = 10_000
    # This process holds the client ends; the server (which inherits the limit) the other ends.
    if raise_nofile(20_000) < count + 1000:
        pytest.skip(f"RLIMIT_NOFILE cannot be raised to {count + 1000} here (not root, hard limit lower)")
    with open_server({"IDLE_TIMEOUT": "120", "BACKLOG": "4096"}) as server:
        base_rss = server.worker_rss()
        horde: list[socket.socket] = []
        try:
            horde.extend(socket.create_connection(server.addr) for _ in range(count))
            for sock in horde:  # every one of them is served once, then stays idle
                sock.sendall(QUESTION)
            for sock in horde:
                sock.settimeout(10)
                assert sock.recv(16) == b"Ugly."
            held = server.wait_for(f"{count} connections held", lambda: server.connections() >= count or None, 30)
            rss = server.worker_rss()
            with good_client(server, min_answered=200) as load:
                pass
            still_open = count - _readable(horde)
        finally:
            for sock in horde:
                sock.close()
        server.wait_for("the horde to be gone", lambda: server.connections() == 0, 30)
        server.assert_clean_log()
    per_conn = (rss - base_rss) / count
    figures["idle_horde_10000"] = {
        "held": held,
        "worker_rss_per_conn_bytes": round(per_conn),
        **_summary(load.tally),
    }
    assert still_open == count, "the server closed idle connections before IDLE_TIMEOUT"
    assert per_conn < 16 * 1024, f"{per_conn:.0f} bytes of worker memory per idle connection"


# -- resets, half-closed and half-open connections ---------------------------------------------


def _reset_storm(server: Server, count: int) -> None:
    """Connect and reset at once, some after half a question, some after a whole one."""
    linger = struct.pack("ii", 1, 0)
    payloads = (b"", b"Beautiful is", QUESTION, QUESTION * 50)
    for i in range(count):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.connect(server.addr)
            if payloads[i % 4]:
                sock.sendall(payloads[i % 4])
        # closing with SO_LINGER 0 sends a RST


def test_connect_and_reset_storm(server: Server, figures: dict[str, Any]) -> None:
    workers = {p.pid for p in server.workers()}
    count = 4000
    with good_client(server) as load, server.peak_rss() as peak:
        base = server.rss()
        threads = [threading.Thread(target=_reset_storm, args=(server, count // 4)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    server.wait_for("every reset connection to be gone", lambda: server.connections() == 0, 15)
    assert {p.pid for p in server.workers()} == workers, "a worker died"
    server.assert_clean_log()
    grew = peak[0] - base
    figures["reset_storm"] = {"connections": count, "rss_growth_MiB": round(grew / MiB, 1), **_summary(load.tally)}
    assert grew < 16 * MiB


def test_half_closed_connections_get_every_answer(server: Server) -> None:
    socks = []
    for i in range(200):
        sock = socket.create_connection(server.addr)
        sock.sendall(QUESTION * (i % 5) + b"Simple is better than?" + (b"unfinished" if i % 2 else b""))
        sock.shutdown(socket.SHUT_WR)
        socks.append(sock)
    for i, sock in enumerate(socks):
        got, how = _recv_all(sock, 10)
        sock.close()
        assert (got, how) == (b"Ugly." * (i % 5) + b"Complex.", "eof")
    assert server.wait_event("connection_closed", reason="eof", unfinished="unfinished", count=100)


def _vanish(sock: socket.socket) -> None:
    """Close without FIN or RST, as if the client's machine lost power: a half-open connection."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    sock.close()


def test_half_open_connections_are_reaped(server: Server, figures: dict[str, Any]) -> None:
    probe = socket.create_connection(server.addr)
    try:
        probe.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        probe.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    except PermissionError:
        pytest.skip("TCP_REPAIR needs CAP_NET_ADMIN: cannot make a peer vanish without a FIN here")
    finally:
        probe.close()
    start = time.monotonic()
    with good_client(server) as load:
        # From 127.0.0.2: a vanished socket's port is free again at once, and a
        # new connection from the same address and port would meet the
        # half-open one (challenge ACK, RST) instead of the timeouts.
        socks = [socket.create_connection(server.addr, source_address=("127.0.0.2", 0)) for _ in range(100)]
        for i, sock in enumerate(socks):
            sock.sendall(b"Beautiful is" if i % 2 else QUESTION)  # half a question, or a whole one
            if i % 2 == 0:
                assert sock.recv(16) == b"Ugly."
        peers = {"{}:{}".format(*sock.getsockname()) for sock in socks}
        for sock in socks:
            _vanish(sock)
        seen: list[dict[str, Any]] = []

        def reaped() -> bool:
            seen[:] = [e for e in server.log.named("connection_closed") if e["peer"] in peers]
            return len(seen) >= len(peers)

        server.wait_for("the vanished peers to be reaped", reaped, IDLE_TIMEOUT + 4 * TICK)
        took = time.monotonic() - start
    reasons = {e["reason"] for e in seen}
    figures["half_open_100"] = {"reaped_after_s": round(took, 2), **_summary(load.tally)}
    assert reasons == {"idle_timeout", "request_timeout"}
    assert took <= IDLE_TIMEOUT + 5 * TICK
