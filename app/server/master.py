"""The master: binds one socket per worker slot, spawns and watches the workers.

Owns: the I/O around :mod:`app.server.supervision`, which makes every
decision.  That is: the listening sockets (kept open for the master's whole
life, so a worker crash or restart loses none of the connections queued in
a backlog), spawning workers and the pipe each one reports on (ready,
alive, recycle me; then its stack dump, logged as ``worker_stack_dump``),
reaping every child (it may be PID 1 in a container), the signal handlers,
the admin listener, and the loop that feeds the supervisor what happened:
signals (TERM/INT graceful stop, a second one immediate; QUIT immediate;
HUP zero-downtime reload; TTIN/TTOU one worker more or less), what the
workers said, exits and time.  The same loop writes the master's log
lines that wait for a stalled stdout (``app.logsink``): it never blocks
on its log.

Never: serves a connection, runs an event loop, or decides on its own when
to respawn, reload or stop.  Signal handlers only record the signal;
:meth:`Master.run`'s loop acts on it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from app import build
from app.config import Settings
from app.exits import Exit
from app.logsink import LogSink
from app.server import metrics
from app.server.admin import AdminServer, MasterStatus
from app.server.heartbeat import DUMP_SIGNAL
from app.server.listener import bind_slots, bind_socket
from app.server.supervision import (
    CRASH_LIMIT,
    CRASH_WINDOW,
    KILL_GRACE,
    MASTER_TURN,
    RESPAWN_CAP,
    RESPAWN_FIRST,
    Supervisor,
)

__all__ = [
    "CRASH_LIMIT",
    "CRASH_WINDOW",
    "HANDLED_SIGNALS",
    "KILL_GRACE",
    "RESPAWN_CAP",
    "RESPAWN_FIRST",
    "STOP_SIGNALS",
    "Master",
    "Spawner",
    "WorkerProcesses",
    "serve_master",
    "spawn_worker",
]

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
#: (``ready_w``: the write end of the worker's pipe, see ``app.server.heartbeat``)
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


class WorkerProcesses:
    """The supervisor's :class:`~app.server.supervision.Effects` on the real system.

    Resource handling: owns one listening socket per open slot (``socks[i]``
    is slot ``i``'s, removed when closed) and the read end of each worker's
    pipe (``pipes[pid]``, non-blocking), closed by :meth:`forget` at its end
    of file or once the worker is reaped.
    """

    def __init__(self, settings: Settings, *, log: Any, spawner: Spawner) -> None:
        self.settings = settings
        self.log = log
        self.spawner = spawner
        self.socks: dict[int, socket.socket] = {}
        self.pipes: dict[int, int] = {}
        self.dumps: dict[int, bytearray] = {}  # pid -> its stack dump, once asked for
        self.port = settings.port

    def spawn(self, slot: int) -> int:
        ready_r, ready_w = os.pipe()
        try:
            pid = self.spawner(self.settings, self.socks[slot], slot, ready_w, os.getpid())
        except OSError:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        os.set_blocking(ready_r, False)
        self.pipes[pid] = ready_r
        return pid

    def signal(self, pid: int, sig: signal.Signals) -> None:
        if sig == DUMP_SIGNAL:  # from now on the worker's pipe carries its stack dump
            self.dumps.setdefault(pid, bytearray())
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def open_slot(self, slot: int) -> bool:
        s = self.settings
        try:
            sock = bind_socket(s.host, self.port, backlog=s.backlog)
        except OSError as exc:
            self.log.error("bind_failed", host=s.host, port=self.port, error=str(exc))
            return False
        self.socks[slot] = sock
        return True

    def close_slot(self, slot: int) -> None:
        sock = self.socks.pop(slot, None)
        if sock is not None:
            sock.close()

    def read(self, pid: int) -> bytes | None:
        """What ``pid`` said since the last read (b"" if nothing, or its dump); None at end of file."""
        fd = self.pipes.get(pid)
        if fd is None:
            return None
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return b""
        except OSError:
            data = b""
        if not data:
            self.forget(pid)
            return None
        dump = self.dumps.get(pid)
        if dump is None:
            return data
        dump += data
        return b""

    def forget(self, pid: int) -> None:
        """The worker ``pid`` is gone: log its stack dump if it wrote one, close its pipe."""
        fd = self.pipes.pop(pid, None)
        dump = self.dumps.pop(pid, None)
        if fd is not None:
            while dump is not None:  # what it wrote before it died is all there
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                dump += data
            os.close(fd)
        if dump is not None:
            # Beats written before the dump signal may lead it; no dump starts with one.
            text = bytes(dump).lstrip(b".RM").decode("utf-8", "replace")
            self.log.error("worker_stack_dump", pid=pid, stack=text)


class Master:
    """Runs the worker processes until stopped; :meth:`run` returns the exit code."""

    def __init__(
        self, settings: Settings, *, log: Any, spawn: Spawner = spawn_worker, sink: LogSink | None = None
    ) -> None:
        self.settings = settings
        self.log = log
        self.sink = sink  # the master's log sink, written by this loop while lines wait
        self.workers = WorkerProcesses(settings, log=log, spawner=spawn)
        self.supervisor = Supervisor(
            self.workers, log=log, graceful_timeout=settings.graceful_timeout, worker_timeout=settings.worker_timeout
        )
        self.stop_signalled = False  # set by the signal handler itself: readiness drops first
        self.admin: AdminServer | None = None
        self.metrics_dir: metrics.MultiprocDir | None = None
        self.log_drops: metrics.LogDrops | None = None
        self._status = MasterStatus(pid=os.getpid())
        self._signals: collections.deque[int] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()

    @property
    def port(self) -> int:
        """The Zen port: the configured one, or the one the kernel chose for port 0."""
        return self.workers.port

    @property
    def stopping(self) -> bool:
        """A stop is under way (acted on, not merely signalled)."""
        return self.supervisor.stopping

    @property
    def announced(self) -> bool:
        """Every slot was ready once (``server_ready`` logged)."""
        return self.supervisor.announced

    @announced.setter
    def announced(self, value: bool) -> None:
        self.supervisor.announced = value

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
        self.workers.port = socks[0].getsockname()[1]
        self.workers.socks = dict(enumerate(socks))
        try:
            if not self._open_admin():
                return Exit.BOOT_FAILED
            return self._run()
        finally:
            self._close_admin()

    def _run(self) -> int:
        s, sup = self.settings, self.supervisor
        self._install_signals()
        self.log.info(
            "master_started",
            pid=os.getpid(), host=s.host, port=self.port, workers=s.workers,
            backlog=s.backlog, max_connections=s.max_connections,
            rlimit_nofile=_nofile(), build=build.status(),
        )  # fmt: skip
        sup.start(s.workers)
        while not sup.done:
            self._publish()
            self._wait()
            while self._signals:
                sup.handle_signal(self._signals.popleft())
            self._reap()
            sup.tick()
        self.log.info("master_stopped", exit_code=sup.exit_code)
        return sup.exit_code

    def _wait(self) -> None:
        """Sleep until a signal, a worker's byte, stdout writable for waiting lines, a timer, or MASTER_TURN."""
        deadline = self.supervisor.deadline()
        timeout = MASTER_TURN if deadline is None else min(MASTER_TURN, max(0.0, deadline - time.monotonic()))
        watched = {fd: pid for pid, fd in self.workers.pipes.items()}
        sink = self.sink
        writing = [sink.fd] if sink is not None and sink.pending() else []
        try:
            readable, writable, _ = select.select([self._wake_r, *watched], writing, [], timeout)
        except InterruptedError:
            return
        if writable and sink is not None:
            sink.flush()
        for fd in readable:
            if fd == self._wake_r:
                os.read(fd, 512)
            else:
                self._on_pipe(watched[fd])

    def _on_pipe(self, pid: int) -> None:
        data = self.workers.read(pid)
        if data and self.supervisor.worker_said(pid, data):  # None: it died, _reap() handles it
            workers = len(self.supervisor.slots)
            self.log.info("server_ready", host=self.settings.host, port=self.port, workers=workers)

    def _reap(self) -> None:
        """Reap every exited child, ours or not (the master may be PID 1 in a container)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            self.workers.forget(pid)
            if pid not in self.supervisor.procs:
                self.log.info("reaped_orphan", pid=pid, code=code)
                continue
            if self.metrics_dir is not None:
                metrics.mark_worker_dead(self.metrics_dir, pid)
            self.supervisor.worker_exited(pid, code)

    # -- the admin listener (metrics, health) ---------------------------------------

    def _open_admin(self) -> bool:
        """Start /metrics, /healthz, /readyz when ADMIN_PORT is set; False if it cannot bind."""
        s = self.settings
        if not s.admin_port:
            return True
        self.metrics_dir = metrics.prepare_multiproc_dir(s)  # before any worker imports prometheus-client
        registry = metrics.master_registry(self.metrics_dir, self.status)
        self.log_drops = metrics.LogDrops("master")
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
        sup = self.supervisor
        running, ready = sup.counts()
        dropped = self.sink.dropped_total if self.sink is not None else 0
        if self.log_drops is not None:
            self.log_drops.update(dropped)
        self._status = MasterStatus(
            pid=os.getpid(),
            slots=len(sup.slots),
            running=running,
            ready_workers=ready,
            restarts=sup.restarts,
            recycles=sup.recycles,
            hung=tuple(sorted(sup.hung.items())),
            hung_now=sup.hung_now(),
            announced=sup.announced,
            stopping=sup.stopping or self.stop_signalled,
            updated=time.monotonic(),
        )

    def status(self) -> MasterStatus:
        """The master as the admin listener sees it (called from its thread)."""
        st = self._status
        if (self.stop_signalled or self.supervisor.stopping) and not st.stopping:
            return dataclasses.replace(st, stopping=True)
        return st


def _nofile() -> int:
    import resource  # noqa: PLC0415

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def serve_master(settings: Settings) -> int:
    """Process-wide start-up of the master (logging), then run it; returns the exit code."""
    from app import logs  # noqa: PLC0415

    logs.configure(settings)
    return Master(settings, log=logs.get_logger(role="master"), sink=logs.sink()).run()
