"""Prometheus metrics: names, the multiprocess directory, and flushing the workers' counters.

Owns: every metric name and help text; the prometheus-client multiprocess
directory (the master creates it, or cleans a given one, before any worker
starts, and removes the one it created at exit); moving a worker's
plain-int counters (``stats.Stats``) into prometheus-client values; and
the registry the admin listener renders (every worker's files plus the
master's own state).

Never: touches a prometheus value per request.  The worker's hot path only
adds to plain ints; :meth:`WorkerMetrics.flush` runs from the worker's
sweep timer (at most once a second) and at its exit, and a closing
connection only drops its duration into a plain bucket array.  Never
serves HTTP (``admin``) or reads the environment (``config``): it *writes*
``PROMETHEUS_MULTIPROC_DIR`` for the workers it will spawn, because
prometheus-client reads it when it is first imported.

Resource handling: one set of ``*_<pid>.db`` files per worker process ever
started (counters of dead workers must keep counting); the live-gauge file
of a worker is removed when the master reaps it (``mark_worker_dead``).
"""

from __future__ import annotations

import bisect
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from app import logs
from app.core import zen
from app.core.policy import CloseReason

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from app.config import Settings

ENV_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"

#: Connection lifetimes: a churn client lives milliseconds, a pooled one minutes.
DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))
#: How late the worker's sweep timer fires: the queueing delay a question
#: arriving now would see before its read is handled (libuv timers have 1 ms
#: resolution, so the first buckets mean "not loaded").
LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, float("inf"))


def _unknown_mark() -> int | bytes:
    """A byte of the unknown answer that no known answer holds (the table has one: ``E``).

    It occurs once in the unknown answer, so ``out.count(UNKNOWN)`` is exact
    (no occurrence can straddle two answers).  It is an ``int`` because
    ``int in bytes`` is a bare ``memchr``, far cheaper per batch than a
    substring search (``bytes in bytes``).
    Without such a byte the whole answer is the mark (a substring search,
    still exact).
    """
    for byte in zen.UNKNOWN:
        if zen.UNKNOWN.count(byte) == 1 and not any(byte in a for a in zen.APHORISMS.values()):
            return byte
    return zen.UNKNOWN


UNKNOWN_MARK: Final = _unknown_mark()
#: Close reasons that are timeouts, and the label they get in zen_timeouts_total.
TIMEOUT_REASONS: Final = {CloseReason.REQUEST_TIMEOUT: "request", CloseReason.IDLE_TIMEOUT: "idle"}


# -- the directory (master) ------------------------------------------------------


@dataclass(frozen=True)
class MultiprocDir:
    """Where the workers write their metric files."""

    path: Path
    created: bool  # True: a temporary directory the master removes at exit


def prepare_multiproc_dir(settings: Settings) -> MultiprocDir:
    """Create (or clean) the directory and export it to the workers the master will spawn.

    A given ``PROMETHEUS_MULTIPROC_DIR`` is created if missing and emptied of
    ``*.db`` files (stale counters of an earlier run would add up); other
    files in it are left alone.
    """
    if settings.prometheus_multiproc_dir:
        path = Path(settings.prometheus_multiproc_dir)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        created = False
    else:
        path = Path(tempfile.mkdtemp(prefix="zen-metrics-"))
        created = True
    os.environ[ENV_DIR] = str(path)
    return MultiprocDir(path, created)


def remove_multiproc_dir(mdir: MultiprocDir) -> None:
    """Remove the directory if the master created it (a given one is kept for inspection)."""
    if mdir.created:
        shutil.rmtree(mdir.path, ignore_errors=True)


def mark_worker_dead(mdir: MultiprocDir, pid: int) -> None:
    """Drop a reaped worker's live gauges (open connections) from the sums."""
    from prometheus_client import multiprocess  # noqa: PLC0415 - only with metrics on

    multiprocess.mark_process_dead(pid, str(mdir.path))  # type: ignore[no-untyped-call]


# -- the worker side ------------------------------------------------------------------


class StatsLike(Protocol):
    """What :meth:`WorkerMetrics.flush` reads: ``stats.Stats``."""

    accepted: int
    answered: int
    unknown: int  # the one field written outside the worker: by counting_answers
    backpressure_pauses: int
    accept_backoffs: int
    closes: dict[str, int]  # by the value of a CloseReason (a CloseReason finds its entry: it is that str)
    proxy_headers: dict[str, int]


class WorkerMetrics:
    """One worker's prometheus values, fed from plain ints by :meth:`flush`.

    Create it only in a worker process whose environment has
    ``PROMETHEUS_MULTIPROC_DIR`` (the master exports it), so that
    prometheus-client writes the values to that worker's files.
    """

    def __init__(self, settings: Settings) -> None:
        if not settings.prometheus_multiproc_dir:
            raise RuntimeError("metrics need PROMETHEUS_MULTIPROC_DIR (the master exports it)")
        from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415 - after the env is set

        self.open = Gauge("zen_connections_open", "Connections open now", registry=None, multiprocess_mode="livesum")
        self.accepted = Counter("zen_connections", "Connections accepted", registry=None)
        self.questions = Counter("zen_questions", "Questions answered, by outcome", ["outcome"], registry=None)
        self.closes = Counter("zen_connection_closes", "Connections closed, by reason", ["reason"], registry=None)
        self.timeouts = Counter("zen_timeouts", "Connections closed by a timeout", ["kind"], registry=None)
        self.pauses = Counter("zen_backpressure_pauses", "Reading paused: unsent answers over the bound", registry=None)
        self.backoffs = Counter("zen_accept_backoffs", "Accept paused on EMFILE/ENFILE/ENOBUFS/ENOMEM", registry=None)
        self.proxy = Counter("zen_proxy_headers", "PROXY headers accepted, by command", ["command"], registry=None)
        self.duration = Histogram(
            "zen_connection_duration_seconds", "Connection lifetimes", buckets=DURATION_BUCKETS, registry=None
        )
        self.log_drops = LogDrops("worker")
        self.lag = Histogram(
            "zen_event_loop_lag_seconds",
            "How late the worker's timer ran: the wait a new question sees before its read is handled",
            buckets=LAG_BUCKETS,
            registry=None,
        )
        self._bounds = list(DURATION_BUCKETS)
        self._durations = [0] * len(DURATION_BUCKETS)
        self._duration_sum = 0.0
        self._seen: dict[tuple[str, str], int] = {}

    @staticmethod
    def counting_answers(stats: StatsLike) -> Callable[[list[bytes]], bytes]:
        """``zen.answers`` that also adds the unknown questions to ``stats.unknown``.

        Per batch it costs one ``memchr`` for a byte that only the unknown
        answer holds (:data:`UNKNOWN_MARK`); only a batch with unknown
        questions pays for counting them.  Known ones are derived at flush
        time as answered - unknown.
        """
        get, unknown, mark = zen.APHORISMS.get, zen.UNKNOWN, UNKNOWN_MARK

        def answers(questions: list[bytes]) -> bytes:
            if len(questions) == 1:
                out = get(questions[0], unknown)
            else:
                out = b"".join(map(get, questions, repeat(unknown, len(questions))))
            if mark in out:
                stats.unknown += out.count(unknown)
            return out

        return answers

    def connection_closed(self, seconds: float) -> None:
        """Count one connection's lifetime in a plain bucket (no prometheus call)."""
        self._durations[bisect.bisect_left(self._bounds, seconds)] += 1
        self._duration_sum += seconds

    def flush(self, stats: StatsLike, open_connections: int, answered_live: int, lag: float | None) -> None:
        """Move what ``stats`` counted since the last flush into the prometheus values.

        ``answered_live`` is what the open connections answered so far (a
        connection adds its count to ``stats.answered`` when it closes).
        """
        self.open.set(open_connections)
        answered = stats.answered + answered_live
        self._add(self.accepted, ("accepted", ""), stats.accepted)
        self._add(self.questions.labels("unknown"), ("q", "unknown"), stats.unknown)
        self._add(self.questions.labels("known"), ("q", "known"), answered - stats.unknown)
        self._add(self.questions.labels("too_long"), ("q", "too_long"), stats.closes.get(CloseReason.TOO_LONG, 0))
        self._add(self.pauses, ("pauses", ""), stats.backpressure_pauses)
        self._add(self.backoffs, ("backoffs", ""), stats.accept_backoffs)
        self._add_labelled(self.closes, "close", stats.closes)
        self._add_labelled(self.proxy, "proxy", stats.proxy_headers)
        for reason, kind in TIMEOUT_REASONS.items():
            self._add(self.timeouts.labels(kind), ("timeout", kind), stats.closes.get(reason, 0))
        self._flush_durations()
        self.log_drops.update(logs.sink().dropped_total)
        if lag is not None:
            self.lag.observe(max(0.0, lag))

    def _add(self, counter: Any, key: tuple[str, str], total: int) -> None:
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._seen[key] = total

    def _add_labelled(self, counter: Any, prefix: str, totals: Mapping[str, int]) -> None:
        for label, total in list(totals.items()):
            self._add(counter.labels(label), (prefix, label), total)

    def _flush_durations(self) -> None:
        # prometheus-client has no bulk observe: add to the bucket values
        # observe() itself uses (tests/integration/test_metrics_admin.py
        # checks the exposition, so an upstream change cannot go unnoticed).
        if not any(self._durations):
            return
        hist = self.duration
        for i, count in enumerate(self._durations):
            if count:
                hist._buckets[i].inc(count)  # noqa: SLF001
        hist._sum.inc(self._duration_sum)  # noqa: SLF001
        self._durations = [0] * len(self._bounds)
        self._duration_sum = 0.0


class LogDrops:
    """The log lines this process dropped (its stdout's reader stalled), as ``zen_logs_dropped_total``.

    A counter in the multiprocess files, labelled by ``process`` (master or
    worker), so the master's own drops and every worker's, dead ones
    included, add up in one metric.  Create it only once
    ``PROMETHEUS_MULTIPROC_DIR`` is set (:func:`prepare_multiproc_dir`).
    """

    def __init__(self, process: str) -> None:
        from prometheus_client import Counter  # noqa: PLC0415 - after the env is set

        self._counter = Counter(
            "zen_logs_dropped",
            "Log lines dropped because stdout's reader stalled beyond LOG_BUFFER_BYTES",
            ["process"],
            registry=None,
        ).labels(process)
        self._seen = 0

    def update(self, total: int) -> None:
        """Add what this process dropped since the last update (``total``: its count so far)."""
        if total > self._seen:
            self._counter.inc(total - self._seen)
            self._seen = total


# -- the master side: what the admin listener renders ----------------------------------


class MasterView(Protocol):
    """What the master publishes for the admin listener: ``admin.MasterStatus``."""

    @property
    def restarts(self) -> int: ...
    @property
    def slots(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def ready_workers(self) -> int: ...
    @property
    def ready(self) -> bool: ...
    @property
    def recycles(self) -> int: ...
    @property
    def hung(self) -> tuple[tuple[int, int], ...]: ...


def master_registry(mdir: MultiprocDir, view: Callable[[], MasterView]) -> CollectorRegistry:
    """A registry aggregating every worker's files plus the master's own state."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415
    from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(mdir.path))  # type: ignore[no-untyped-call]
    registry.register(_MasterCollector(view))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415

    return generate_latest(registry), CONTENT_TYPE_LATEST


class _MasterCollector:
    """The master's state as metrics, read at scrape time (no files)."""

    def __init__(self, view: Callable[[], MasterView]) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

        v = self._view()
        yield CounterMetricFamily("zen_worker_restarts", "Workers respawned after a crash", value=v.restarts)
        yield CounterMetricFamily("zen_worker_recycles", "Workers replaced after MAX_REQUESTS", value=v.recycles)
        hung = CounterMetricFamily("zen_workers_hung", "Workers silent for WORKER_TIMEOUT, killed", labels=["slot"])
        for slot, count in v.hung:
            hung.add_metric([str(slot)], count)
        yield hung
        workers = GaugeMetricFamily("zen_workers", "Worker processes, by state", labels=["state"])
        workers.add_metric(["configured"], v.slots)
        workers.add_metric(["running"], v.running)
        workers.add_metric(["ready"], v.ready_workers)
        yield workers
        yield GaugeMetricFamily("zen_ready", "1 while the server takes new connections (/readyz)", value=int(v.ready))
