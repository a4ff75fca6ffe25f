"""Clients of the Zen protocol, on the same sans-I/O core as the servers.

Owns: connecting, sending questions and reading answers (blocking), and the
health probe behind ``python -m app check``.

Never: retries silently or hides an error: a timeout, a reset or a closed
connection raises.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Sequence
from typing import Self

from app.core import zen
from app.core.protocol import AnswerReader


class ZenClient:
    """A blocking connection that asks questions and returns answers.

    Resource handling: use as a context manager or call :meth:`close`.
    Error handling: ``TimeoutError`` past ``timeout`` seconds for one
    answer, ``ConnectionError`` when the server closes before answering.
    """

    def __init__(self, host: str, port: int, *, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = AnswerReader()
        self._ready: list[bytes] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send raw bytes (one or several questions, or part of one)."""
        self.sock.sendall(data)

    def read_answers(self, count: int) -> list[bytes]:
        """Wait for ``count`` answers."""
        while len(self._ready) < count:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"server closed the connection ({self.reader.partial!r} pending)")
            self._ready.extend(self.reader.receive_data(data))
        out, self._ready = self._ready[:count], self._ready[count:]
        return out

    def ask(self, question: bytes) -> bytes:
        """Send one question and return its answer."""
        self.send(question)
        return self.read_answers(1)[0]

    def ask_all(self, questions: Sequence[bytes]) -> list[bytes]:
        """Pipeline ``questions`` in one write and return their answers, in order."""
        self.send(b"".join(questions))
        return self.read_answers(len(questions))


def connect_host(host: str) -> str:
    """The address to connect to for a server listening on ``host`` (a wildcard means loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


def ask(host: str, port: int, questions: Iterable[bytes], *, timeout: float = 5.0) -> list[bytes]:
    """Ask ``questions`` one at a time on one connection, as the book's client does."""
    with ZenClient(host, port, timeout=timeout) as client:
        return [client.ask(q) for q in questions]


def probe_preamble(proxy_protocol: str) -> bytes:
    """What a probe sends first when the server requires a PROXY header.

    A v2 ``LOCAL`` header (what HAProxy's own health checks send) or v1's
    ``PROXY UNKNOWN``: the server accepts either from a trusted peer and
    keeps the connection's real address.
    """
    from app.core import proxy  # noqa: PLC0415 - only with PROXY_PROTOCOL on

    if proxy_protocol == "off":
        return b""
    if proxy_protocol == "v1":
        return proxy.v1_line(None, None)
    return proxy.v2_header(None, None)


def check(host: str, port: int, *, timeout: float, proxy_protocol: str = "off") -> tuple[bool, str]:
    """Health probe: ask the probe question; (healthy, what happened)."""
    start = time.monotonic()
    try:
        with ZenClient(connect_host(host), port, timeout=timeout) as client:
            client.send(probe_preamble(proxy_protocol))
            got = client.ask(zen.PROBE_QUESTION)
    except (OSError, ValueError) as exc:
        return False, f"unhealthy: {type(exc).__name__}: {exc}"
    elapsed = (time.monotonic() - start) * 1000
    if got != zen.PROBE_ANSWER:
        return False, f"unhealthy: wrong answer {got!r}"
    return True, f"healthy: answered in {elapsed:.1f} ms"
