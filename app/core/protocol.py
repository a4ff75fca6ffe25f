"""Sans-I/O framing of the Zen protocol (docs/protocol.md).

Owns: turning received bytes into complete questions, the size limit,
whitespace skipping before a question, pipelining and end of stream; and, on
the client side, turning received bytes into complete answers.

Never: touches a socket, a clock, a thread or an event loop.  Every server in
the project (the production worker and every architecture in ``app.lab``)
and every client feed bytes in and take questions or answers out, so one
table of byte-level tests covers them all.  ``receive_data(b"")`` means end
of stream, so a caller can pass ``recv()``'s result straight in.
"""

from __future__ import annotations

import re
from typing import Final

#: docs/protocol.md, the size limit: 1024 bytes, counting the ``?``.  Three times the
#: longest aphorism is more than any honest client needs, and small enough
#: that 10,000 half-sent questions cost at most 10 MiB.
DEFAULT_MAX_QUESTION: Final = 1024

_WHITESPACE: Final = frozenset(b" \t\r\n")
#: The same bytes, as ``bytes.lstrip`` takes them; none is above ``_SPACE``,
#: a cheaper test than the set (and lstrip leaves any other byte alone).
_WHITESPACE_BYTES: Final = b" \t\r\n"
_SPACE: Final = ord(" ")
_MARK: Final = ord("?")
_NOT_WHITESPACE: Final = re.compile(rb"[^ \t\r\n]")
#: One question with the whitespace before it: the pipelined fast path.
_QUESTION: Final = re.compile(rb"[ \t\r\n]*+([^?]*+\?)")


def whole_questions(data: bytes, max_size: int, limit: int) -> list[bytes] | None:
    """The questions of ``data`` when it is only whole questions, for a reader that holds nothing.

    Returns exactly what an empty reader's ``receive_data(data)`` then
    ``next_questions(limit)`` would return when that leaves the reader
    holding nothing (the usual read: one question, or a pipelined batch
    ending with a ``?``); otherwise None, and the caller feeds a reader.  One
    ``find`` or ``split`` instead of the reader's regular expression and
    bookkeeping: the hot path of an I/O layer with no reader to feed.
    """
    mark = data.find(b"?")
    if mark < 0 or limit < 1:
        return None
    if mark == len(data) - 1:  # one question: the usual read
        if data[0] <= _SPACE:
            data = data.lstrip(_WHITESPACE_BYTES)
        return [data] if len(data) <= max_size else None
    if data[-1] != _MARK:
        return None  # an unfinished question at the end: the reader keeps it
    stems = data.split(b"?")
    stems.pop()  # the empty piece after the last "?"
    if len(stems) > limit:
        return None  # more than one batch: the reader hands them out
    questions = [(stem.lstrip(_WHITESPACE_BYTES) if stem and stem[0] <= _SPACE else stem) + b"?" for stem in stems]
    if len(data) > max_size and max(map(len, questions)) > max_size:
        return None  # one is too long: the reader answers those before it, then TOO_LONG
    return questions


class QuestionReader:
    """Bytes in, complete questions out, for one connection.

    Feed with :meth:`receive_data`, then take questions with
    :meth:`next_questions`, which hands out at most ``limit`` at a time so a
    caller can stop answering while its peer is not reading (backpressure).

    Error handling: a question longer than ``max_size`` sets
    :attr:`too_long`; the questions complete before it are still handed out,
    everything after it is dropped, and the caller answers ``TOO_LONG`` and
    closes.  Resource handling: never buffers more than ``max_size`` bytes of
    an unfinished question, plus the complete questions of the last
    ``receive_data`` call that were not taken yet.
    """

    __slots__ = ("_buf", "_pos", "eof", "max_size", "too_long")

    def __init__(self, max_size: int = DEFAULT_MAX_QUESTION) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self._buf = b""
        self._pos = 0
        self.eof = False
        self.too_long = False

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if self.eof or self.too_long:
            return
        if not data:
            self.eof = True
        elif self._pos >= len(self._buf):
            self._buf, self._pos = data, 0
        else:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0

    def feed(self, data: bytes, limit: int = 1 << 30) -> list[bytes]:
        """:meth:`receive_data` then :meth:`next_questions`, in one call (the hot path)."""
        if data and not self._buf and not self.too_long and not self.eof:
            questions = whole_questions(data, self.max_size, limit)
            if questions is not None:
                return questions  # only whole questions, nothing held: nothing to keep
            self._buf = data
        else:
            self.receive_data(data)
        return self.next_questions(limit)

    @property
    def buffered(self) -> bool:
        """True while any byte is held (an unfinished question, or questions not taken yet)."""
        return bool(self._buf)

    def next_questions(self, limit: int = 1 << 30) -> list[bytes]:
        """Return up to ``limit`` complete questions, in order, each with its ``?``."""
        buf, pos = self._buf, self._pos
        count = buf.count(b"?", pos)
        if count == 1 and not pos and buf[-1] == _MARK and buf[0] not in _WHITESPACE and len(buf) <= self.max_size:
            self._buf = b""  # the common case: the data is exactly one question
            return [buf]
        if 1 < count <= limit:
            # Pipelined: let the regex engine cut every question in one C call.
            last = buf.rfind(b"?") + 1
            out = _QUESTION.findall(buf, pos, last)
            if max(map(len, out)) <= self.max_size:
                self._pos = last
                return out + self._scan(limit - len(out))
        return self._scan(limit)

    def _scan(self, limit: int) -> list[bytes]:
        """The general loop: whitespace, the size limit, ``limit``."""
        buf, pos, end, size = self._buf, self._pos, len(self._buf), self.max_size
        out: list[bytes] = []
        while pos < end and len(out) < limit:
            if buf[pos] in _WHITESPACE:
                match = _NOT_WHITESPACE.search(buf, pos)
                if match is None:
                    pos = end
                    break
                pos = match.start()
            mark = buf.find(b"?", pos, pos + size)
            if mark < 0:
                if end - pos >= size:
                    self.too_long = True
                    pos = end
                break
            out.append(buf[pos : mark + 1])
            pos = mark + 1
        if pos >= end:
            self._buf, self._pos = b"", 0
        else:
            self._pos = pos
        return out

    @property
    def partial(self) -> bytes:
        """The buffered bytes not yet taken as questions (may hold complete ones)."""
        return self._buf[self._pos :] if self._pos else self._buf

    @property
    def started(self) -> bool:
        """True while bytes of a question (not only whitespace) are buffered."""
        rest = self._buf[self._pos :]
        return bool(rest) and _NOT_WHITESPACE.search(rest) is not None

    @property
    def has_complete(self) -> bool:
        """True when a complete question is buffered and not taken yet."""
        return self._buf.find(b"?", self._pos) >= 0

    @property
    def finished(self) -> bool:
        """True after EOF or an oversize question, once nothing is left to take."""
        return (self.eof or self.too_long) and not self.has_complete


class AnswerReader:
    """Bytes in, complete answers out, for a client: an answer ends with ``.``.

    Resource handling: an answer longer than ``max_size`` raises
    :class:`ValueError`; no answer of the protocol is longer than 64 bytes.
    """

    __slots__ = ("_buf", "eof", "max_size")

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size
        self._buf = b""
        self.eof = False

    def receive_data(self, data: bytes) -> list[bytes]:
        """Add received bytes and return the answers completed by them."""
        if not data:
            self.eof = True
            return []
        buf = self._buf + data
        *complete, rest = buf.split(b".")
        if len(rest) > self.max_size:
            raise ValueError(f"answer longer than {self.max_size} bytes")
        self._buf = rest
        return [piece + b"." for piece in complete]

    @property
    def partial(self) -> bytes:
        """Bytes of an answer not yet complete."""
        return self._buf


def printable(data: bytes, limit: int = 64) -> str:
    """Client bytes as a one-line, escaped string for a log event.

    ``repr`` escapes newlines, carriage returns and terminal escape
    sequences, so a question cannot forge or corrupt a log line.
    """
    head = data[:limit]
    text = repr(head)[2:-1]
    return text + "..." if len(data) > limit else text
