"""Clients of the Zen protocol, on the same sans-I/O core as the servers.

Owns: connecting (plain or TLS: :func:`tls_context`), sending questions and
reading answers (blocking), and the health probe behind ``python -m app
check``, which over TLS also reports the days until the server's
certificate expires and fails below a threshold.

Never: retries silently or hides an error: a timeout, a reset or a closed
connection raises.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from app.core import zen
from app.core.protocol import AnswerReader


class ZenClient:
    """A blocking connection that asks questions and returns answers.

    Resource handling: use as a context manager or call :meth:`close`.
    Error handling: ``TimeoutError`` past ``timeout`` seconds for one
    answer, ``ConnectionError`` when the server closes before answering.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        preamble: bytes = b"",
    ) -> None:
        """Connect; with ``tls``, send ``preamble`` (a PROXY header) in plain text, then shake hands."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            try:
                if preamble:
                    sock.sendall(preamble)
                    preamble = b""
                sock = tls.wrap_socket(sock, server_hostname=server_name or host)
            except BaseException:
                sock.close()
                raise
        self.sock: socket.socket = sock
        if preamble:
            self.send(preamble)
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


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """How a client speaks TLS: the CA to verify the server with, a client certificate, the name to expect."""

    ca: str = ""  # PEM CA bundle; empty: the server's certificate is not verified
    cert: str = ""  # PEM client certificate (mutual TLS)
    key: str = ""
    server_name: str = ""  # SNI and the name to verify (default: the host)


def tls_context(options: TLSOptions) -> ssl.SSLContext:
    """A client context: verify against ``options.ca`` (no verification without one), present ``cert``."""
    if options.ca:
        ctx = ssl.create_default_context(cafile=options.ca)
    else:  # a probe of a server with a private certificate: encrypted, not authenticated
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if options.cert:
        ctx.load_cert_chain(options.cert, options.key or None)
    return ctx


def peer_cert_expiry(sock: ssl.SSLSocket) -> float:
    """When the server's certificate expires (Unix time), verified or not."""
    cert: dict[str, Any] = sock.getpeercert() or {}
    if "notAfter" not in cert:  # not verified: the stdlib parses only files
        der = sock.getpeercert(binary_form=True)
        if der is None:
            raise ssl.SSLError("the server sent no certificate")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "peer.pem"
            path.write_text(ssl.DER_cert_to_PEM_cert(der))
            cert = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]  # noqa: SLF001
    return ssl.cert_time_to_seconds(cert["notAfter"])


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


def check(
    host: str,
    port: int,
    *,
    timeout: float,
    proxy_protocol: str = "off",
    tls: TLSOptions | None = None,
    min_days: float = 0,
) -> tuple[bool, str]:
    """Health probe: ask the probe question; (healthy, what happened).

    Over TLS it also reads the server's certificate: fewer than ``min_days``
    days to its expiry is unhealthy, so a probe warns before an outage.
    """
    start = time.monotonic()
    days = None
    try:
        context = None if tls is None else tls_context(tls)
        name = None if tls is None else tls.server_name or None
        preamble = probe_preamble(proxy_protocol)
        with ZenClient(
            connect_host(host), port, timeout=timeout, tls=context, server_name=name, preamble=preamble
        ) as client:
            got = client.ask(zen.PROBE_QUESTION)
            if isinstance(client.sock, ssl.SSLSocket):
                days = (peer_cert_expiry(client.sock) - time.time()) / 86400
    except (OSError, ValueError) as exc:
        return False, f"unhealthy: {type(exc).__name__}: {exc}"
    elapsed = (time.monotonic() - start) * 1000
    if got != zen.PROBE_ANSWER:
        return False, f"unhealthy: wrong answer {got!r}"
    if days is None:
        return True, f"healthy: answered in {elapsed:.1f} ms"
    expiry = f"certificate expires in {days:.1f} days"
    if days < min_days:
        return False, f"unhealthy: {expiry} (threshold {min_days:g}); answered in {elapsed:.1f} ms"
    return True, f"healthy: answered in {elapsed:.1f} ms over TLS; {expiry}"
