"""The I/O shell of one client connection, over the sans-I/O protocol core.

Owns: one connection's bytes in and out (``protocol.QuestionReader`` in,
``zen`` answers out), its per-connection state (the request and idle clocks
the worker's sweep reads, backpressure, the lingering close after "request
too long") and, with ``PROXY_PROTOCOL`` on, the PROXY header stage.

Never: accepts, logs, or keeps timers; the worker (``worker.Worker``) does,
so that a connection costs no timer handle and no per-request call outside
this module.

Memory: an idle connection is mostly uvloop's transport (about 1.2 KiB);
ours is one object of plain slots.  The peer is not kept: the close line
asks the transport, which holds it anyway; and a connection holds a
``QuestionReader`` only while the reader holds something (part of a
question, questions not answered yet, end of stream): otherwise it borrows
its worker's spare reader for the duration of one ``data_received``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

from app.core import proxy, zen
from app.core.protocol import LONE_QUESTION, QuestionReader, printable

if TYPE_CHECKING:
    from app.server.worker import Worker

#: Answers written per batch before checking backpressure again; a batch of
#: unknown-aphorism errors is at most 256 * 24 = 6 KiB.
ANSWER_BATCH: Final = 256
#: After "request too long" the answer must survive although the client may
#: still be sending: closing with unread input makes Linux send a reset that
#: destroys it.  So: answer, shut down our side, discard input until EOF,
#: a quiet second, or LINGER_MAX (nginx's lingering close).
LINGER_QUIET: Final = 1.0
TOO_LONG: Final = "too_long"
#: The close reason of a connection accepted beyond MAX_CONNECTIONS (the worker never tracked it).
OVER_CAPACITY: Final = "over_capacity"
LINGER_MAX: Final = 5.0

_monotonic = time.monotonic
_lone_question = LONE_QUESTION.fullmatch
#: The extra fields of a connection's close line, when there are none (shared, never changed).
_NO_FIELDS: Final[dict[str, Any]] = {}


def format_peer(peer: Any) -> str:
    """``host:port`` (``[v6]:port``) of an address tuple; other values as they print."""
    if not isinstance(peer, tuple):
        return str(peer)
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Connection(asyncio.Protocol):
    """The I/O shell of one client connection."""

    __slots__ = (
        "active",
        "answered",
        "bytes_in",
        "bytes_out",
        "closing",
        "last_rx",
        "opened",
        "paused",
        "reader",
        "started_at",
        "transport",
        "worker",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: Any = None
        self.reader: QuestionReader | None = None  # see the module's "Memory"
        self.answered = self.bytes_in = self.bytes_out = 0
        self.opened = self.last_rx = _monotonic()
        # The idle clock: last progress (bytes of a question, or answers).
        # Whitespace alone does not restart it: it is skipped before a
        # question, so a client trickling newlines would hold a connection for ever.
        self.active = self.opened
        self.started_at: float | None = None  # when the unfinished question began
        self.paused = False
        self.closing: str | None = None  # None while open, then why it closes

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        high, low = self.worker.write_limits
        transport.set_write_buffer_limits(high, low)
        if not self.worker.connection_made(self):
            self.closing = OVER_CAPACITY
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.last_rx = now = _monotonic()
        if self.closing:
            return  # lingering: discard
        if self.reader is None and _lone_question(data) and len(data) <= self.worker.max_question and not self.paused:
            # The usual read: one whole question, and nothing held (see protocol.LONE_QUESTION).
            out = self.worker.answers([data])
            self.transport.write(out)
            self.bytes_out += len(out)
            self.answered += 1
            self.active = now
            self.started_at = None
            return
        self._answer(data)

    def _answer(self, data: bytes = b"") -> None:  # noqa: C901 - the hot path in one piece: a call is ~3 % of a request
        """Answer what is complete (after taking ``data`` in), then act on the reader's state."""
        reader = self.reader or self.worker.spare_reader
        write = self.transport.write
        answers = self.worker.answers
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
                self.reader = self.worker.take_spare_reader()
        elif self.reader is not None:
            self.reader = None  # it holds nothing: the spare serves next time
        if answered:
            self.answered += answered
            self.active = self.last_rx
            # A question left unfinished began in this data.
            self.started_at = self.last_rx if partial else None
        elif partial:
            self.active = self.last_rx
            if self.started_at is None:
                self.started_at = self.last_rx
        if done and not self.paused:
            self._finish(reader)

    def _finish(self, reader: QuestionReader) -> None:
        """After the last answer: "too long" and a lingering close, or the end of stream."""
        if reader.too_long:
            self.transport.write(zen.TOO_LONG)
            self.bytes_out += len(zen.TOO_LONG)
            self._linger(TOO_LONG)
        else:
            self.close("eof")

    def eof_received(self) -> bool:
        if self.closing == TOO_LONG:  # lingering
            return False  # the client is done: close now
        if self.reader is None:  # nothing held, so nothing left to answer
            self.close("eof")
            return True
        self.reader.receive_data(b"")
        self._answer()
        return True  # we close ourselves once every answer is queued

    def pause_writing(self) -> None:
        self.paused = True
        self.worker.stats.backpressure_pauses += 1
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        # The client reads again: progress.  While paused, the unread input
        # waited on us, not on the client, so the request clock restarts too.
        self.paused = False
        self.last_rx = _monotonic()
        if self.started_at is not None and not self.closing:  # (closing: the lingering clock)
            self.started_at = self.last_rx
        self._answer()
        if not self.paused and not self.closing:
            self.transport.resume_reading()

    def close(self, reason: str) -> None:
        """Close after the queued answers are sent."""
        if not self.closing:
            self.closing = reason
            self.last_rx = _monotonic()
            self.transport.close()

    def _linger(self, reason: str) -> None:
        """Send what is queued and a FIN, then discard input until the client is done."""
        self.closing = reason
        self.started_at = self.last_rx = _monotonic()  # now the lingering clock
        self.transport.write_eof()

    def expire(self, reason: str) -> None:
        """Close for a timeout: politely if nothing is unsent, else at once."""
        if self.transport.get_write_buffer_size() == 0:
            self.close(reason)
        else:
            self.abort(reason)

    @property
    def lingering(self) -> bool:
        """True in the lingering close after "request too long" (its clock: :attr:`started_at`)."""
        return self.closing == TOO_LONG

    def abort(self, reason: str) -> None:
        """Close now, dropping unsent answers."""
        if not self.closing:
            self.closing = reason
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.closing or ("reset" if exc is not None else "eof")
        fields = _NO_FIELDS
        if self.reader is not None and reason != TOO_LONG:
            partial = self.reader.partial
            if partial:
                fields = {"unfinished": printable(partial)}
        self.worker.connection_lost(self, reason, fields)

    def peer(self) -> str:
        """The client's address, ``host:port`` (asked when needed: uvloop keeps it after the close)."""
        try:
            address = self.transport.get_extra_info("peername")
        except Exception:  # noqa: BLE001 - a transport that cannot say: the line still goes out
            return "unknown"
        if type(address) is tuple and ":" not in address[0]:
            return f"{address[0]}:{address[1]}"  # IPv4, the usual case, without format_peer's call
        return format_peer(address)

    @property
    def partial(self) -> bytes:
        """Received bytes not answered yet."""
        return self.reader.partial if self.reader is not None else b""

    def idle(self) -> bool:
        """True between questions with every answer sent: safe to close in a drain."""
        return not self.partial and not self.paused and self.transport.get_write_buffer_size() == 0


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

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.header: bytes | None = b""  # the header's bytes so far; None once parsed
        self.client: str | None = None  # the header's client address, once parsed
        self.via: str | None = None
        self.proxy_error: str | None = None
        self.started_at = self.opened

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        address = transport.get_extra_info("peername")
        host = address[0] if isinstance(address, tuple) else None
        if not proxy.is_trusted(host, self.worker.proxy_trusted):
            self._reject("proxy_untrusted", "peer not in PROXY_TRUSTED")

    def data_received(self, data: bytes) -> None:
        if self.header is None:
            Connection.data_received(self, data)
        elif not self.closing:
            self._header_data(data)
        else:
            self.bytes_in += len(data)

    def _header_data(self, data: bytes) -> None:
        buf = self.header + data if self.header else data
        self.last_rx = _monotonic()
        try:
            header = proxy.parse_header(buf, self.worker.proxy_versions)
        except proxy.ProxyHeaderError as exc:
            self.bytes_in += len(data)
            missing = isinstance(exc, proxy.MissingProxyHeaderError)
            self._reject("proxy_missing" if missing else "proxy_invalid", str(exc))
            return
        if header is None:
            self.bytes_in += len(data)
            self.header = buf
            return
        self.bytes_in += header.length - (len(buf) - len(data))
        self.header = None
        commands = self.worker.stats.proxy_headers
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

    def _reject(self, reason: str, error: str) -> None:
        self.proxy_error = error
        self.close(reason)

    def eof_received(self) -> bool:
        if self.header and not self.closing:
            self._reject("proxy_invalid", "end of stream inside the PROXY header")
            return True
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.closing or ("reset" if exc is not None else "eof")
        fields: dict[str, Any] = {}
        if self.via is not None:
            fields["via"] = self.via
        if self.proxy_error is not None:
            fields["proxy_error"] = self.proxy_error
        partial = self.header or self.partial
        if partial and reason != TOO_LONG:
            fields["unfinished"] = printable(partial)
        self.worker.connection_lost(self, reason, fields)
