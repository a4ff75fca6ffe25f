"""The I/O shell of one client connection, over the sans-I/O protocol core.

Owns: one connection's bytes in and out (``protocol.QuestionReader`` in,
``zen`` answers out), its per-connection state (the request and idle clocks,
kept by ``policy.progress``; backpressure; the lingering close after
"request too long"), its deadlines (:meth:`Connection.overdue` applies
``policy.overdue`` to its clocks, :meth:`Connection.time_out` closes it),
with ``PROXY_PROTOCOL`` on the PROXY header stage, and the interface to its
worker: :class:`ConnectionHost` (told when the connection opens and
closes) and :class:`ConnectionContext` (what every connection of a worker
reads, built once).

Never: accepts, logs, or keeps timers: the worker (``worker.Worker``)
does, and its periodic sweep asks each connection whether it is overdue,
so that a connection costs no timer handle and no per-request call outside
this module.  It writes no attribute of its worker: it counts into
``stats.Stats`` (the counters named there as its own) and calls the host.

Memory: an idle connection is mostly uvloop's transport (about 1.2 KiB);
ours is one object of plain slots (see :class:`Connection` for what makes
it smaller compiled).  The peer is not kept: the close line
asks the transport, which holds it anyway; and a connection holds a
``QuestionReader`` only while the reader holds something (part of a
question, questions not answered yet, end of stream): otherwise it borrows
its worker's spare reader for the duration of one ``data_received``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from mypy_extensions import mypyc_attr

from app.core import proxy, zen
from app.core.policy import CloseReason, Limits, Next, after, overdue, progress
from app.core.protocol import QuestionReader, printable, whole_questions
from app.server.stats import Stats  # at run time: a compiled dataclass resolves its field types

if TYPE_CHECKING:
    from app.config import Settings

#: Answers written per batch before checking backpressure again; a batch of
#: unknown-aphorism errors is at most 256 * 24 = 6 KiB.
ANSWER_BATCH: Final = 256

#: The extra fields of a connection's close line, when there are none (shared, never changed).
_NO_FIELDS: Final[dict[str, Any]] = {}


def format_peer(peer: Any) -> str:
    """``host:port`` (``[v6]:port``) of an address tuple; other values as they print."""
    if not isinstance(peer, tuple):
        return str(peer)
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnectionHost(Protocol):
    """What a connection tells its worker: that it opened (may it stay?) and that it closed."""

    def connection_made(self, conn: Connection) -> bool:
        """Track ``conn``; False if it is over the cap (it then closes, reason OVER_CAPACITY)."""
        ...

    def connection_lost(self, conn: Connection, reason: CloseReason, fields: dict[str, Any]) -> None:
        """``conn`` closed for ``reason``; ``fields``: the extra fields of its close line."""
        ...


class SpareReader:
    """The reader a worker lends to its connections that hold none (see the module's "Memory")."""

    __slots__ = ("max_question", "reader")

    def __init__(self, max_question: int) -> None:
        self.max_question = max_question
        self.reader = QuestionReader(max_question)

    def take(self) -> QuestionReader:
        """The spare, for a connection that must keep it; a new one becomes the spare."""
        reader = self.reader
        self.reader = QuestionReader(self.max_question)
        return reader


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """What every connection of one worker reads: built once per worker, never changed.

    A connection holds this one reference (one slot), not its worker.
    """

    host: ConnectionHost
    #: zen.answers, or metrics' counting variant.
    answers: Callable[[list[bytes]], bytes]
    max_question: int
    #: (high, low) water marks of a connection's unsent answers: reading pauses above high, resumes below low.
    write_limits: tuple[int, int]
    spare: SpareReader
    stats: Stats
    proxy_versions: frozenset[int]
    proxy_trusted: proxy.Networks

    @classmethod
    def build(
        cls, settings: Settings, host: ConnectionHost, stats: Stats, answers: Callable[[list[bytes]], bytes]
    ) -> ConnectionContext:
        """The context of ``host``'s connections under ``settings``."""
        return cls(
            host=host,
            answers=answers,
            max_question=settings.max_request_bytes,
            write_limits=(settings.max_unsent_bytes, settings.max_unsent_bytes // 4),
            spare=SpareReader(settings.max_request_bytes),
            stats=stats,
            proxy_versions=proxy.MODES[settings.proxy_protocol],
            proxy_trusted=proxy.parse_networks(settings.proxy_trusted),
        )


# Compiled by mypyc, these classes still take interpreted subclasses: app.server.tls's
# TLS stages are plain Python (they drive uvloop's SSLProtocol, which mypyc cannot type).
@mypyc_attr(allow_interpreted_subclasses=True)
class Connection:
    """The I/O shell of one client connection: an asyncio protocol by its methods, not its base.

    uvloop's and asyncio's transports call its methods; it does not subclass
    ``asyncio.Protocol`` (the callers cast the factory that makes it).

    Memory, compiled: mypyc gives a class with a Python base (``asyncio.Protocol``)
    a ``__dict__`` and a ``__weakref__``, two words per connection; and it lays out
    the fields in the order ``__init__`` first assigns them, so ``paused`` (a byte)
    comes first, beside mypyc's bitmap of defined fields.  With one clock for both
    the idle and the closing deadlines (:attr:`active`), the object fits 128 bytes.
    """

    __slots__ = (
        "active",
        "answered",
        "bytes_in",
        "bytes_out",
        "closing",
        "ctx",
        "opened",
        "paused",
        "reader",
        "started_at",
        "transport",
    )

    def __init__(self, ctx: ConnectionContext) -> None:
        self.paused = False  # first: see the class's "Memory"
        self.ctx = ctx
        self.transport: Any = None
        self.reader: QuestionReader | None = None  # see the module's "Memory"
        self.answered = self.bytes_in = self.bytes_out = 0
        self.opened = time.monotonic()
        # One clock for two deadlines.  While open, the idle clock: the last
        # progress (bytes of a question, answers, the client reading its
        # answers again).  Whitespace alone does not move it: it is skipped
        # before a question, so a client trickling newlines would hold a
        # connection for ever.  Once closing (or lingering), the last byte
        # received at all, or the start of the close.
        self.active = self.opened
        self.started_at: float | None = None  # when the unfinished question began
        self.closing: CloseReason | None = None  # None while open, then why it closes

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        ctx = self.ctx
        high, low = ctx.write_limits
        transport.set_write_buffer_limits(high, low)
        if not ctx.host.connection_made(self):
            self.closing = CloseReason.OVER_CAPACITY
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.closing:
            self.active = time.monotonic()  # lingering: discard (the clock of a quiet client)
            return
        if self.reader is None and not self.paused:
            # The usual read: whole questions (one, or a pipelined batch), and
            # nothing held (see protocol.whole_questions): answered without a reader.
            questions = whole_questions(data, self.ctx.max_question, ANSWER_BATCH)
            if questions is not None:
                out = self.ctx.answers(questions)
                self.transport.write(out)
                self.bytes_out += len(out)
                self.answered += len(questions)
                self._progressed(len(questions), partial=False)
                return
        self._answer(data)

    def _answer(self, data: bytes = b"") -> None:
        """Answer what is complete (after taking ``data`` in), then act on the reader's state."""
        ctx = self.ctx
        reader = self.reader or ctx.spare.reader
        write = self.transport.write
        answers = ctx.answers
        answered = 0
        if data:
            questions = reader.feed(data, ANSWER_BATCH)
        else:
            questions = [] if self.paused else reader.next_questions(ANSWER_BATCH)
        while questions:
            out = answers(questions)
            write(out)
            answered += len(questions)
            self.bytes_out += len(out)
            if len(questions) < ANSWER_BATCH or self.paused:
                break
            questions = reader.next_questions(ANSWER_BATCH)
        partial = reader.buffered
        done = reader.eof or reader.too_long
        if partial or done:
            if self.reader is None:  # keep what the spare now holds
                self.reader = ctx.spare.take()
        elif self.reader is not None:
            self.reader = None  # it holds nothing: the spare serves next time
        self.answered += answered
        if answered or partial:
            self._progressed(answered, partial=partial)
        if done and not self.paused:
            self._finish(reader)

    def _progressed(self, answered: int, *, partial: bool) -> None:
        """Progress in the last read (answers, or bytes of a question): the idle and request clocks move."""
        now = self.active = time.monotonic()
        self.started_at = progress(now, answered, partial, self.started_at)

    def _finish(self, reader: QuestionReader) -> None:
        """After the last answer: "too long" and a lingering close, or the end of stream."""
        if after(reader) is Next.LINGER:
            self.transport.write(zen.TOO_LONG)
            self.bytes_out += len(zen.TOO_LONG)
            self._linger()
        else:
            self.close(CloseReason.EOF)

    def eof_received(self) -> bool:
        if self.closing is CloseReason.TOO_LONG:  # lingering
            return False  # the client is done: close now
        if self.reader is None:  # nothing held, so nothing left to answer
            self.close(CloseReason.EOF)
            return True
        self.reader.receive_data(b"")
        self._answer()
        return True  # we close ourselves once every answer is queued

    def pause_writing(self) -> None:
        self.paused = True
        self.ctx.stats.backpressure_pauses += 1
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        # The client reads again: progress.  While paused, the unread input
        # waited on us, not on the client, so the request clock restarts too.
        self.paused = False
        now = self.active = time.monotonic()
        if self.started_at is not None and not self.closing:  # (closing: the lingering clock)
            self.started_at = now
        self._answer()
        if not self.paused and not self.closing:
            self.transport.resume_reading()

    def close(self, reason: CloseReason) -> None:
        """Close after the queued answers are sent."""
        if not self.closing:
            self.closing = reason
            self.active = time.monotonic()  # now the clock of a close that stalls
            self.transport.close()

    def _linger(self) -> None:
        """Send what is queued and a FIN, then discard input until the client is done (policy.LINGER_QUIET)."""
        self.closing = CloseReason.TOO_LONG
        self.started_at = self.active = time.monotonic()  # now the lingering clocks
        self.transport.write_eof()

    def expire(self, reason: CloseReason) -> None:
        """Close for a timeout: politely if nothing is unsent, else at once."""
        if self.transport.get_write_buffer_size() == 0:
            self.close(reason)
        else:
            self.abort(reason)

    @property
    def lingering(self) -> bool:
        """True in the lingering close after "request too long" (its clock: :attr:`started_at`)."""
        return self.closing is CloseReason.TOO_LONG

    def abort(self, reason: CloseReason) -> None:
        """Close now, dropping unsent answers."""
        if not self.closing:
            self.closing = reason
        self.transport.abort()

    # -- deadlines (asked by the worker's sweep) ----------------------------------

    def overdue(self, now: float, limits: Limits) -> CloseReason | None:
        """The reason to close this connection at ``now`` (``policy.overdue`` on its clocks), or None.

        One clock serves as both ``active`` and ``last_rx``: the policy reads
        ``active`` only while open and ``last_rx`` only once closing.
        """
        closing = self.closing
        return overdue(
            limits,
            now,
            started_at=self.started_at,
            active=self.active,
            last_rx=self.active,
            lingering=closing is CloseReason.TOO_LONG,
            closing=closing is not None,
            paused=self.paused,
        )

    def time_out(self, reason: CloseReason) -> None:
        """Close for the overdue ``reason``: a close already under way (lingering, stalled) is dropped."""
        if self.closing:
            self.abort(reason)  # keeps the reason it closes for
        else:
            self.expire(reason)

    def close_if_quiet(self, now: float, quiet: float) -> None:
        """In a graceful stop: close if between questions, every answer sent and no progress for ``quiet``."""
        if not self.closing and self.idle() and now - self.active >= quiet:
            self.close(CloseReason.SHUTDOWN)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.closing or (CloseReason.RESET if exc is not None else CloseReason.EOF)
        fields = _NO_FIELDS
        if self.reader is not None and reason is not CloseReason.TOO_LONG:
            partial = self.reader.partial
            if partial:
                fields = {"unfinished": printable(partial)}
        self.ctx.host.connection_lost(self, reason, fields)

    def detach(self) -> None:
        """Let go of the transport, once closed: the registry that tracked the connection marks it so."""
        self.transport = None

    def peer(self) -> str:
        """The client's address, ``host:port`` (asked when needed: uvloop keeps it after the close)."""
        try:
            address = self.transport.get_extra_info("peername")
        except Exception:  # noqa: BLE001 - a transport that cannot say: the line still goes out
            return "unknown"
        return format_peer(address)

    @property
    def partial(self) -> bytes:
        """Received bytes not answered yet."""
        return self.reader.partial if self.reader is not None else b""

    def idle(self) -> bool:
        """True between questions with every answer sent: safe to close in a drain."""
        return not self.partial and not self.paused and self.transport.get_write_buffer_size() == 0


@mypyc_attr(allow_interpreted_subclasses=True)
class ProxiedConnection(Connection):
    """A connection from a load balancer: a PROXY header stage, then the questions.

    The worker picks this class at construction when PROXY_PROTOCOL is not
    off, so the plain :class:`Connection`'s hot path is untouched.  A peer
    outside PROXY_TRUSTED is closed at once (the spec forbids guessing
    whether a header is there, so nobody else may connect); a missing or
    malformed header closes the connection; each is logged in the
    ``connection_closed`` line (reason ``proxy_*``, ``proxy_error``).  The
    header counts as a started request: it must arrive within
    REQUEST_TIMEOUT.  The header's client address becomes :meth:`peer`; the
    load balancer's goes to :attr:`via`.
    """

    __slots__ = ("client", "header", "proxy_error", "via")

    def __init__(self, ctx: ConnectionContext) -> None:
        super().__init__(ctx)
        self.header: bytes | None = b""  # the header's bytes so far; None once parsed
        self.client: str | None = None  # the header's client address, once parsed
        self.via: str | None = None
        self.proxy_error: str | None = None
        self.started_at = self.opened

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        address = transport.get_extra_info("peername")
        host = address[0] if isinstance(address, tuple) else None
        if not proxy.is_trusted(host, self.ctx.proxy_trusted):
            self._reject(CloseReason.PROXY_UNTRUSTED, "peer not in PROXY_TRUSTED")

    def data_received(self, data: bytes) -> None:
        if self.header is None:
            Connection.data_received(self, data)
        elif not self.closing:
            self._header_data(data)
        else:
            self.bytes_in += len(data)

    def _header_data(self, data: bytes) -> None:
        buf = self.header + data if self.header else data
        self.active = time.monotonic()
        try:
            header = proxy.parse_header(buf, self.ctx.proxy_versions)
        except proxy.ProxyHeaderError as exc:
            self.bytes_in += len(data)
            missing = isinstance(exc, proxy.MissingProxyHeaderError)
            self._reject(CloseReason.PROXY_MISSING if missing else CloseReason.PROXY_INVALID, str(exc))
            return
        if header is None:
            self.bytes_in += len(data)
            self.header = buf
            return
        self.bytes_in += header.length - (len(buf) - len(data))
        self.header = None
        commands = self.ctx.stats.proxy_headers
        commands[header.command] = commands.get(header.command, 0) + 1
        if header.source is not None:
            self.via = Connection.peer(self)
            self.client = format_peer(header.source)
        rest = buf[header.length :]
        if rest:
            Connection.data_received(self, rest)
        else:
            self.started_at = None

    def peer(self) -> str:
        """The header's client address once parsed, else the load balancer's."""
        return self.client if self.client is not None else Connection.peer(self)

    def _reject(self, reason: CloseReason, error: str) -> None:
        self.proxy_error = error
        self.close(reason)

    def eof_received(self) -> bool:
        if self.header and not self.closing:
            self._reject(CloseReason.PROXY_INVALID, "end of stream inside the PROXY header")
            return True
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.closing or (CloseReason.RESET if exc is not None else CloseReason.EOF)
        fields: dict[str, Any] = {}
        if self.via is not None:
            fields["via"] = self.via
        if self.proxy_error is not None:
            fields["proxy_error"] = self.proxy_error
        partial = self.header or self.partial
        if partial and reason is not CloseReason.TOO_LONG:
            fields["unfinished"] = printable(partial)
        self.ctx.host.connection_lost(self, reason, fields)
