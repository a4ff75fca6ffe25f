"""File-descriptor exhaustion: the server started with a lowered RLIMIT_NOFILE, then flooded.

- With MAX_CONNECTIONS derived from RLIMIT_NOFILE (the default), EMFILE
  never happens: a worker stops accepting at its cap (``accept_paused``),
  the extra connections wait in the backlog, and are served as soon as
  held ones close.
- With MAX_CONNECTIONS forced above what the descriptors allow, accept()
  fails with EMFILE: the worker backs off (capped exponential), logs one
  rate-limited ``accept_backoff`` event instead of a line per failure,
  counts every back-off (``zen_accept_backoffs_total``), does not spin,
  keeps serving the connections it holds, and recovers once descriptors
  free up.
"""

from __future__ import annotations

import re
import signal
import socket
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest

from app import config
from app.server import accept
from tests.server import free_port

from .server import Server, open_server

pytestmark = pytest.mark.slow

QUESTION = b"Beautiful is better than?"
#: Back-offs (10 ms doubling) until the pause reaches the 1 s cap: the window in which accept() waits.
CAPPED = 8


def _flood(server: Server, count: int) -> list[socket.socket]:
    """``count`` connections, each with one question sent and its answer not read yet."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(server.addr)
        sock.sendall(QUESTION)
        socks.append(sock)
    return socks


def _answered(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets whose answer arrives within ``timeout`` (in total)."""
    deadline = time.monotonic() + timeout
    out = []
    for sock in socks:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            if sock.recv(16) == b"Ugly.":
                out.append(sock)
        except TimeoutError:
            continue
    return out


def _max_fds(server: Server) -> int:
    return max((p.num_fds() for p in server.workers()), default=0)


def test_derived_max_connections_never_reaches_emfile(figures: dict[str, Any]) -> None:
    nofile = 256
    cap = config.derived_max_connections(nofile)
    with open_server({"IDLE_TIMEOUT": "60"}, nofile=nofile) as server:
        started = server.log.named("master_started")[0]
        assert (started["rlimit_nofile"], started["max_connections"]) == (nofile, cap)
        assert {e["max_connections"] for e in server.log.named("worker_ready")} == {cap}
        socks = _flood(server, 3 * cap)
        try:
            first = _answered(socks, 5)
            held = len(first)
            server.wait_event("accept_paused", count=2)
            fds = _max_fds(server)
            for sock in first:  # held connections close: the waiting ones are served
                sock.close()
            rest = [s for s in socks if s not in first]
            late = _answered(rest, 15)
        finally:
            for sock in socks:
                sock.close()
        assert not server.log.named("accept_backoff"), "EMFILE happened with the derived MAX_CONNECTIONS"
        server.assert_clean_log()
    figures["fd_derived"] = {
        "rlimit_nofile": nofile,
        "max_connections": cap,
        "flood": 3 * cap,
        "held": held,
        "worker_max_fds": fds,
        "served_after_release": len(late),
    }
    assert held <= 2 * cap
    assert fds < nofile
    events = Counter(f"{e.get('event')}:{e.get('reason', e.get('native', ''))}" for e in server.log.events)
    assert len(late) == len(rest), f"connections waiting in the backlog were lost: {len(rest) - len(late)}; {events}"


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_emfile_backs_off_keeps_serving_and_recovers(figures: dict[str, Any]) -> None:
    nofile = 128
    admin = free_port()
    env = {"IDLE_TIMEOUT": "60", "MAX_CONNECTIONS": "5000", "ADMIN_PORT": str(admin)}
    with open_server(env, nofile=nofile) as server:
        socks = _flood(server, 400)
        try:
            held = _answered(socks, 5)
            server.wait_event("accept_backoff", count=2)  # one per worker
            workers = server.workers()
            cpu_before = sum(sum(p.cpu_times()[:2]) for p in workers)
            t0 = time.monotonic()
            for _ in range(3):  # the connections held keep being served while accept() fails
                for sock in held:
                    sock.sendall(QUESTION)
                assert len(_answered(held, 5)) == len(held)
            while time.monotonic() - t0 < 3:
                time.sleep(0.1)
            cpu = sum(sum(p.cpu_times()[:2]) for p in workers) - cpu_before
            backoffs = server.wait_for(
                "the back-off counter", lambda: _metric(admin, "zen_accept_backoffs_total"), timeout=10
            )
            events = len(server.log.named("accept_backoff"))
        finally:
            for sock in socks:
                sock.close()
        released = time.monotonic()
        with socket.create_connection(server.addr) as sock:  # recovery: a new client is served
            sock.sendall(QUESTION)
            sock.settimeout(accept.BACKOFF_CAP + 10)
            assert sock.recv(16) == b"Ugly."
        recovered = time.monotonic() - released
        server.assert_clean_log()
    figures["fd_emfile"] = {
        "rlimit_nofile": nofile,
        "flood": 400,
        "held": len(held),
        "accept_backoffs_counted": backoffs,
        "accept_backoff_log_events": events,
        "worker_cpu_s_in_3s": round(cpu, 3),
        "recovered_after_s": round(recovered, 2),
    }
    assert 0 < len(held) < 2 * nofile
    assert backoffs > events, "the counter must count every back-off, the log only a few"
    # One event at once, then at most one per BACKOFF_LOG_EVERY, per worker.
    elapsed = time.monotonic() - t0 + 5
    assert events <= 2 * (1 + elapsed / accept.BACKOFF_LOG_EVERY)
    assert cpu < 1.0, f"workers burnt {cpu:.2f} s of CPU in 3 s of EMFILE: spinning"
    assert recovered < accept.BACKOFF_CAP + 5


def _split_answered(socks: list[socket.socket], timeout: float) -> tuple[list[socket.socket], list[socket.socket]]:
    held = _answered(socks, timeout)
    return held, [s for s in socks if s not in held]


def test_term_while_accept_backs_off_serves_the_queue(figures: dict[str, Any]) -> None:
    """TERM while accept() is backed off on EMFILE and no connection is held: the queue is still served.

    The drain's final accept takes the whole queue at once, before any of
    it is wrapped in a connection: a drain that only waited for wrapped
    connections returned at once and closed these with the process (seen
    as an EOF after the first answer under back-to-back HUPs).
    """
    admin = free_port()
    env = {"IDLE_TIMEOUT": "60", "MAX_CONNECTIONS": "5000", "ADMIN_PORT": str(admin)}
    with open_server(env, nofile=128) as server:
        held, waiting = _split_answered(_flood(server, 300), 5)
        server.wait_for("the back-off near its cap", lambda: _metric(admin, "zen_accept_backoffs_total") >= 2 * CAPPED)
        for sock in held:  # no connection left: only the queue, which accept() has not taken
            sock.close()
        server.signal(signal.SIGTERM)
        lost = 0
        for sock in waiting:  # each asks a second question on the connection it was queued with
            sock.settimeout(15)
            try:
                assert sock.recv(16) == b"Ugly."
                sock.sendall(b"Simple is better than?")
                assert sock.recv(16) == b"Complex."
            except (OSError, AssertionError):
                lost += 1
            sock.close()
        code = server.wait_exit(30)
        stopped = server.log.named("worker_stopped")
    figures["term_during_emfile_backoff"] = {"queued": len(waiting), "lost": lost}
    assert code == 0
    assert waiting, "nothing was queued: the test proved nothing"
    assert lost == 0
    for event in stopped:  # every connection accepted was served and closed, none left untracked
        assert event["accepted"] == sum(event["closes"].values()) + event["aborted"], event
