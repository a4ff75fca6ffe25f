"""The load generator that runs during attacks and faults, and counts every failure.

Owns: a bounded set of well-behaved clients on one uvloop event loop in a
background thread, and the tally of what happened to every question.

Two kinds of clients, both as a real client of a graceful server behaves:

- *churn* clients do what the book's client does: connect, ask the three
  questions one at a time, close, start over;
- *persistent* clients keep a connection for 3 to 12 bursts of questions
  (asked one at a time, with a pause after each burst, now and then longer
  than DRAIN_QUIET), then close it and reconnect; a server close *between*
  questions (nothing outstanding) is a normal close (a draining worker does
  it after DRAIN_QUIET), and they reconnect.

A failure is a wrong answer, a reset or an EOF with a question outstanding, a
question not answered within ``answer_timeout``, or a refused or failed
connect while the server is supposed to be up (see :meth:`mark_down`).  Each
failure keeps the client's local port, so a test can tell connections a
killed worker had accepted from the others.

Never: retries a failed question (that would hide the loss), or runs
unbounded: the clients stop at :meth:`stop` or after ``max_seconds``.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Self

import uvloop

from app.core import zen
from app.core.protocol import AnswerReader

BOOK: Final = (
    (b"Beautiful is better than?", b"Ugly."),
    (b"Explicit is better than?", b"Implicit."),
    (b"Simple is better than?", b"Complex."),
)
EXTRA: Final = (
    (b"Now is better than?", zen.answer(b"Now is better than?")),
    (b"\x00garbage?", zen.UNKNOWN),
)
MAX_LATENCIES: Final = 500_000


@dataclass
class Failure:
    """One lost question or connection."""

    kind: str  # wrong | reset | eof | timeout | refused | connect_error
    client: str  # churn | persistent
    local_port: int | None
    at: float  # time.monotonic()
    connected_at: float | None
    detail: str = ""


@dataclass
class Tally:
    """What the clients saw; read it after :meth:`LoadGenerator.stop`."""

    connects: int = 0
    answered: int = 0
    server_closes: int = 0  # closes between questions: normal for a draining server
    down_refusals: int = 0  # connects refused after mark_down(): expected
    failures: list[Failure] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.failures:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> str:
        return (
            f"connects={self.connects} answered={self.answered} server_closes={self.server_closes} "
            f"down_refusals={self.down_refusals} failures={len(self.failures)} {self.kinds()} "
            f"p50={self.percentile(0.5) * 1000:.1f}ms p99={self.percentile(0.99) * 1000:.1f}ms "
            f"max={max(self.latencies, default=0) * 1000:.1f}ms"
        )


class _LostError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class LoadGenerator:
    """``churn`` + ``persistent`` clients against ``addr`` until :meth:`stop`.

    Use as a context manager, or :meth:`start` then :meth:`stop`.
    """

    def __init__(
        self,
        addr: tuple[str, int],
        *,
        churn: int = 6,
        persistent: int = 6,
        answer_timeout: float = 10.0,
        quiet: float = 1.0,
        max_seconds: float = 120.0,
        extra: bool = True,
    ) -> None:
        self.addr = addr
        self.churn = churn
        self.persistent = persistent
        self.answer_timeout = answer_timeout
        self.quiet = quiet  # the server's DRAIN_QUIET: persistent clients pause longer than this now and then
        self.max_seconds = max_seconds
        self.questions = BOOK + (EXTRA if extra else ())
        self.tally = Tally()
        self.down_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> Tally:
        """Ask every client to finish its current question and close; return the tally."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "load generator did not stop"
        return self.tally

    def mark_down(self) -> None:
        """The server is stopping from now on: refused connects are expected, not failures."""
        self.down_since = time.monotonic()

    def answered(self) -> int:
        return self.tally.answered  # an int read is atomic; the lock guards the writers' updates

    def wait_answered(self, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` more questions than now were answered (the load is flowing)."""
        target = self.answered() + count
        self._wait("load flowing", lambda: self.answered() >= target, timeout)

    def wait_for_failures(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` failures were counted."""
        self._wait(f"{count} failures", lambda: len(self.tally.failures) >= count, timeout)

    def wait_for_down_refusals(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` more connects than now were refused after :meth:`mark_down`."""
        target = self.tally.down_refusals + count
        self._wait(f"{count} refusals", lambda: self.tally.down_refusals >= target, timeout)

    def _wait(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if cond():
                    return
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.tally.summary()}"
            assert self._thread.is_alive(), "load generator died"
            time.sleep(0.02)

    # -- the event loop thread ------------------------------------------------------------

    def _run(self) -> None:
        uvloop.run(self._main())

    async def _main(self) -> None:
        self._deadline = time.monotonic() + self.max_seconds
        tasks = [asyncio.create_task(self._churn_client()) for _ in range(self.churn)]
        tasks += [asyncio.create_task(self._persistent_client(i)) for i in range(self.persistent)]
        await asyncio.gather(*tasks)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _fail(self, kind: str, client: str, port: int | None, connected_at: float | None, detail: str) -> None:
        with self._lock:
            self.tally.failures.append(Failure(kind, client, port, time.monotonic(), connected_at, detail))

    async def _connect(self, client: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int] | None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.addr), self.answer_timeout)
        except (OSError, TimeoutError) as exc:
            if self.down_since is not None:
                with self._lock:
                    self.tally.down_refusals += 1
            else:
                kind = "refused" if isinstance(exc, ConnectionRefusedError) else "connect_error"
                self._fail(kind, client, None, None, repr(exc))
            await asyncio.sleep(0.05)
            return None
        with self._lock:
            self.tally.connects += 1
        return reader, writer, writer.get_extra_info("sockname")[1]

    async def _ask(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        answers: AnswerReader,
        question: bytes,
        expected: bytes,
    ) -> None:
        start = time.monotonic()
        try:
            writer.write(question)
            got: list[bytes] = []
            while not got:
                data = await asyncio.wait_for(reader.read(4096), self.answer_timeout)
                if not data:
                    raise _LostError("eof", f"EOF with {question!r} outstanding")
                got = answers.receive_data(data)
        except TimeoutError:
            raise _LostError("timeout", f"no answer to {question!r} in {self.answer_timeout}s") from None
        except OSError as exc:
            raise _LostError("reset", f"{exc!r} with {question!r} outstanding") from None
        if got != [expected]:
            raise _LostError("wrong", f"{question!r} -> {got!r}, expected {expected!r}")
        with self._lock:
            self.tally.answered += 1
            if len(self.tally.latencies) < MAX_LATENCIES:
                self.tally.latencies.append(time.monotonic() - start)

    async def _churn_client(self) -> None:
        while self._running():
            conn = await self._connect("churn")
            if conn is None:
                continue
            reader, writer, port = conn
            connected_at = time.monotonic()
            answers = AnswerReader()
            try:
                for question, expected in BOOK:
                    await self._ask(reader, writer, answers, question, expected)
            except _LostError as lost:
                self._lost(lost, "churn", port, connected_at)
            finally:
                writer.close()

    def _lost(self, lost: _LostError, client: str, port: int, connected_at: float) -> None:
        if self.down_since is not None and connected_at >= self.down_since and lost.kind in ("reset", "eof"):
            # Connected after the stop began: the listener may be closing under it.
            with self._lock:
                self.tally.down_refusals += 1
            return
        self._fail(lost.kind, client, port, connected_at, str(lost))

    async def _persistent_client(self, index: int) -> None:
        rng = random.Random(index)
        while self._running():
            conn = await self._connect("persistent")
            if conn is None:
                continue
            reader, writer, port = conn
            connected_at = time.monotonic()
            answers = AnswerReader()
            try:
                await self._persist(reader, writer, answers, rng)
            except _LostError as lost:
                self._lost(lost, "persistent", port, connected_at)
            finally:
                writer.close()

    async def _persist(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: AnswerReader, rng: random.Random
    ) -> None:
        for _ in range(rng.randint(3, 12)):  # then close and reconnect: new connections reach new slots
            if not self._running():
                return
            for _ in range(rng.randint(5, 40)):
                await self._ask(reader, writer, answers, *rng.choice(self.questions))
            # Pause: mostly short; sometimes longer than DRAIN_QUIET, so a
            # draining worker can close this connection between questions.
            await asyncio.sleep(self.quiet * 2.5 if rng.random() < 0.3 else 0.01)
            if reader.at_eof() or reader.exception() is not None or writer.is_closing():
                with self._lock:
                    self.tally.server_closes += 1
                return
