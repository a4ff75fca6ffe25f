"""The master's decisions without processes: slots, back-off, crash loops, reloads, scaling, stops, hangs.

Owns: the slot table (which worker serves each slot, which ones are
retiring), the respawn schedule (exponential back-off with jitter), the
crash-loop limit, and what each signal means: the order of a zero-downtime
reload, adding and removing a slot, the graceful and the immediate stop,
the SIGKILL deadline.  And what the workers say on their pipes
(``app.server.heartbeat``): ready, alive, or asking to be recycled; a
worker silent for WORKER_TIMEOUT is hung: its stack is dumped, it is
killed, and its slot respawned like after a crash.

Never: forks, sends a signal, binds, reads the clock or sleeps by itself.
It acts only through an :class:`Effects` (the master's real processes and
sockets, or a test's fake) and reads the time from the clock it is given,
so each decision can be tested without a process.  The master's loop
feeds it what happened (:meth:`Supervisor.handle_signal`,
:meth:`~Supervisor.worker_ready`, :meth:`~Supervisor.worker_exited`,
:meth:`~Supervisor.tick`) and sleeps until :meth:`~Supervisor.deadline`.
"""

from __future__ import annotations

import collections
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from app.exits import Exit
from app.server.heartbeat import DUMP_SIGNAL, READY, RECYCLE

#: A slot that crashes CRASH_LIMIT times within CRASH_WINDOW seconds stops
#: the master (exit code ``Exit.CRASH_LOOP``): a process manager above
#: should see a broken release, not a silent restart loop.
CRASH_LIMIT: Final = 5
CRASH_WINDOW: Final = 60.0
#: Respawn delay: RESPAWN_FIRST * 2**(recent crashes - 1), capped, times a
#: jitter in JITTER, so slots that crash together do not respawn in step.
RESPAWN_FIRST: Final = 0.1
RESPAWN_CAP: Final = 10.0
JITTER: Final = (0.5, 1.0)
#: After GRACEFUL_TIMEOUT (or an immediate stop) workers get this long to
#: exit before SIGKILL.
KILL_GRACE: Final = 5.0
#: A hung worker gets this long to write its stack dump (and end) before SIGKILL.
DUMP_GRACE: Final = 1.0
#: A worker not yet ready beats only once its loop runs: until then it may be
#: silent this long (at least), the time a fresh interpreter may take to
#: import everything on a loaded host.
BOOT_GRACE: Final = 30.0
#: The longest the master sleeps between two turns (its select() timeout).
MASTER_TURN: Final = 1.0
#: A gap between two turns of the master longer than this was a pause of the
#: whole host (a VM freeze, a stopped container, a swap storm): the workers
#: stood still as well, so that gap is not counted as their silence.
HOST_PAUSE: Final = 3.0

#: Returns the current time in seconds (``time.monotonic`` in production).
Clock = Callable[[], float]
#: jitter(low, high) -> a factor in [low, high] (``random.uniform`` in production).
Jitter = Callable[[float, float], float]


class Effects(Protocol):
    """What the supervisor asks of the world: the master's processes and sockets, or a fake."""

    def spawn(self, slot: int) -> int:
        """Start a worker on ``slot``'s socket and return its pid; raises OSError if it cannot."""

    def signal(self, pid: int, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker ``pid`` (one that already exited is no error)."""

    def open_slot(self, slot: int) -> bool:
        """Bind the socket of a new slot ``slot``; False (and logged) if it cannot."""

    def close_slot(self, slot: int) -> None:
        """Close the master's descriptor of ``slot``'s socket."""


def respawn_delay(crashes: int, jitter: float) -> float:
    """The delay before respawning a slot that crashed ``crashes`` times in the window."""
    return min(RESPAWN_CAP, RESPAWN_FIRST * 2.0 ** (crashes - 1)) * jitter


@dataclass(eq=False)
class Slot:
    """One listening socket (by index) and the worker that accepts on it."""

    index: int
    current: Proc | None = None
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    respawn_at: float | None = None
    recycle_after: float = 0.0  # no recycling before (a failed successor backs off)

    def count_crash(self, now: float) -> int:
        """Record a crash at ``now``; the number of crashes within CRASH_WINDOW."""
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > CRASH_WINDOW:
            self.crashes.popleft()
        return len(self.crashes)


@dataclass(eq=False)
class Proc:
    """A worker process the master started."""

    pid: int
    slot: Slot
    last_seen: float  # the worker's last sign of life (or its spawn)
    ready: bool = False
    stopping: bool = False
    hung_at: float | None = None  # when it was declared hung (its stack dump asked for)
    killed: bool = False  # SIGKILLed as hung


class Supervisor:
    """The slot table and every decision of the master; acts through :class:`Effects`.

    ``log`` is a structlog-style logger: the event names are the master's
    (``worker_spawned``, ``worker_exited``, ``crash_loop``...).
    """

    def __init__(
        self,
        effects: Effects,
        *,
        log: Any,
        graceful_timeout: float,
        worker_timeout: float = 0.0,
        clock: Clock = time.monotonic,
        jitter: Jitter = random.uniform,
    ) -> None:
        self.effects = effects
        self.log = log
        self.graceful_timeout = graceful_timeout
        self.worker_timeout = worker_timeout  # 0: never declare a worker hung
        self.clock = clock
        self.jitter = jitter
        self.slots: list[Slot] = []
        self.procs: dict[int, Proc] = {}
        self.stopping = False
        self.quitting = False
        self.kill_at: float | None = None
        self.exit_code: int = Exit.OK
        self.announced = False  # every slot was ready once (server_ready)
        self.restarts = 0  # crashed workers respawned
        self.recycles = 0  # workers replaced after MAX_REQUESTS
        self.hung: dict[int, int] = {}  # slot -> workers declared hung there
        self._last_turn = clock()

    @property
    def done(self) -> bool:
        """Stopping and every worker is gone: the master may exit with :attr:`exit_code`."""
        return self.stopping and not self.procs

    def start(self, workers: int) -> None:
        """Spawn one worker per slot; slots ``0..workers-1`` have their sockets already."""
        for index in range(workers):
            self.slots.append(Slot(index))
        for slot in self.slots:
            self._spawn(slot)

    def counts(self) -> tuple[int, int]:
        """(slots with a live worker, slots whose worker is ready), for the status."""
        current = [sl.current for sl in self.slots if sl.current is not None]
        return len(current), sum(1 for p in current if p.ready)

    def hung_now(self) -> int:
        """Workers declared hung and not reaped yet."""
        return sum(1 for p in self.procs.values() if p.hung_at is not None)

    # -- time ----------------------------------------------------------------------

    def deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (a respawn, a SIGKILL, a silence), or None."""
        timers = [t for t in (self.kill_at, *(sl.respawn_at for sl in self.slots)) if t is not None]
        if self.worker_timeout:
            timers.extend(self._silence_deadline(p) for p in self.procs.values() if not p.killed)
        return min(timers) if timers else None

    def tick(self) -> None:
        """Respawn the slots whose back-off is over; SIGKILL every worker past the kill deadline.

        And declare hung every worker silent for WORKER_TIMEOUT (the master
        calls this once per turn, at least every :data:`MASTER_TURN`).
        """
        now = self.clock()
        self._watch_silences(now)
        for slot in self.slots:
            if slot.respawn_at is not None and now >= slot.respawn_at and not self.stopping:
                slot.respawn_at = None
                self.restarts += 1
                self._spawn(slot)
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            for proc in self.procs.values():
                self.log.warning("worker_killed", pid=proc.pid, slot=proc.slot.index)
                self.effects.signal(proc.pid, signal.SIGKILL)

    # -- signals -------------------------------------------------------------------

    def handle_signal(self, sig: int) -> None:
        """Act on a signal the master's handler recorded (SIGCHLD: the master reaps)."""
        match sig:
            case signal.SIGTERM | signal.SIGINT:
                self.handle_term(signal.Signals(sig).name)
            case signal.SIGQUIT:
                self.handle_quit()
            case signal.SIGHUP:
                self.handle_hup()
            case signal.SIGTTIN:
                self.handle_ttin()
            case signal.SIGTTOU:
                self.handle_ttou()

    def handle_term(self, name: str) -> None:
        """Graceful stop; a second TERM/INT is an immediate one."""
        if self.stopping:
            self.handle_quit()
            return
        self.log.info("stopping", signal=name, graceful_timeout=self.graceful_timeout)
        self._begin_stop(Exit.OK)

    def handle_quit(self) -> None:
        """Immediate stop: workers abort their connections and exit."""
        if self.quitting:
            return
        if not self.stopping:
            self._begin_stop(Exit.OK)
        self.quitting = True
        self.log.warning("stopping_now", workers=len(self.procs))
        for proc in self.procs.values():
            self.effects.signal(proc.pid, signal.SIGQUIT)
        self.kill_at = self.clock() + KILL_GRACE

    def handle_hup(self) -> None:
        """Zero-downtime reload: a new worker per slot; each old one drains once its successor is ready."""
        if self.stopping:
            return
        self.log.info("reloading", workers=len(self.slots))
        for slot in self.slots:
            slot.respawn_at = None
            self._spawn(slot, replace=slot.current is not None)

    def handle_ttin(self) -> None:
        """One worker more, on a new socket in the same reuseport group."""
        if self.stopping or not self.effects.open_slot(len(self.slots)):
            return
        slot = Slot(len(self.slots))
        self.slots.append(slot)
        self.log.info("worker_added", slot=slot.index, workers=len(self.slots))
        self._spawn(slot)

    def handle_ttou(self) -> None:
        """One worker less (never below one): the highest slot's socket leaves the group once drained."""
        if self.stopping or len(self.slots) <= 1:
            return
        slot = self.slots.pop()
        slot.respawn_at = None
        # Close ours first: the retiring worker, holding the last descriptor,
        # accepts what is queued before it closes (see Worker._stop_accepting).
        self.effects.close_slot(slot.index)
        self.log.info("worker_removed", slot=slot.index, workers=len(self.slots))
        for proc in list(self.procs.values()):
            if proc.slot is slot:
                self._stop_proc(proc)

    # -- workers -------------------------------------------------------------------

    def worker_said(self, pid: int, data: bytes) -> bool:
        """``pid`` wrote ``data`` on its pipe: alive, maybe ready, maybe asking to be recycled.

        True when that makes every slot ready for the first time (``server_ready``).
        """
        proc = self.procs.get(pid)
        if proc is None or proc.hung_at is not None:  # a hung worker's bytes are its stack dump
            return False
        proc.last_seen = self.clock()
        announce = READY in data and self.worker_ready(pid)
        if RECYCLE in data:
            self.worker_recycle(pid)
        return announce

    def worker_recycle(self, pid: int) -> None:
        """``pid`` answered its MAX_REQUESTS: a successor on its slot, through the reload path."""
        proc = self.procs.get(pid)
        if proc is None or self.stopping or proc.stopping or not proc.ready:
            return
        slot = proc.slot
        if slot.current is not proc or slot not in self.slots or self.clock() < slot.recycle_after:
            return
        if any(p.slot is slot and p is not proc and not p.stopping for p in self.procs.values()):
            return  # a successor is on its way (the worker repeats its request every beat)
        self.recycles += 1
        self.log.info("worker_recycling", slot=slot.index, pid=pid)
        self._spawn(slot, replace=True)

    def worker_ready(self, pid: int) -> bool:
        """``pid`` reported ready; True when that makes every slot ready for the first time."""
        proc = self.procs.get(pid)
        if proc is None:
            return False
        proc.ready = True
        proc.last_seen = self.clock()
        slot = proc.slot
        old = slot.current
        if old is not proc:  # a reload: the new worker takes over, the old one drains
            slot.current = proc
            if old is not None and old.pid in self.procs:
                self._stop_proc(old)
        if self.stopping or slot not in self.slots:
            self._stop_proc(proc)
        if self.announced or not all(sl.current and sl.current.ready for sl in self.slots):
            return False
        self.announced = True
        return True

    def worker_exited(self, pid: int, code: int) -> None:
        """``pid`` was reaped with exit code ``code``: respawn, or stop on a boot failure or crash loop."""
        proc = self.procs.pop(pid, None)
        if proc is None:
            return
        slot = proc.slot
        expected = proc.stopping or self.stopping
        log = self.log.info if expected and code == 0 else self.log.warning
        log("worker_exited", pid=proc.pid, slot=slot.index, code=code, expected=expected)
        if expected or slot not in self.slots:
            return
        if slot.current is not proc:  # a reload's new worker died before taking over
            self.log.error("reload_failed", slot=slot.index, pid=proc.pid, code=code)
            slot.recycle_after = self.clock() + RESPAWN_CAP  # a broken release: no successor every beat
            return
        slot.current = None
        if not proc.ready and code in (Exit.BOOT_FAILED, Exit.CONFIG):
            self.log.error("worker_boot_failed", slot=slot.index, code=code)
            self._begin_stop(code)
            return
        self._crashed(slot)

    # -- decisions -------------------------------------------------------------------

    def _begin_stop(self, code: int) -> None:
        self.stopping = True  # first: the master's status says "not ready" before the listeners close
        self.exit_code = self.exit_code or code
        for slot in self.slots:
            slot.respawn_at = None
            self.effects.close_slot(slot.index)
        for proc in list(self.procs.values()):
            self._stop_proc(proc)
        self.kill_at = self.clock() + self.graceful_timeout + KILL_GRACE

    def _stop_proc(self, proc: Proc) -> None:
        proc.stopping = True
        self.effects.signal(proc.pid, signal.SIGTERM)

    def _spawn(self, slot: Slot, *, replace: bool = False) -> None:
        try:
            pid = self.effects.spawn(slot.index)
        except OSError as exc:
            self.log.error("spawn_failed", slot=slot.index, error=str(exc))
            if not replace:
                self._crashed(slot)
            return
        proc = Proc(pid, slot, last_seen=self.clock())
        self.procs[pid] = proc
        if not replace:
            slot.current = proc
        self.log.info("worker_spawned", pid=pid, slot=slot.index, reload=replace)

    def _crashed(self, slot: Slot) -> None:
        now = self.clock()
        crashes = slot.count_crash(now)
        if crashes >= CRASH_LIMIT:
            self.log.error("crash_loop", slot=slot.index, crashes=crashes, window=CRASH_WINDOW)
            self._begin_stop(Exit.CRASH_LOOP)
            return
        delay = respawn_delay(crashes, self.jitter(*JITTER))
        slot.respawn_at = now + delay
        self.log.warning("worker_respawn_scheduled", slot=slot.index, delay=round(delay, 3), crashes=crashes)

    # -- silences: hung workers ----------------------------------------------------------

    def _silence_deadline(self, proc: Proc) -> float:
        if proc.hung_at is not None:
            return proc.hung_at + DUMP_GRACE
        limit = self.worker_timeout if proc.ready else max(self.worker_timeout, BOOT_GRACE)
        return proc.last_seen + limit

    def _watch_silences(self, now: float) -> None:
        gap, self._last_turn = now - self._last_turn, now
        if not self.worker_timeout:
            return
        for proc in list(self.procs.values()):
            if gap > HOST_PAUSE:  # the host stood still, the workers too
                proc.last_seen += gap
            if proc.killed or now < self._silence_deadline(proc):
                continue
            if proc.hung_at is None:
                self._declare_hung(proc, now)
            else:
                proc.killed = True
                self.log.warning("worker_killed", pid=proc.pid, slot=proc.slot.index, reason="hung")
                self.effects.signal(proc.pid, signal.SIGKILL)

    def _declare_hung(self, proc: Proc, now: float) -> None:
        """Ask for the stack dump (which ends the worker); SIGKILL follows after DUMP_GRACE."""
        slot = proc.slot.index
        proc.hung_at = now
        self.hung[slot] = self.hung.get(slot, 0) + 1
        silent = round(now - proc.last_seen, 3)
        self.log.error("worker_hung", slot=slot, pid=proc.pid, silent=silent, timeout=self.worker_timeout)
        self.effects.signal(proc.pid, DUMP_SIGNAL)
        self.effects.signal(proc.pid, signal.SIGCONT)  # a stopped worker must run to dump (and then ends)
