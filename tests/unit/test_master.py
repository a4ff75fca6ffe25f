"""The master's decisions without processes: a fake spawner, fake workers and a fake clock.

The subprocess tests (tests/system/test_master.py) show that the real
signals and processes behave; these show each decision and its order,
in microseconds: back-off, jitter, the crash-loop limit, HUP's reload
order, TTIN/TTOU, boot failures, graceful and immediate stops.  The last
few drive the master's I/O shell with a fake spawner callable over real
sockets and pipes.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from typing import Any, cast

import orjson
import pytest

from app.config import Settings
from app.exits import Exit
from app.server.admin import AdminServer, MasterStatus
from app.server.heartbeat import BEAT, READY, RECYCLE
from app.server.listener import bind_slots
from app.server.master import Master, WorkerProcesses
from app.server.supervision import (
    BOOT_GRACE,
    CRASH_LIMIT,
    CRASH_WINDOW,
    DUMP_GRACE,
    HOST_PAUSE,
    JITTER,
    KILL_GRACE,
    MASTER_TURN,
    RESPAWN_CAP,
    RESPAWN_FIRST,
    Jitter,
    Supervisor,
    respawn_delay,
)

GRACEFUL = 30.0
KILLED = -9  # waitstatus_to_exitcode() of a SIGKILLed worker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeLog:
    """Records (level, event, fields) like a structlog logger would log them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append(("warning", event, fields))

    def error(self, event: str, **fields: Any) -> None:
        self.events.append(("error", event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.events if name == event]


class FakeSpawner:
    """The supervisor's Effects, recording every call in order; pids count up from 100."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | str | None]] = []
        self.next_pid = 100
        self.spawn_error: OSError | None = None
        self.bind_ok = True

    def spawn(self, slot: int) -> int:
        if self.spawn_error is not None:
            self.calls.append(("spawn_failed", slot, None))
            raise self.spawn_error
        pid = self.next_pid
        self.next_pid += 1
        self.calls.append(("spawn", slot, pid))
        return pid

    def signal(self, pid: int, sig: signal.Signals) -> None:
        self.calls.append(("signal", pid, sig.name))

    def open_slot(self, slot: int) -> bool:
        self.calls.append(("open", slot, None))
        return self.bind_ok

    def close_slot(self, slot: int) -> None:
        self.calls.append(("close", slot, None))

    def spawned(self) -> list[int]:
        return [pid for what, _, pid in self.calls if what == "spawn" and isinstance(pid, int)]

    def signalled(self, name: str) -> list[int]:
        return [pid for what, pid, sig in self.calls if what == "signal" and sig == name]

    def take(self) -> list[tuple[str, int, int | str | None]]:
        """The calls since the last take()."""
        calls, self.calls = self.calls, []
        return calls


class World:
    """A supervisor over fakes, with the helpers a test drives its fake workers by."""

    def __init__(self, workers: int = 2, jitter: Jitter = max, worker_timeout: float = 0.0) -> None:
        self.clock = FakeClock()
        self.log = FakeLog()
        self.fake = FakeSpawner()
        self.sup = Supervisor(
            self.fake,
            log=self.log,
            graceful_timeout=GRACEFUL,
            worker_timeout=worker_timeout,
            clock=self.clock,
            jitter=jitter,
        )
        self.sup.start(workers)

    def current(self, slot: int) -> int:
        proc = self.sup.slots[slot].current
        assert proc is not None
        return proc.pid

    def ready_all(self) -> None:
        for pid in list(self.sup.procs):
            if not self.sup.procs[pid].ready:
                self.sup.worker_ready(pid)

    def crash(self, slot: int) -> int:
        """The worker of ``slot`` dies after it was ready; returns its pid."""
        pid = self.current(slot)
        self.sup.worker_ready(pid)
        self.sup.worker_exited(pid, KILLED)
        return pid

    def respawn_now(self) -> None:
        """Advance the clock to the next timer and run it."""
        deadline = self.sup.deadline()
        assert deadline is not None
        self.clock.now = deadline
        self.sup.tick()


# -- start and readiness ---------------------------------------------------------------


def test_start_spawns_one_worker_per_slot_and_announces_once_when_all_are_ready() -> None:
    w = World(workers=3)
    assert w.fake.take() == [("spawn", 0, 100), ("spawn", 1, 101), ("spawn", 2, 102)]
    assert [e["reload"] for e in w.log.named("worker_spawned")] == [False, False, False]
    assert w.sup.worker_ready(100) is False
    assert w.sup.worker_ready(101) is False
    assert w.sup.counts() == (3, 2)
    assert w.sup.worker_ready(102) is True  # the last one: server_ready
    assert w.sup.announced
    assert w.sup.worker_ready(102) is False  # announced once only
    assert w.sup.worker_ready(999) is False  # not ours
    assert w.sup.deadline() is None
    assert w.fake.take() == []


# -- respawn back-off and jitter -----------------------------------------------------------


def test_respawn_backs_off_exponentially_and_waits_for_its_deadline() -> None:
    w = World(workers=1)  # jitter=max: the full delay
    w.fake.take()
    delays = []
    for crash in range(1, CRASH_LIMIT):
        dead = w.crash(0)
        assert w.sup.slots[0].current is None
        delay = w.log.named("worker_respawn_scheduled")[-1]["delay"]
        delays.append(delay)
        assert w.sup.deadline() == pytest.approx(w.clock.now + delay)
        w.clock.now += delay * 0.99
        w.sup.tick()
        assert w.fake.take() == []  # not before its time
        w.respawn_now()
        assert w.fake.take() == [("spawn", 0, dead + 1)]
        assert w.sup.restarts == crash
    assert delays == [RESPAWN_FIRST, RESPAWN_FIRST * 2, RESPAWN_FIRST * 4, RESPAWN_FIRST * 8]
    assert [e["crashes"] for e in w.log.named("worker_respawn_scheduled")] == [1, 2, 3, 4]
    assert [e["code"] for e in w.log.named("worker_exited")] == [KILLED] * 4
    assert not w.sup.stopping


def test_jitter_is_drawn_between_half_and_the_full_delay() -> None:
    drawn: list[tuple[float, float]] = []

    def lowest(low: float, high: float) -> float:
        drawn.append((low, high))
        return low

    w = World(workers=1, jitter=lowest)
    w.crash(0)
    w.respawn_now()
    w.crash(0)
    assert drawn == [JITTER, JITTER]
    assert JITTER == (0.5, 1.0)
    delays = [e["delay"] for e in w.log.named("worker_respawn_scheduled")]
    assert delays == [RESPAWN_FIRST * 0.5, RESPAWN_FIRST * 2 * 0.5]


@pytest.mark.parametrize("seed", range(20))
def test_random_jitter_stays_within_its_bounds(seed: int) -> None:
    w = World(workers=1, jitter=random.Random(seed).uniform)
    for _ in range(CRASH_LIMIT - 1):
        w.crash(0)
        w.respawn_now()
    for n, event in enumerate(w.log.named("worker_respawn_scheduled"), start=1):
        full = RESPAWN_FIRST * 2 ** (n - 1)
        assert full * 0.5 - 0.001 <= event["delay"] <= full + 0.001


def test_respawn_delay_doubles_then_is_capped() -> None:
    assert [respawn_delay(n, 1.0) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.8]
    assert respawn_delay(1, 0.5) == 0.05
    assert respawn_delay(8, 1.0) == RESPAWN_CAP  # 12.8 capped
    assert respawn_delay(50, 0.5) == RESPAWN_CAP * 0.5


def test_crashes_older_than_the_window_are_forgotten() -> None:
    w = World(workers=1)
    for _ in range(CRASH_LIMIT * 2):
        w.crash(0)
        w.respawn_now()
        w.clock.now += CRASH_WINDOW + 1
    assert {e["crashes"] for e in w.log.named("worker_respawn_scheduled")} == {1}
    assert {e["delay"] for e in w.log.named("worker_respawn_scheduled")} == {RESPAWN_FIRST}
    assert not w.log.named("crash_loop")
    assert not w.sup.stopping


def test_a_failed_spawn_counts_as_a_crash_and_is_retried() -> None:
    w = World(workers=1)
    w.crash(0)
    w.fake.spawn_error = OSError("EAGAIN")
    w.respawn_now()
    assert w.log.named("spawn_failed") == [{"slot": 0, "error": "EAGAIN"}]
    assert [e["crashes"] for e in w.log.named("worker_respawn_scheduled")] == [1, 2]
    w.fake.spawn_error = None
    w.fake.take()
    w.respawn_now()
    assert w.fake.take() == [("spawn", 0, 101)]


# -- the crash-loop limit ---------------------------------------------------------------------


def test_crash_limit_within_the_window_stops_the_master_with_crash_loop() -> None:
    w = World(workers=2)
    w.ready_all()
    other = w.current(1)
    for _ in range(CRASH_LIMIT - 1):
        w.crash(0)
        w.respawn_now()
    w.fake.take()
    w.crash(0)
    assert w.log.named("crash_loop") == [{"slot": 0, "crashes": CRASH_LIMIT, "window": CRASH_WINDOW}]
    assert len(w.log.named("worker_respawn_scheduled")) == CRASH_LIMIT - 1
    assert w.sup.exit_code == Exit.CRASH_LOOP
    assert w.sup.stopping
    # Every listener closed, the other slot's worker drained; nothing respawned.
    assert w.fake.take() == [("close", 0, None), ("close", 1, None), ("signal", other, "SIGTERM")]
    assert w.sup.deadline() == w.clock.now + GRACEFUL + KILL_GRACE
    assert not w.sup.done
    w.sup.worker_exited(other, 0)
    assert w.sup.done
    assert w.sup.exit_code == Exit.CRASH_LOOP  # the graceful exit does not clear it
    assert w.fake.take() == []


# -- boot failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [Exit.BOOT_FAILED, Exit.CONFIG])
def test_a_worker_failing_before_ready_is_a_boot_failure(code: int) -> None:
    w = World(workers=2)
    first, second = w.current(0), w.current(1)
    w.sup.worker_ready(second)
    w.fake.take()
    w.sup.worker_exited(first, code)
    assert w.log.named("worker_boot_failed") == [{"slot": 0, "code": code}]
    assert w.sup.exit_code == code
    assert w.fake.take() == [("close", 0, None), ("close", 1, None), ("signal", second, "SIGTERM")]
    assert not w.log.named("worker_respawn_scheduled")
    w.sup.worker_exited(second, 0)
    assert w.sup.done


def test_the_same_code_after_ready_is_a_crash_not_a_boot_failure() -> None:
    w = World(workers=1)
    pid = w.current(0)
    w.sup.worker_ready(pid)
    w.sup.worker_exited(pid, Exit.BOOT_FAILED)
    assert not w.log.named("worker_boot_failed")
    assert len(w.log.named("worker_respawn_scheduled")) == 1
    assert not w.sup.stopping


def test_a_crash_before_ready_with_another_code_is_respawned() -> None:
    w = World(workers=1)
    w.sup.worker_exited(w.current(0), KILLED)
    assert not w.log.named("worker_boot_failed")
    assert len(w.log.named("worker_respawn_scheduled")) == 1


# -- HUP: zero-downtime reload ------------------------------------------------------------------


def test_hup_successor_is_ready_on_the_same_slot_before_the_old_worker_drains() -> None:
    w = World(workers=2)
    w.ready_all()
    old0, old1 = w.current(0), w.current(1)
    w.fake.take()
    w.sup.handle_signal(signal.SIGHUP)
    new0, new1 = 102, 103
    assert w.fake.take() == [("spawn", 0, new0), ("spawn", 1, new1)]  # nobody told to stop yet
    assert [e["reload"] for e in w.log.named("worker_spawned")][-2:] == [True, True]
    assert w.current(0) == old0  # the old one serves until its successor is ready
    w.sup.worker_ready(new1)
    assert w.fake.take() == [("signal", old1, "SIGTERM")]  # only slot 1's old worker
    assert w.current(1) == new1
    assert w.current(0) == old0
    w.sup.worker_ready(new0)
    assert w.fake.take() == [("signal", old0, "SIGTERM")]
    # The old workers drain and exit: expected, nothing respawned.
    w.sup.worker_exited(old0, 0)
    w.sup.worker_exited(old1, 0)
    assert [e["expected"] for e in w.log.named("worker_exited")] == [True, True]
    assert w.sup.deadline() is None
    assert w.fake.take() == []
    assert w.sup.counts() == (2, 2)


def test_a_successor_dying_before_ready_leaves_the_old_worker_serving() -> None:
    w = World(workers=1)
    w.ready_all()
    old = w.current(0)
    w.sup.handle_hup()
    new = w.fake.spawned()[-1]
    w.fake.take()
    w.sup.worker_exited(new, Exit.BOOT_FAILED)
    assert w.log.named("reload_failed") == [{"slot": 0, "pid": new, "code": Exit.BOOT_FAILED}]
    assert w.current(0) == old
    assert w.fake.take() == []  # the old one is not stopped, nothing respawned
    assert not w.sup.stopping
    assert w.sup.deadline() is None


def test_a_failed_reload_spawn_is_not_a_crash() -> None:
    w = World(workers=1)
    w.ready_all()
    w.fake.spawn_error = OSError("ENOMEM")
    w.sup.handle_hup()
    assert len(w.log.named("spawn_failed")) == 1
    assert not w.log.named("worker_respawn_scheduled")
    assert not w.sup.slots[0].crashes  # no crash counted


def test_hup_during_a_back_off_spawns_at_once_instead() -> None:
    w = World(workers=1)
    w.crash(0)
    assert w.sup.deadline() is not None
    w.fake.take()
    w.sup.handle_hup()
    assert w.fake.take() == [("spawn", 0, 101)]
    assert w.current(0) == 101  # not a reload: it is the slot's worker
    assert w.sup.deadline() is None  # the scheduled respawn is cancelled


# -- TTIN / TTOU ---------------------------------------------------------------------------------


def test_ttin_adds_a_slot_with_a_new_socket_then_its_worker() -> None:
    w = World(workers=2)
    w.ready_all()
    w.fake.take()
    w.sup.handle_signal(signal.SIGTTIN)
    assert w.fake.take() == [("open", 2, None), ("spawn", 2, 102)]
    assert w.log.named("worker_added") == [{"slot": 2, "workers": 3}]
    assert len(w.sup.slots) == 3
    assert w.sup.counts() == (3, 2)


def test_ttin_that_cannot_bind_adds_nothing() -> None:
    w = World(workers=1)
    w.fake.bind_ok = False
    w.fake.take()
    w.sup.handle_ttin()
    assert w.fake.take() == [("open", 1, None)]
    assert len(w.sup.slots) == 1
    assert not w.log.named("worker_added")


def test_ttou_closes_the_highest_slots_socket_then_drains_its_worker() -> None:
    w = World(workers=3)
    w.ready_all()
    last = w.current(2)
    w.fake.take()
    w.sup.handle_signal(signal.SIGTTOU)
    assert w.fake.take() == [("close", 2, None), ("signal", last, "SIGTERM")]  # socket first
    assert w.log.named("worker_removed") == [{"slot": 2, "workers": 2}]
    w.sup.worker_exited(last, 0)
    assert w.log.named("worker_exited")[-1]["expected"] is True
    assert w.fake.take() == []  # not respawned
    assert w.sup.deadline() is None
    w.sup.handle_ttin()  # the index is free again
    assert w.fake.take() == [("open", 2, None), ("spawn", 2, 103)]


def test_ttou_never_goes_below_one_worker() -> None:
    w = World(workers=2)
    w.ready_all()
    w.sup.handle_ttou()
    w.fake.take()
    w.sup.handle_ttou()
    w.sup.handle_ttou()
    assert w.fake.take() == []
    assert len(w.sup.slots) == 1
    assert len(w.log.named("worker_removed")) == 1


def test_ttou_of_a_slot_waiting_for_its_respawn_cancels_the_respawn() -> None:
    w = World(workers=2)
    w.crash(1)
    w.sup.handle_ttou()
    assert w.sup.deadline() is None
    w.clock.now += RESPAWN_CAP
    w.fake.take()
    w.sup.tick()
    assert w.fake.take() == []


# -- stops ------------------------------------------------------------------------------------------


def test_term_closes_the_listeners_drains_the_workers_then_kills_after_the_timeout() -> None:
    w = World(workers=2)
    w.ready_all()
    a, b = w.current(0), w.current(1)
    w.fake.take()
    w.sup.handle_signal(signal.SIGTERM)
    assert w.log.named("stopping") == [{"signal": "SIGTERM", "graceful_timeout": GRACEFUL}]
    assert w.fake.take() == [("close", 0, None), ("close", 1, None), ("signal", a, "SIGTERM"), ("signal", b, "SIGTERM")]
    w.sup.worker_exited(a, 0)
    assert not w.sup.done
    w.clock.now += GRACEFUL + KILL_GRACE - 0.01
    w.sup.tick()
    assert w.fake.take() == []
    w.clock.now += 0.01
    w.sup.tick()
    assert w.fake.take() == [("signal", b, "SIGKILL")]  # only the one still running
    assert w.log.named("worker_killed") == [{"pid": b, "slot": 1}]
    w.sup.worker_exited(b, KILLED)
    assert w.sup.done
    assert w.sup.exit_code == Exit.OK


def test_a_second_term_is_an_immediate_stop() -> None:
    w = World(workers=2)
    w.ready_all()
    a, b = w.current(0), w.current(1)
    w.sup.handle_signal(signal.SIGINT)
    w.fake.take()
    w.clock.now += 1
    w.sup.handle_signal(signal.SIGINT)
    assert w.fake.take() == [("signal", a, "SIGQUIT"), ("signal", b, "SIGQUIT")]
    assert w.log.named("stopping_now") == [{"workers": 2}]
    assert w.sup.deadline() == w.clock.now + KILL_GRACE  # sooner than the graceful deadline
    w.sup.handle_signal(signal.SIGTERM)  # a third: nothing more to do
    w.sup.handle_quit()
    assert w.fake.take() == []
    assert len(w.log.named("stopping")) == 1


def test_quit_is_immediate_from_the_start() -> None:
    w = World(workers=1)
    pid = w.current(0)
    w.fake.take()
    w.sup.handle_signal(signal.SIGQUIT)
    assert w.fake.take() == [("close", 0, None), ("signal", pid, "SIGTERM"), ("signal", pid, "SIGQUIT")]
    assert w.sup.deadline() == w.clock.now + KILL_GRACE
    assert w.sup.exit_code == Exit.OK


def test_nothing_is_spawned_once_a_stop_began() -> None:
    w = World(workers=2)
    w.crash(0)  # a respawn is scheduled
    w.sup.handle_term("SIGTERM")
    w.fake.take()
    w.sup.handle_hup()
    w.sup.handle_ttin()
    w.sup.handle_ttou()
    w.clock.now += GRACEFUL
    w.sup.tick()
    assert w.fake.take() == []
    assert len(w.sup.slots) == 2
    assert w.sup.restarts == 0


def test_a_worker_ready_after_the_stop_began_is_told_to_stop() -> None:
    w = World(workers=1)
    pid = w.current(0)
    w.sup.handle_term("SIGTERM")
    w.fake.take()
    w.sup.worker_ready(pid)
    assert w.fake.take() == [("signal", pid, "SIGTERM")]


def test_a_worker_exit_during_a_stop_is_expected_whatever_its_code() -> None:
    w = World(workers=1)
    pid = w.current(0)
    w.sup.handle_term("SIGTERM")
    w.sup.worker_exited(pid, Exit.BOOT_FAILED)
    assert w.log.events[-1] == ("warning", "worker_exited", {"pid": pid, "slot": 0, "code": 3, "expected": True})
    assert not w.log.named("worker_boot_failed")
    assert w.sup.exit_code == Exit.OK
    assert w.sup.done


def test_signal_numbers_map_to_their_actions() -> None:
    w = World(workers=1)
    w.sup.handle_signal(signal.SIGCHLD)  # the master reaps, the supervisor has nothing to do
    assert w.fake.spawned() == [100]
    assert not w.sup.stopping


# -- hung workers: silence, stack dump, SIGKILL, respawn ----------------------------------------

TIMEOUT = 5.0


def beat_for(w: World, seconds: float, pids: list[int]) -> None:
    """Let ``seconds`` pass in master turns, ``pids`` beating every turn, the others silent."""
    end = w.clock.now + seconds
    while w.clock.now < end:
        w.clock.now = min(end, w.clock.now + MASTER_TURN)
        for pid in pids:
            w.sup.worker_said(pid, BEAT)
        w.sup.tick()


def test_a_silent_worker_is_dumped_then_killed_and_respawned_on_its_slot_as_a_crash() -> None:
    w = World(workers=2, worker_timeout=TIMEOUT)
    w.ready_all()
    silent, alive = w.current(0), w.current(1)
    w.fake.take()
    beat_for(w, TIMEOUT - 1, [alive])
    assert w.fake.take() == []
    assert w.sup.deadline() == w.clock.now + 1  # the silent one's: the master wakes for it
    beat_for(w, 1, [alive])
    assert w.fake.take() == [("signal", silent, "SIGUSR1"), ("signal", silent, "SIGCONT")]
    assert w.log.named("worker_hung") == [{"slot": 0, "pid": silent, "silent": TIMEOUT, "timeout": TIMEOUT}]
    assert w.sup.hung == {0: 1}
    assert w.sup.hung_now() == 1
    w.sup.worker_said(silent, b"Stack (most recent call first)")  # its dump does not revive it
    assert w.sup.deadline() == w.clock.now + DUMP_GRACE
    w.respawn_now()
    assert w.fake.take() == [("signal", silent, "SIGKILL")]
    assert w.log.named("worker_killed") == [{"pid": silent, "slot": 0, "reason": "hung"}]
    w.sup.tick()
    assert w.fake.take() == []  # killed once
    w.sup.worker_exited(silent, KILLED)
    assert w.sup.slots[0].crashes  # counted like a crash
    w.respawn_now()
    assert w.fake.take() == [("spawn", 0, 102)]  # the same slot: the same socket and its backlog
    assert w.sup.hung_now() == 0
    assert w.current(1) == alive  # the busy one is left alone


def test_a_worker_ending_with_its_dump_is_not_killed_again() -> None:
    w = World(workers=1, worker_timeout=TIMEOUT)
    w.ready_all()
    pid = w.current(0)
    beat_for(w, TIMEOUT, [])
    assert w.fake.take()[-2:] == [("signal", pid, "SIGUSR1"), ("signal", pid, "SIGCONT")]
    w.sup.worker_exited(pid, -signal.SIGUSR1)  # the dump's chained default action
    w.respawn_now()
    assert w.fake.take() == [("spawn", 0, 101)]
    assert not w.fake.signalled("SIGKILL")


def test_a_beating_worker_is_never_hung_and_a_late_one_is_only_just_in_time() -> None:
    w = World(workers=1, worker_timeout=TIMEOUT)
    w.ready_all()
    pid = w.current(0)
    beat_for(w, 600, [pid])
    beat_for(w, TIMEOUT - 0.001, [])  # the loop late by almost the whole timeout
    w.sup.worker_said(pid, BEAT)
    beat_for(w, TIMEOUT - 0.001, [])
    assert not w.log.named("worker_hung")
    assert w.fake.signalled("SIGUSR1") == []
    beat_for(w, 0.001, [])
    assert w.fake.signalled("SIGUSR1") == [pid]


def test_worker_timeout_zero_never_declares_a_worker_hung() -> None:
    w = World(workers=1, worker_timeout=0)
    w.ready_all()
    w.clock.now += 3600
    assert w.sup.deadline() is None
    w.sup.tick()
    assert not w.log.named("worker_hung")


def test_a_booting_worker_gets_the_boot_grace_before_it_beats() -> None:
    w = World(workers=1, worker_timeout=TIMEOUT)
    pid = w.current(0)
    assert w.sup.deadline() == w.clock.now + BOOT_GRACE
    beat_for(w, BOOT_GRACE - 1, [])
    assert not w.log.named("worker_hung")
    beat_for(w, 1, [])
    assert w.log.named("worker_hung")[0]["pid"] == pid


def test_a_pause_of_the_whole_host_is_not_the_workers_silence() -> None:
    w = World(workers=2, worker_timeout=TIMEOUT)
    w.ready_all()
    w.sup.tick()
    w.clock.now += HOST_PAUSE + 10 * TIMEOUT  # the master itself did not run: a VM froze
    w.sup.tick()
    assert not w.log.named("worker_hung")
    beat_for(w, TIMEOUT, [])  # but silence after that counts
    assert len(w.log.named("worker_hung")) == 2


def test_hung_workers_count_toward_the_crash_loop_limit() -> None:
    w = World(workers=1, worker_timeout=TIMEOUT)
    for _ in range(CRASH_LIMIT):
        pid = w.current(0)
        w.sup.worker_said(pid, READY)
        beat_for(w, TIMEOUT, [])
        w.sup.worker_exited(pid, -signal.SIGUSR1)
        if not w.sup.stopping:
            w.respawn_now()
    assert w.sup.hung == {0: CRASH_LIMIT}
    assert w.log.named("crash_loop")
    assert w.sup.exit_code == Exit.CRASH_LOOP


def test_a_draining_worker_that_hangs_is_killed_and_not_replaced_twice() -> None:
    w = World(workers=1, worker_timeout=TIMEOUT)
    w.ready_all()
    old = w.current(0)
    w.sup.handle_hup()
    new = w.fake.spawned()[-1]
    w.sup.worker_said(new, READY)  # old is told to drain
    w.fake.take()
    beat_for(w, TIMEOUT, [new])
    assert w.fake.take() == [("signal", old, "SIGUSR1"), ("signal", old, "SIGCONT")]
    w.sup.worker_exited(old, -signal.SIGUSR1)
    assert w.sup.deadline() is not None  # only the new one's silence deadline: nothing respawned
    assert w.fake.take() == []
    assert w.current(0) == new


def test_readiness_is_read_from_what_the_worker_says() -> None:
    w = World(workers=2)
    a, b = w.current(0), w.current(1)
    assert w.sup.worker_said(a, READY + BEAT) is False
    assert w.sup.worker_said(b, BEAT) is False  # a beat is not readiness
    assert w.sup.worker_said(b, READY) is True  # every slot ready: announce, once
    assert w.sup.worker_said(a, BEAT * 3) is False
    assert w.sup.worker_said(999, READY) is False  # unknown (reaped) pid


# -- recycling: MAX_REQUESTS ----------------------------------------------------------------------


def test_a_recycle_request_replaces_only_that_slot_through_the_reload_path() -> None:
    w = World(workers=2)
    w.ready_all()
    old, other = w.current(0), w.current(1)
    w.fake.take()
    w.sup.worker_said(old, RECYCLE)
    assert w.fake.take() == [("spawn", 0, 102)]  # the successor, on slot 0's socket
    assert w.log.named("worker_recycling") == [{"slot": 0, "pid": old}]
    assert w.current(0) == old  # the old one serves until its successor is ready
    w.sup.worker_said(old, RECYCLE)  # repeated every beat: one successor only
    assert w.fake.take() == []
    w.sup.worker_said(102, READY)
    assert w.fake.take() == [("signal", old, "SIGTERM")]  # then it drains
    w.sup.worker_exited(old, 0)
    assert w.log.named("worker_exited")[-1]["expected"] is True
    assert w.sup.recycles == 1
    assert w.current(0) == 102
    assert w.current(1) == other
    assert w.sup.deadline() is None
    assert w.sup.counts() == (2, 2)


def test_no_recycle_while_stopping_or_from_a_worker_not_serving_its_slot() -> None:
    w = World(workers=1)
    pid = w.current(0)
    w.sup.worker_said(pid, RECYCLE)  # not ready yet
    w.sup.worker_said(pid, READY)
    w.sup.handle_hup()
    successor = w.fake.spawned()[-1]
    w.fake.take()
    w.sup.worker_said(pid, RECYCLE)  # a reload's successor is already on its way
    w.sup.worker_said(successor, READY)
    w.sup.worker_said(pid, RECYCLE)  # draining
    w.fake.take()
    w.sup.handle_term("SIGTERM")
    w.fake.take()
    w.sup.worker_said(successor, RECYCLE)  # stopping
    assert w.fake.take() == []
    assert w.sup.recycles == 0


def test_a_failed_successor_backs_the_recycling_of_its_slot_off() -> None:
    w = World(workers=1)
    w.ready_all()
    old = w.current(0)
    w.sup.worker_said(old, RECYCLE)
    w.sup.worker_exited(w.fake.spawned()[-1], Exit.BOOT_FAILED)
    assert w.log.named("reload_failed")
    w.fake.take()
    w.clock.now += RESPAWN_CAP - 1
    w.sup.worker_said(old, RECYCLE)
    assert w.fake.take() == []  # not a new successor every beat for a broken release
    w.clock.now += 1
    w.sup.worker_said(old, RECYCLE)
    assert w.fake.spawned() == [102]
    assert w.current(0) == old


# -- the I/O shell with a fake spawner callable ------------------------------------------------------


class FakeWorkerLauncher:
    """A spawner callable: records its arguments and reports ready at once, as a worker would."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []  # (socket fd, slot, parent pid)

    def __call__(self, settings: Settings, sock: socket.socket, slot: int, ready_w: int, parent_pid: int) -> int:
        self.calls.append((sock.fileno(), slot, parent_pid))
        os.write(ready_w, READY)
        return 5000 + slot


def test_worker_processes_give_each_slot_its_socket_and_a_ready_pipe() -> None:
    launcher = FakeWorkerLauncher()
    procs = WorkerProcesses(Settings(port=0), log=FakeLog(), spawner=launcher)
    socks = bind_slots("127.0.0.1", 0, 2, backlog=8)
    procs.socks = dict(enumerate(socks))
    procs.port = socks[0].getsockname()[1]
    try:
        assert procs.spawn(1) == 5001
        assert launcher.calls == [(socks[1].fileno(), 1, os.getpid())]
        assert os.read(procs.pipes[5001], 1) == READY
        assert procs.open_slot(2)
        assert procs.socks[2].getsockname()[1] == procs.port  # same reuseport group
        procs.close_slot(2)
        assert 2 not in procs.socks
        procs.forget(5001)
        assert procs.pipes == {}
    finally:
        for sock in socks:
            sock.close()


def test_master_reads_readiness_from_the_pipes_and_announces() -> None:
    log = FakeLog()
    master = Master(Settings(port=0, workers=2), log=log, spawn=FakeWorkerLauncher())
    socks = bind_slots("127.0.0.1", 0, 2, backlog=8)
    master.workers.socks = dict(enumerate(socks))
    master.workers.port = socks[0].getsockname()[1]
    try:
        master.supervisor.start(2)
        for _ in range(2):
            if not master.announced:
                master._wait()
        assert master.announced
        assert log.named("server_ready") == [{"host": "127.0.0.1", "port": master.port, "workers": 2}]
        master._publish()
        assert master.status().ready
        assert master.status().ready_workers == 2
    finally:
        for pid in list(master.workers.pipes):
            master.workers.forget(pid)
        for sock in socks:
            sock.close()


def test_the_status_shows_hung_workers_and_health_fails_while_one_is() -> None:
    now = time.monotonic()
    hung = MasterStatus(pid=1, slots=2, running=2, announced=True, hung=((0, 1),), hung_now=1, updated=now)
    assert not hung.live  # /healthz: 503 until the successor runs
    assert hung.ready  # /readyz: its socket's queue waits for the successor
    assert MasterStatus(pid=1, slots=2, running=2, hung=((0, 1),), updated=now).live
    code, _, body = AdminServer.answer(cast("AdminServer", StatusOnly(hung)), "/healthz")
    assert code == 503
    assert orjson.loads(body)["hung"] == {"now": 1, "by_slot": {"0": 1}}


class StatusOnly:
    """What AdminServer.answer reads of its server for /healthz and /readyz."""

    def __init__(self, status: MasterStatus) -> None:
        self.status = lambda: status
