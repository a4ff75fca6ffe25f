"""The master: binds one socket per worker slot, spawns and watches the workers.

Owns: the listening sockets (kept open for the master's whole life, so a
worker crash or restart loses none of the connections queued in a
backlog), spawning workers, reaping every child (it may be PID 1 in a
container), respawning with exponential back-off and jitter, the crash-loop
limit, and the signals: TERM/INT graceful stop (a second one: immediate),
QUIT immediate stop, HUP zero-downtime reload, TTIN/TTOU one worker more or
less.

Never: serves a connection or runs an event loop.  Signal handlers only
record the signal; :meth:`Master.run`'s loop acts on it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from app.config import Settings
from app.exits import Exit
from app.server import metrics
from app.server.admin import AdminServer, MasterStatus
from app.server.listener import bind_slots, bind_socket

#: A slot that crashes CRASH_LIMIT times within CRASH_WINDOW seconds stops
#: the master (exit code ``Exit.CRASH_LOOP``): a process manager above
#: should see a broken release, not a silent restart loop.
CRASH_LIMIT: Final = 5
CRASH_WINDOW: Final = 60.0
#: Respawn delay: RESPAWN_FIRST * 2**(recent crashes - 1), capped, times a
#: jitter in [0.5, 1], so slots that crash together do not respawn in step.
RESPAWN_FIRST: Final = 0.1
RESPAWN_CAP: Final = 10.0
#: After GRACEFUL_TIMEOUT (or an immediate stop) workers get this long to
#: exit before SIGKILL.
KILL_GRACE: Final = 5.0

HANDLED_SIGNALS: Final = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)
#: Signals that begin a stop: /readyz answers 503 from the moment one arrives.
STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})

#: spawn(settings, sock, slot, ready_w, parent_pid) -> pid
Spawner = Callable[[Settings, socket.socket, int, int, int], int]


def spawn_worker(settings: Settings, sock: socket.socket, slot: int, ready_w: int, parent_pid: int) -> int:
    """Start ``python -m app worker`` on ``sock``; a fresh interpreter, so HUP loads new code.

    The worker reads its settings from the same environment (and ``.env``)
    as the master did.
    """
    del settings  # the worker loads them itself, like the master did
    argv = [
        sys.executable, "-m", "app", "worker",
        "--fd", str(sock.fileno()), "--slot", str(slot),
        "--ready-fd", str(ready_w), "--parent", str(parent_pid),
    ]  # fmt: skip
    sock.set_inheritable(True)
    os.set_inheritable(ready_w, True)
    try:
        # The worker inherits the environment as is; config.load() reads it.
        return os.posix_spawn(sys.executable, argv, os.environ)
    finally:
        sock.set_inheritable(False)


@dataclass(eq=False)
class Slot:
    """One listening socket and the worker that accepts on it."""

    index: int
    sock: socket.socket
    current: Proc | None = None
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    respawn_at: float | None = None


@dataclass(eq=False)
class Proc:
    """A worker process the master started."""

    pid: int
    slot: Slot
    ready_r: int
    ready: bool = False
    stopping: bool = False


class Master:
    """Runs the worker processes until stopped; :meth:`run` returns the exit code."""

    def __init__(self, settings: Settings, *, log: Any, spawn: Spawner = spawn_worker) -> None:
        self.settings = settings
        self.log = log
        self.spawn = spawn
        self.slots: list[Slot] = []
        self.procs: dict[int, Proc] = {}
        self.port = settings.port
        self.stopping = False
        self.quitting = False
        self.kill_at: float | None = None
        self.exit_code: int = Exit.OK
        self.announced = False
        self.restarts = 0  # crashed workers respawned
        self.stop_signalled = False  # set by the signal handler itself: readiness drops first
        self.admin: AdminServer | None = None
        self.metrics_dir: metrics.MultiprocDir | None = None
        self._status = MasterStatus(pid=os.getpid())
        self._signals: collections.deque[int] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()

    # -- signals: record only --------------------------------------------------

    def _record(self, signum: int, _frame: object) -> None:
        if signum in STOP_SIGNALS:
            self.stop_signalled = True
        self._signals.append(signum)

    def _install_signals(self) -> None:
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record)

    # -- main loop ---------------------------------------------------------------

    def run(self) -> int:
        """Bind, spawn, and act on signals and exits until every worker is gone."""
        s = self.settings
        try:
            socks = bind_slots(s.host, s.port, s.workers, backlog=s.backlog)
        except OSError as exc:
            self.log.error("bind_failed", host=s.host, port=s.port, error=str(exc))
            return Exit.BOOT_FAILED
        self.port = socks[0].getsockname()[1]
        self.slots = [Slot(i, sock) for i, sock in enumerate(socks)]
        try:
            if not self._open_admin():
                return Exit.BOOT_FAILED
            return self._run()
        finally:
            self._close_admin()

    def _run(self) -> int:
        s = self.settings
        self._install_signals()
        self.log.info(
            "master_started",
            pid=os.getpid(), host=s.host, port=self.port, workers=s.workers,
            backlog=s.backlog, max_connections=s.max_connections,
            rlimit_nofile=_nofile(),
        )  # fmt: skip
        for slot in self.slots:
            self._spawn(slot)
        while self.procs or not self.stopping:
            self._publish()
            self._wait()
            self._handle_signals()
            self._reap()
            self._run_timers()
        self.log.info("master_stopped", exit_code=self.exit_code)
        return self.exit_code

    def _wait(self) -> None:
        timers = [t for t in (self.kill_at, *(sl.respawn_at for sl in self.slots)) if t is not None]
        timeout = max(0.0, min(timers) - time.monotonic()) if timers else 1.0
        readers = [self._wake_r] + [p.ready_r for p in self.procs.values() if not p.ready]
        try:
            ready, _, _ = select.select(readers, [], [], min(timeout, 1.0))
        except InterruptedError:
            return
        for fd in ready:
            if fd == self._wake_r:
                os.read(fd, 512)
            else:
                self._on_ready_pipe(fd)

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.popleft()
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.handle_term(signal.Signals(sig).name)
            elif sig == signal.SIGQUIT:
                self.handle_quit()
            elif sig == signal.SIGHUP:
                self.handle_hup()
            elif sig == signal.SIGTTIN:
                self.handle_ttin()
            elif sig == signal.SIGTTOU:
                self.handle_ttou()

    def _run_timers(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.respawn_at is not None and now >= slot.respawn_at and not self.stopping:
                slot.respawn_at = None
                self.restarts += 1
                self._spawn(slot)
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            for proc in self.procs.values():
                self.log.warning("worker_killed", pid=proc.pid, slot=proc.slot.index)
                _signal(proc.pid, signal.SIGKILL)

    # -- actions -----------------------------------------------------------------

    def handle_term(self, name: str) -> None:
        """Graceful stop; a second TERM/INT is an immediate one."""
        if self.stopping:
            self.handle_quit()
            return
        self.log.info("stopping", signal=name, graceful_timeout=self.settings.graceful_timeout)
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
            _signal(proc.pid, signal.SIGQUIT)
        self.kill_at = time.monotonic() + KILL_GRACE

    def handle_hup(self) -> None:
        """Zero-downtime reload: a new worker per slot, then the old ones drain."""
        if self.stopping:
            return
        self.log.info("reloading", workers=len(self.slots))
        for slot in self.slots:
            slot.respawn_at = None
            self._spawn(slot, replace=slot.current is not None)

    def handle_ttin(self) -> None:
        """One worker more, on a new socket in the same reuseport group."""
        if self.stopping:
            return
        s = self.settings
        try:
            sock = bind_socket(s.host, self.port, backlog=s.backlog)
        except OSError as exc:
            self.log.error("bind_failed", host=s.host, port=self.port, error=str(exc))
            return
        slot = Slot(len(self.slots), sock)
        self.slots.append(slot)
        self.log.info("worker_added", slot=slot.index, workers=len(self.slots))
        self._spawn(slot)

    def handle_ttou(self) -> None:
        """One worker less (never below one): its socket leaves the group once drained."""
        if self.stopping or len(self.slots) <= 1:
            return
        slot = self.slots.pop()
        slot.respawn_at = None
        # Close ours first: the retiring worker, holding the last descriptor,
        # accepts what is queued before it closes (see Worker._stop_accepting).
        slot.sock.close()
        self.log.info("worker_removed", slot=slot.index, workers=len(self.slots))
        for proc in self.procs.values():
            if proc.slot is slot:
                self._stop_proc(proc)

    def _begin_stop(self, code: int) -> None:
        self.stop_signalled = True  # not ready before the listeners close
        self.stopping = True
        self.exit_code = self.exit_code or code
        for slot in self.slots:
            slot.respawn_at = None
            slot.sock.close()
        for proc in self.procs.values():
            self._stop_proc(proc)
        self.kill_at = time.monotonic() + self.settings.graceful_timeout + KILL_GRACE

    def _stop_proc(self, proc: Proc) -> None:
        proc.stopping = True
        _signal(proc.pid, signal.SIGTERM)

    def _spawn(self, slot: Slot, *, replace: bool = False) -> None:
        ready_r, ready_w = os.pipe()
        try:
            pid = self.spawn(self.settings, slot.sock, slot.index, ready_w, os.getpid())
        except OSError as exc:
            os.close(ready_r)
            self.log.error("spawn_failed", slot=slot.index, error=str(exc))
            if not replace:
                self._crashed(slot)
            return
        finally:
            os.close(ready_w)
        proc = Proc(pid, slot, ready_r)
        self.procs[pid] = proc
        if not replace:
            slot.current = proc
        self.log.info("worker_spawned", pid=pid, slot=slot.index, reload=replace)

    def _on_ready_pipe(self, fd: int) -> None:
        proc = next((p for p in self.procs.values() if p.ready_r == fd), None)
        try:
            data = os.read(fd, 1)
        except OSError:
            data = b""
        if proc is None or not data:
            return  # the worker died before it was ready: _reap() handles it
        proc.ready = True
        slot = proc.slot
        old = slot.current
        if old is not proc:  # a reload: the new worker takes over, the old one drains
            slot.current = proc
            if old is not None and old.pid in self.procs:
                self._stop_proc(old)
        if self.stopping or slot not in self.slots:
            self._stop_proc(proc)
        if not self.announced and all(sl.current and sl.current.ready for sl in self.slots):
            self.announced = True
            self.log.info("server_ready", host=self.settings.host, port=self.port, workers=len(self.slots))

    # -- children -------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            proc = self.procs.pop(pid, None)
            if proc is None:
                self.log.info("reaped_orphan", pid=pid, code=code)
                continue
            os.close(proc.ready_r)
            if self.metrics_dir is not None:
                metrics.mark_worker_dead(self.metrics_dir, pid)
            self._exited(proc, code)

    def _exited(self, proc: Proc, code: int) -> None:
        slot = proc.slot
        expected = proc.stopping or self.stopping
        log = self.log.info if expected and code == 0 else self.log.warning
        log("worker_exited", pid=proc.pid, slot=slot.index, code=code, expected=expected)
        if expected or slot not in self.slots:
            return
        if slot.current is not proc:  # a reload's new worker died before taking over
            self.log.error("reload_failed", slot=slot.index, pid=proc.pid, code=code)
            return
        slot.current = None
        if not proc.ready and code in (Exit.BOOT_FAILED, Exit.CONFIG):
            self.log.error("worker_boot_failed", slot=slot.index, code=code)
            self._begin_stop(code)
            return
        self._crashed(slot)

    def _crashed(self, slot: Slot) -> None:
        now = time.monotonic()
        slot.crashes.append(now)
        while slot.crashes and now - slot.crashes[0] > CRASH_WINDOW:
            slot.crashes.popleft()
        if len(slot.crashes) >= CRASH_LIMIT:
            self.log.error("crash_loop", slot=slot.index, crashes=len(slot.crashes), window=CRASH_WINDOW)
            self._begin_stop(Exit.CRASH_LOOP)
            return
        delay = min(RESPAWN_CAP, RESPAWN_FIRST * 2 ** (len(slot.crashes) - 1))
        delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not cryptography
        slot.respawn_at = now + delay
        self.log.warning("worker_respawn_scheduled", slot=slot.index, delay=round(delay, 3), crashes=len(slot.crashes))

    # -- the admin listener (metrics, health) ---------------------------------------

    def _open_admin(self) -> bool:
        """Start /metrics, /healthz, /readyz when ADMIN_PORT is set; False if it cannot bind."""
        s = self.settings
        if not s.admin_port:
            return True
        self.metrics_dir = metrics.prepare_multiproc_dir(s)  # before any worker imports prometheus-client
        registry = metrics.master_registry(self.metrics_dir, self.status)
        try:
            self.admin = AdminServer(s.admin_host, s.admin_port, self.status, registry, log=self.log)
        except OSError as exc:
            self.log.error("bind_failed", listener="admin", host=s.admin_host, port=s.admin_port, error=str(exc))
            return False
        self._publish()
        self.admin.start()
        host, port = self.admin.address
        self.log.info("admin_listening", host=host, port=port, metrics_dir=str(self.metrics_dir.path))
        return True

    def _close_admin(self) -> None:
        if self.admin is not None:
            self.admin.close()
        if self.metrics_dir is not None:
            metrics.remove_multiproc_dir(self.metrics_dir)

    def _publish(self) -> None:
        """Replace the snapshot the admin thread reads (one atomic attribute store)."""
        current = [sl.current for sl in self.slots if sl.current is not None]
        self._status = MasterStatus(
            pid=os.getpid(),
            slots=len(self.slots),
            running=len(current),
            ready_workers=sum(1 for p in current if p.ready),
            restarts=self.restarts,
            announced=self.announced,
            stopping=self.stopping or self.stop_signalled,
            updated=time.monotonic(),
        )

    def status(self) -> MasterStatus:
        """The master as the admin listener sees it (called from its thread)."""
        st = self._status
        if self.stop_signalled and not st.stopping:
            return dataclasses.replace(st, stopping=True)
        return st


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _nofile() -> int:
    import resource  # noqa: PLC0415

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def serve_master(settings: Settings) -> int:
    """Process-wide start-up of the master (logging), then run it; returns the exit code."""
    from app import logs  # noqa: PLC0415

    logs.configure(settings)
    return Master(settings, log=logs.get_logger(role="master")).run()
