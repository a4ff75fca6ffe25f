"""Faults under continuous load: SIGKILL, HUP, TTIN/TTOU, TERM, a crash loop.

A :class:`LoadGenerator` runs throughout and counts every failed, reset or
wrong answer.  Expected: nothing lost on HUP, TTIN, TTOU and TERM; on
SIGKILL only connections the killed worker had already accepted may fail,
and none of the connections waiting in the backlog (the master holds every
slot's listening socket).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import psutil
import pytest

from app.exits import Exit
from app.server import master

from .load import Failure, LoadGenerator, Tally
from .server import Server, listen_queues, open_server

pytestmark = pytest.mark.slow

#: How long a killed worker is held stopped first, so the backlog fills.
STOPPED_FOR = 0.3


def _lost_summary(tally: Tally) -> list[str]:
    return [f"{f.kind} {f.client} port={f.local_port}: {f.detail}" for f in tally.failures[:10]]


def _kill_worker(server: Server, pid: int) -> tuple[set[int], int]:
    """SIGKILL ``pid``; return (peer ports of the connections it had accepted, connections queued for it).

    SIGSTOP first, so the set of accepted connections cannot change between
    the snapshot and the kill, and the backlog fills meanwhile.
    """
    proc = psutil.Process(pid)
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + STOPPED_FOR
    queued = 0
    while time.monotonic() < deadline:
        queued = max(queued, sum(listen_queues(server.port)))
        time.sleep(0.01)
    ports = {c.raddr.port for c in proc.net_connections("tcp") if c.raddr}
    queued = max(queued, sum(listen_queues(server.port)))
    os.kill(pid, signal.SIGKILL)
    return ports, queued


def test_sigkill_one_worker_then_each_in_turn(figures: dict[str, Any]) -> None:
    kills: list[tuple[float, set[int]]] = []
    queued_total = 0
    with open_server() as server, LoadGenerator(server.addr, churn=10, persistent=6) as load:
        load.wait_answered(300)
        for slot in (0, 0, 1):  # one worker, then each worker in turn
            pid = server.wait_workers(2)[slot]
            ports, queued = _kill_worker(server, pid)
            kills.append((time.monotonic(), ports))
            queued_total += queued
            server.wait_workers(2, exclude=frozenset({pid}))
            load.wait_answered(300)
        tally = load.stop()
        respawns = server.log.named("worker_respawn_scheduled")

    def accepted_by_killed(f: Failure) -> bool:
        # Its port was among the killed worker's connections at the kill (the
        # client notes connected_at a little after the handshake, hence <= kill time).
        return any(f.local_port in ports and f.connected_at is not None and f.connected_at <= t for t, ports in kills)

    accepted_lost = [f for f in tally.failures if accepted_by_killed(f)]
    other_lost = [f for f in tally.failures if not accepted_by_killed(f)]
    figures["sigkill_x3"] = {
        "answered": tally.answered,
        "accepted_at_kill": sum(len(p) for _, p in kills),
        "accepted_lost": len(accepted_lost),
        "backlog_at_kill": queued_total,
        "backlog_lost": len(other_lost),
        "p99_ms": round(tally.percentile(0.99) * 1000, 1),
        "max_ms": round(max(tally.latencies) * 1000, 1),
    }
    assert len(respawns) == 3
    assert other_lost == [], _lost_summary(tally)
    assert queued_total > 0, "nothing was waiting in the backlog: the test proved nothing about it"


def _assert_all_accounted(stopped: list[dict[str, Any]]) -> None:
    """Every connection a worker accepted was closed by it, none left to die with the process."""
    for event in stopped:
        assert event["accepted"] == sum(event["closes"].values()) + event["aborted"], event


def _wait_generation(server: Server, old: frozenset[int]) -> dict[int, int]:
    """Wait until both slots have a ready worker that is not in ``old``."""

    def fresh() -> dict[int, int] | None:
        ready = server.ready_workers()
        return ready if len(ready) == 2 and not set(ready.values()) & old else None

    return dict(server.wait_for("a new generation of workers", fresh))


@pytest.mark.parametrize("back_to_back", [False, True], ids=["each-after-ready", "back-to-back"])
def test_hup_three_times_in_a_row_loses_nothing(figures: dict[str, Any], back_to_back: bool) -> None:
    with open_server() as server, LoadGenerator(server.addr) as load:
        load.wait_answered(300)
        first = frozenset(server.wait_workers(2).values())
        seen = set(first)
        for n in range(1, 4):
            server.signal(signal.SIGHUP)
            if back_to_back:
                # The next reload starts before this one's workers are ready; wait
                # only until the master took the signal (two pending HUPs merge).
                server.wait_event("reloading", count=n)
            else:
                seen |= set(_wait_generation(server, frozenset(seen)).values())
                load.wait_answered(200)
        last = server.wait_workers(2, timeout=30, exclude=first)  # every old generation drained and exited
        load.wait_answered(200)
        tally = load.stop()
        spawned = {e["pid"] for e in server.log.named("worker_spawned")}
        exited = server.log.named("worker_exited")
        stopped = server.log.named("worker_stopped")
    retired = spawned - set(last.values())
    assert len(retired) == 6, f"expected the first two and two per reload but the last to retire: {sorted(retired)}"
    assert first <= retired
    assert {e["pid"] for e in exited} == retired
    assert all(e["code"] == 0 and e["expected"] for e in exited), exited
    assert all(e["aborted"] == 0 for e in stopped), "a drain cut a connection at GRACEFUL_TIMEOUT"
    _assert_all_accounted(stopped)
    figures["hup_x3_back_to_back" if back_to_back else "hup_x3"] = {
        "answered": tally.answered,
        "server_closes": tally.server_closes,
        "lost": len(tally.failures),
    }
    assert tally.failures == [], _lost_summary(tally)


def test_ttin_then_ttou_loses_nothing(figures: dict[str, Any], migrate_req: int) -> None:
    slot2: list[dict[str, Any]] = []
    with open_server() as server, LoadGenerator(server.addr) as load:
        load.wait_answered(300)
        for _ in range(2):
            server.signal(signal.SIGTTIN)
            added = server.wait_workers(3)[2]
            server.wait_event("connection_closed", count=20, pid=added)  # the new slot takes its share
            load.wait_answered(300)
            server.signal(signal.SIGTTOU)
            exited = server.wait_event("worker_exited", pid=added, timeout=30)[0]
            server.wait_workers(2)
            load.wait_answered(300)
            assert (exited["code"], exited["expected"]) == (0, True)
            slot2 += server.log.named("worker_stopped", pid=added)
        tally = load.stop()
    assert [e["aborted"] for e in slot2] == [0, 0]
    _assert_all_accounted(slot2)
    figures[f"ttin_ttou_x2_migrate_req_{migrate_req}"] = {
        "answered": tally.answered,
        "slot2_accepted": [e["accepted"] for e in slot2],
        "server_closes": tally.server_closes,
        "lost": len(tally.failures),
    }
    assert tally.failures == [], _lost_summary(tally)


def test_sigterm_with_questions_in_flight_loses_nothing(figures: dict[str, Any]) -> None:
    with open_server({"REQUEST_TIMEOUT": "20"}) as server:
        load = LoadGenerator(server.addr)
        load.start()
        try:
            load.wait_answered(300)
            slow = socket.create_connection(server.addr)  # a question in progress across the stop
            slow.sendall(b"Beautiful is ")
            port = slow.getsockname()[1]
            server.wait_for("the slow connection to be accepted", lambda: server.holds(port))
            load.mark_down()
            server.signal(signal.SIGTERM)
            server.wait_event("worker_draining", count=2)
            slow.sendall(b"better than?")
            slow.settimeout(10)
            assert slow.recv(100) == b"Ugly.", server.log.named("connection_closed", peer=f"127.0.0.1:{port}")
            assert slow.recv(100) == b"", "the drained connection is closed once quiet"
            slow.close()
            code = server.wait_exit(30)
        finally:
            tally = load.stop()
        stopped = server.log.named("worker_stopped")
    assert code == Exit.OK
    assert len(stopped) == 2
    assert all(e["aborted"] == 0 for e in stopped)
    _assert_all_accounted(stopped)
    figures["sigterm"] = {"answered": tally.answered, "lost": len(tally.failures), "refused_after": tally.down_refusals}
    assert tally.failures == [], _lost_summary(tally)


def test_crash_loop_backs_off_then_master_exits_nonzero(figures: dict[str, Any]) -> None:
    killed: set[int] = set()
    with open_server() as server:
        for _ in range(master.CRASH_LIMIT):
            pid = server.wait_for(
                "a fresh worker in slot 0", lambda: (p := server.ready_workers().get(0)) not in killed and p
            )
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        code = server.wait_exit(30)
        delays = [e["delay"] for e in server.log.named("worker_respawn_scheduled", slot=0)]
        loops = server.log.named("crash_loop", slot=0)
    assert code == Exit.CRASH_LOOP
    assert len(loops) == 1
    assert len(delays) == master.CRASH_LIMIT - 1
    for n, delay in enumerate(delays, start=1):
        full = master.RESPAWN_FIRST * 2 ** (n - 1)
        assert full * 0.5 - 0.001 <= delay <= full + 0.001, (n, delays)
    figures["crash_loop"] = {"respawn_delays_s": delays, "exit_code": code}
