"""The load generator: drive a Zen server, verify every answer byte for byte, measure.

Owns: the four loads (pingpong: C connections with one question in flight
each; pipeline: D questions per write; churn: connect, ask the book's three
questions one at a time, close; hold: open N connections, prove each is
served, keep them idle, prove it again), byte-exact verification, error
counting, latency percentiles, the progress bar, the table and the one JSON
line at the end.  Load runs in several processes (a uvloop client loop
each) so that the generator is not the bottleneck of a Python server.

Never: starts or stops servers (``app.tools.compare`` and ``app.tools.process`` do)
and never sends anywhere but the address it is given.  Every loop is
bounded by the duration and the per-answer timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import queue
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from app.config import Settings
from app.core import zen

MODES: Final = ("pingpong", "pipeline", "churn", "hold")
#: The book's client asks these three, one at a time; every load cycles through them.
QUESTIONS: Final = (b"Beautiful is better than?", b"Explicit is better than?", b"Simple is better than?")
#: Latency samples kept per process (reservoir sampling): enough for a p99.9.
SAMPLES: Final = 50_000
#: How often the watchdog fails answers older than the timeout, and children publish progress.
TICK: Final = 0.1
#: A run at least this long shows a progress bar.
PROGRESS_AFTER: Final = 2.0


class AnswerMismatchError(Exception):
    """The server sent bytes other than the expected answers."""


class Verifier:
    """Byte-exact check of a connection's incoming stream against the answers expected.

    :meth:`expect` appends the answers of questions just sent; :meth:`feed`
    checks received bytes against them and returns how many answers they
    completed (every answer ends with its only ``.``).
    """

    __slots__ = ("expected",)

    def __init__(self) -> None:
        self.expected = bytearray()

    def expect(self, answers: bytes) -> None:
        self.expected += answers

    def feed(self, data: bytes) -> int:
        """Check ``data``; raises :class:`AnswerMismatchError` on any unexpected byte."""
        size = len(data)
        if self.expected[:size] != data:
            want = bytes(self.expected[: max(size, 1)])
            raise AnswerMismatchError(f"expected {want[:40]!r}, got {data[:40]!r}")
        del self.expected[:size]
        return data.count(b".")

    @property
    def done(self) -> bool:
        """True when every expected answer has arrived."""
        return not self.expected


@dataclass(frozen=True)
class LoadSpec:
    """One load: where, which mode, how many connections, for how long."""

    host: str
    port: int
    mode: str = "pingpong"
    connections: int = 50
    depth: int = 16
    duration: float = 5.0
    timeout: float = 5.0
    processes: int = 2
    #: TLS: every connection shakes hands (a full handshake each: no session
    #: resumption, so churn measures the handshake).  Paths, not a context:
    #: a spec crosses to the load processes, a context cannot.
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_version: str = ""  # "1.2" or "1.3" pins it; empty: the best both sides have


@dataclass
class Tally:
    """What one process (or, merged, the whole run) counted."""

    answers: int = 0
    errors: int = 0
    connects: int = 0
    held: int = 0
    served: int = 0  # connections that got at least one answer
    elapsed: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seen: int = 0  # latency samples offered (reservoir sampling)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def latency(self, seconds: float) -> None:
        self.seen += 1
        if len(self.latencies) < SAMPLES:
            self.latencies.append(seconds)
        else:
            slot = random.randrange(self.seen)  # noqa: S311 - sampling, not security
            if slot < SAMPLES:
                self.latencies[slot] = seconds

    def merge(self, other: Tally) -> None:
        self.answers += other.answers
        self.errors += other.errors
        self.connects += other.connects
        self.held += other.held
        self.served += other.served
        self.elapsed = max(self.elapsed, other.elapsed)
        for kind, count in other.error_kinds.items():
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + count
        self.latencies.extend(other.latencies)
        self.seen += other.seen


# -- one client connection ----------------------------------------------------------


class BenchConnection(asyncio.Protocol):
    """A client connection: write questions, wait until their answers are verified."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.verifier = Verifier()
        self.transport: Any = None
        self.waiter: asyncio.Future[None] | None = None
        self.sent_at = 0.0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.tally.answers += self.verifier.feed(data)
        except AnswerMismatchError as exc:
            self._fail(exc)
            return
        if self.verifier.done:
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"closed by the server: {exc}"))

    def _finish(self, exc: BaseException | None) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _fail(self, exc: BaseException) -> None:
        self._finish(exc)

    def expire(self, now: float, timeout: float) -> None:
        """Called by the watchdog: fail an exchange waiting longer than ``timeout``."""
        if self.waiter is not None and now - self.sent_at > timeout:
            self._fail(TimeoutError(f"no answer within {timeout}s"))

    async def exchange(self, payload: bytes, answers: bytes) -> None:
        """Send ``payload`` and wait until ``answers`` came back byte-exactly."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.verifier.expect(answers)
        self.sent_at = time.monotonic()
        self.transport.write(payload)
        await self.waiter


def _kind(exc: BaseException) -> str:
    if isinstance(exc, AnswerMismatchError):
        return "mismatch"
    return "timeout" if isinstance(exc, TimeoutError) else "connection"


#: (bytes to send, answers expected), computed once: the client's hot path only writes and compares.
Batch = tuple[bytes, bytes]


def batch(questions: list[bytes]) -> Batch:
    """The payload of ``questions`` and the exact answers they must get."""
    return b"".join(questions), zen.answers(questions)


SINGLES: Final = tuple(batch([q]) for q in QUESTIONS)


class Load:
    """One process's share of a load: its connections, the watchdog, the clock."""

    def __init__(self, spec: LoadSpec, connections: int, progress: Callable[[int], None] | None = None) -> None:
        self.spec = spec
        self.connections = connections
        self.tally = Tally()
        self.conns: set[BenchConnection] = set()
        self.stopping = False
        self.stopped = asyncio.Event()
        self.progress = progress
        self.ssl = tls_context_of(spec)

    async def connect(self) -> BenchConnection:
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {} if self.ssl is None else {"ssl": self.ssl, "server_hostname": "localhost"}
        async with asyncio.timeout(self.spec.timeout):
            _transport, conn = await loop.create_connection(
                lambda: BenchConnection(self.tally), self.spec.host, self.spec.port, **tls
            )
        self.tally.connects += 1
        self.conns.add(conn)
        return conn

    def release(self, conn: BenchConnection) -> None:
        self.conns.discard(conn)
        if conn.transport is not None:
            conn.transport.close()

    async def ask(self, conn: BenchConnection, batch: Batch) -> None:
        start = time.perf_counter()
        await conn.exchange(*batch)
        self.tally.latency(time.perf_counter() - start)

    async def pingpong(self, index: int) -> None:
        depth = self.spec.depth if self.spec.mode == "pipeline" else 1
        batches = [batch([QUESTIONS[(i + j) % 3] for j in range(depth)]) for i in range(3)]
        n = index
        while not self.stopping:
            try:
                conn = await self.connect()
            except (OSError, TimeoutError) as exc:
                await self._after_error(exc)
                continue
            try:
                await self.ask(conn, batches[n % 3])
                self.tally.served += 1
                while not self.stopping:
                    n += 1
                    await self.ask(conn, batches[n % 3])
            except (OSError, TimeoutError, AnswerMismatchError) as exc:
                await self._after_error(exc)
            finally:
                self.release(conn)

    async def churn(self, _index: int) -> None:
        while not self.stopping:
            try:
                conn = await self.connect()
            except (OSError, TimeoutError) as exc:
                await self._after_error(exc)
                continue
            try:
                for one in SINGLES:
                    await self.ask(conn, one)
                self.tally.served += 1
            except (OSError, TimeoutError, AnswerMismatchError) as exc:
                await self._after_error(exc)
            finally:
                self.release(conn)

    async def hold(self, index: int) -> None:
        try:
            conn = await self.connect()
        except (OSError, TimeoutError) as exc:
            self.tally.error(_kind(exc))
            return
        try:
            await self.ask(conn, SINGLES[index % 3])
            self.tally.served += 1
            await self.stopped.wait()
            await self.ask(conn, SINGLES[(index + 1) % 3])  # still served after idling
            self.tally.held += 1
        except (OSError, TimeoutError, AnswerMismatchError) as exc:
            self.tally.error(_kind(exc))
        finally:
            self.release(conn)

    async def _after_error(self, exc: BaseException) -> None:
        if not self.stopping:
            self.tally.error(_kind(exc))
            await asyncio.sleep(0.05)  # bounded retry pace against a refusing server

    async def _watchdog(self) -> None:
        timeout = self.spec.timeout
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for conn in list(self.conns):
                conn.expire(now, timeout)
            if self.progress is not None:
                self.progress(self.tally.answers)

    async def run(self) -> Tally:
        """Run for the spec's duration, then stop; in-flight questions are not counted."""
        runner = {"pingpong": self.pingpong, "pipeline": self.pingpong, "churn": self.churn, "hold": self.hold}
        job = runner[self.spec.mode]
        start = time.monotonic()
        tasks = [asyncio.create_task(job(i)) for i in range(self.connections)]
        watchdog = asyncio.create_task(self._watchdog())
        await asyncio.sleep(self.spec.duration)
        self.stopping = True
        self.stopped.set()
        self.tally.elapsed = time.monotonic() - start
        if self.spec.mode == "hold":  # let each connection prove it is still served
            await asyncio.wait(tasks, timeout=self.spec.timeout + 1)
        for task in (*tasks, watchdog):
            task.cancel()
        await asyncio.gather(*tasks, watchdog, return_exceptions=True)
        for conn in list(self.conns):
            self.release(conn)
        return self.tally


def tls_context_of(spec: LoadSpec) -> Any:
    """The client ``ssl.SSLContext`` of ``spec`` (None without TLS); server name ``localhost`` when verifying."""
    if not spec.tls:
        return None
    import ssl  # noqa: PLC0415

    from app.tools.client import TLSOptions, tls_context  # noqa: PLC0415

    ctx = tls_context(TLSOptions(ca=spec.tls_ca, cert=spec.tls_cert, key=spec.tls_key))
    if spec.tls_version:
        version = ssl.TLSVersion.TLSv1_3 if spec.tls_version == "1.3" else ssl.TLSVersion.TLSv1_2
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def _run_loop(load: Load) -> Tally:
    try:
        import uvloop  # noqa: PLC0415

        return uvloop.run(load.run())
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(load.run())


# -- several processes ----------------------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    """Spread ``total`` connections over ``parts`` processes (none gets zero)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _child(  # noqa: PLR0917 - multiprocessing passes arguments positionally
    spec: LoadSpec, connections: int, slot: int, counts: Any, ready: Any, go: Any, results: Any
) -> None:
    def progress(answers: int) -> None:
        counts[slot] = answers

    ready.put(slot)
    go.wait()
    results.put(_run_loop(Load(spec, connections, progress)))


def _wait_ready(procs: Sequence[Any], ready: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    waiting = len(procs)
    while waiting:
        try:
            ready.get(timeout=TICK)
            waiting -= 1
        except queue.Empty:
            if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                raise RuntimeError("a load process failed to start") from None


def _start(spec: LoadSpec, ctx: Any, counts: Any) -> tuple[list[Any], Any, Any, Any]:
    """Fork one load process per share of the connections; they wait for ``go``."""
    shares = _split(spec.connections, spec.processes)
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_child, args=(spec, n, i, counts, ready, go, results), daemon=True)
        for i, n in enumerate(shares)
    ]
    for proc in procs:
        proc.start()
    return procs, ready, results, go


def _collect(
    spec: LoadSpec, procs: Sequence[Any], results: Any, counts: Any, on_progress: Callable[[float, int], None] | None
) -> Tally:
    """Merge every process's tally as it arrives, reporting progress meanwhile; bounded by the duration."""
    start = time.monotonic()
    deadline = start + spec.duration + spec.timeout + 30
    tally = Tally()
    pending = len(procs)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError("load processes did not report")
        with contextlib.suppress(Exception):
            tally.merge(results.get(timeout=TICK))
            pending -= 1
            continue
        if on_progress is not None:
            on_progress(min(time.monotonic() - start, spec.duration), sum(counts))
    return tally


def run_load(
    spec: LoadSpec,
    on_progress: Callable[[float, int], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> Tally:
    """Run ``spec`` in ``spec.processes`` processes and return the merged tally.

    ``on_start()`` is called when the load starts (every process is ready),
    ``on_progress(elapsed, answers)`` about every :data:`TICK` seconds.
    """
    if spec.mode not in MODES:
        raise ValueError(f"unknown mode {spec.mode!r}")
    # fork: the children start in milliseconds and run only this module's
    # code on a new event loop; spawn would re-import the caller's __main__.
    ctx = multiprocessing.get_context("fork")
    counts = ctx.Array("q", len(_split(spec.connections, spec.processes)), lock=False)
    procs, ready, results, go = _start(spec, ctx, counts)
    try:
        _wait_ready(procs, ready)
        if on_start is not None:
            on_start()
        go.set()
        return _collect(spec, procs, results, counts, on_progress)
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# -- report -------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The value at ``fraction`` (0..1) of ``sorted_values`` (nearest rank); 0.0 if empty."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def summarize(spec: LoadSpec, tally: Tally) -> dict[str, Any]:
    """The machine-readable summary of one run (the JSON line)."""
    lat = sorted(tally.latencies)
    elapsed = tally.elapsed or spec.duration
    spec_fields = asdict(spec)
    return {
        **spec_fields,
        "answers": tally.answers,
        "errors": tally.errors,
        "error_kinds": tally.error_kinds,
        "connects": tally.connects,
        "held": tally.held,
        "served": tally.served,
        "elapsed": round(elapsed, 3),
        "rps": round(tally.answers / elapsed, 1),
        "cps": round(tally.connects / elapsed, 1),
        "latency_ms": {
            name: round(percentile(lat, q) * 1000, 3)
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
    }


def print_table(rows: Sequence[dict[str, Any]], title: str = "bench") -> None:
    """Print summaries as a table (rich) on stdout."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=title)
    for name in ("mode", "conns", "served", "answers/s", "conns/s", "errors", "p50 ms", "p99 ms", "max ms"):
        table.add_column(name, justify="left" if name == "mode" else "right", no_wrap=name == "mode")
    for row in rows:
        lat = row["latency_ms"]
        table.add_row(
            row["mode"] + (f" x{row['depth']}" if row["mode"] == "pipeline" else ""),
            str(row["connections"]),
            str(row["served"]),
            f"{row['rps']:,.0f}",
            f"{row['cps']:,.0f}",
            str(row["errors"]),
            f"{lat['p50']:.2f}",
            f"{lat['p99']:.2f}",
            f"{lat['max']:.2f}",
        )
    Console(width=max(130, len(title))).print(table)


def run_with_progress(spec: LoadSpec, *, show: bool) -> Tally:
    """:func:`run_load` with a rich progress bar on stderr when ``show`` and the run is long enough."""
    if not show or spec.duration < PROGRESS_AFTER:
        return run_load(spec)
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: PLC0415

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"{spec.mode} x{spec.connections}", total=spec.duration, rate="")

        def update(elapsed: float, answers: int) -> None:
            rate = answers / elapsed if elapsed > 0 else 0.0
            bar.update(task, completed=elapsed, rate=f"{answers:,} answers, {rate:,.0f}/s")

        return run_load(spec, update)


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    """Options of ``python -m app bench`` (defaults from HOST/PORT)."""
    from app.tools.client import connect_host  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m app bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=connect_host(settings.host), help="server address (default: from HOST)")
    p.add_argument("--port", type=int, default=settings.port, help="server port (default: from PORT)")
    p.add_argument("--mode", choices=MODES, default="pingpong", help="the load (default: pingpong)")
    p.add_argument("-c", "--connections", type=int, default=50, help="concurrent connections (default: 50)")
    p.add_argument("-d", "--depth", type=int, default=16, help="questions per write in pipeline mode (default: 16)")
    p.add_argument("-t", "--duration", type=float, default=5.0, help="seconds of load (default: 5)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds an answer may take before it is an error")
    default_procs = min(4, os.cpu_count() or 1)
    p.add_argument("-p", "--processes", type=int, default=default_procs, help=f"load processes ({default_procs})")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tls", action="store_true", help="speak TLS (default: on when TLS_CERT_FILE is set)")
    p.add_argument("--ca", default=settings.tls_check_ca_file, help="PEM CA to verify the server with (name localhost)")
    p.add_argument("--cert", default=settings.tls_check_cert_file, help="PEM client certificate (mutual TLS)")
    p.add_argument("--key", default=settings.tls_check_key_file, help="PEM key of --cert")
    p.add_argument("--tls-version", choices=("1.2", "1.3"), default="", help="pin the TLS version")
    p.set_defaults(tls_default=bool(settings.tls_cert_file))
    return p


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    """Validate the options into a :class:`LoadSpec`; raises ``ValueError``."""
    for name in ("connections", "depth", "processes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if not 0 < args.duration <= 3600 or args.timeout <= 0:
        raise ValueError("--duration must be in (0, 3600] and --timeout positive")
    return LoadSpec(
        host=args.host,
        port=args.port,
        mode=args.mode,
        connections=args.connections,
        depth=args.depth,
        duration=args.duration,
        timeout=args.timeout,
        processes=args.processes,
        tls=args.tls or args.tls_default or bool(args.cert) or bool(args.tls_version),
        tls_ca=args.ca or "",
        tls_cert=args.cert or "",
        tls_key=args.key or "",
        tls_version=args.tls_version,
    )


def main(argv: Sequence[str], settings: Settings) -> int:
    """``python -m app bench``: run one load, print the table and the JSON line; 1 on any error."""
    parser = build_parser(settings)
    args = parser.parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    tally = run_with_progress(spec, show=not (args.no_progress or args.json) and sys.stderr.isatty())
    summary = summarize(spec, tally)
    if not args.json:
        print_table([summary], title=f"python -m app bench: {spec.host}:{spec.port}")
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    ok = summary["errors"] == 0 and (summary["held"] == spec.connections if spec.mode == "hold" else tally.answers > 0)
    return 0 if ok else 1
