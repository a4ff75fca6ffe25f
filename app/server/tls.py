"""TLS and mutual TLS on the Zen port: the server's context and the TLS connection classes.

Owns: building the server's ``ssl.SSLContext`` from the settings, with the
boot-time checks of its files (:func:`server_context`, which raises
``ConfigError`` with one line per problem, so the CLI exits 2), and the
connection classes a worker picks when TLS is on (:func:`connection_class`):
:class:`TLSConnection`, and :class:`ProxiedTLSConnection`, which reads the
PROXY header in plain text first (HAProxy passing TLS through with
``send-proxy-v2``), then starts the handshake.

Never: accepts, logs or keeps timers (the worker does, as for plain
connections), and never touches the plain :class:`~app.server.connection.Connection`'s
hot path: TLS is a class of its own, chosen once per worker.

How a connection becomes TLS: the accepted transport is plain; in
``connection_made`` the connection wraps it in uvloop's own ``SSLProtocol``
(what ``loop.start_tls`` does, without a task and a coroutine per
connection) and is called again with the TLS transport once the handshake
is done.  The handshake counts as a started request: ``started_at`` is the
connection's opening, so the worker's sweep closes a client that never
finishes it at REQUEST_TIMEOUT, like a question that never ends.  A failed
handshake (plain text or garbage on a TLS port, a client certificate that
does not verify) closes with reason ``tls_error`` and the SSL error's short
name in the ``tls_error`` field; the close line of a TLS connection carries
``tls_version`` and ``tls_cipher`` (and ``tls_client`` with mutual TLS).

The defaults, and why:

- TLS 1.2 at least (``TLS_MIN_VERSION``): 1.0 and 1.1 are deprecated (RFC 8996).
- No compression (``OP_NO_COMPRESSION``): CRIME; Zen answers are tiny anyway.
- No renegotiation (``OP_NO_RENEGOTIATION``): a client-triggered renegotiation
  costs the server a handshake for free; TLS 1.3 removed it.
- Server cipher preference (``OP_CIPHER_SERVER_PREFERENCE``): the server's
  list puts AEAD with forward secrecy first, whatever a client prefers.
- TLS 1.2 ciphers: ECDHE with AES-GCM or ChaCha20-Poly1305 only (no CBC,
  no static RSA key exchange).
- Session tickets on (OpenSSL's default, kept): a returning client resumes
  without a full handshake, which is the expensive part.
- Groups X25519 first, then P-256 (OpenSSL's order; X25519 is the faster).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]  # not in uvloop's stubs

from app.config import ConfigError
from app.core import proxy
from app.core.policy import CloseReason
from app.core.protocol import printable
from app.server.connection import Connection, ConnectionContext, ProxiedConnection

if TYPE_CHECKING:
    from app.config import Settings

_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
#: TLS 1.2 suites (1.3's are fixed and all AEAD): forward secrecy and AEAD only.
CIPHERS_TLS12: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
#: uvloop's own limit on a handshake, as a backstop: the worker's sweep closes
#: a slow one at REQUEST_TIMEOUT long before (this is a multiple of it).
HANDSHAKE_BACKSTOP: Final = 4

_TLS_ERROR: Final = CloseReason.TLS_ERROR
_RESET: Final = CloseReason.RESET
_EOF: Final = CloseReason.EOF
_TOO_LONG: Final = CloseReason.TOO_LONG


def enabled(settings: Settings) -> bool:
    """True when the Zen port speaks TLS (a certificate or a key is set; both are then required)."""
    return bool(settings.tls_cert_file or settings.tls_key_file)


def _unreadable(name: str, path: str) -> str | None:
    """One line if ``path`` cannot be read, else None."""
    try:
        with Path(path).open("rb"):
            pass
    except OSError as exc:
        return f"invalid {name}={path!r}: cannot read it ({exc.strerror or exc})"
    return None


def _file_problems(settings: Settings) -> list[str]:
    problems = []
    if enabled(settings) and not (settings.tls_cert_file and settings.tls_key_file):
        missing = "TLS_KEY_FILE" if settings.tls_cert_file else "TLS_CERT_FILE"
        problems.append(f"invalid {missing}='': required when the other of TLS_CERT_FILE/TLS_KEY_FILE is set")
    if settings.tls_client_ca_file and not enabled(settings):
        problems.append("invalid TLS_CLIENT_CA_FILE: mutual TLS needs TLS_CERT_FILE and TLS_KEY_FILE")
    for name, path in (
        ("TLS_CERT_FILE", settings.tls_cert_file),
        ("TLS_KEY_FILE", settings.tls_key_file),
        ("TLS_CLIENT_CA_FILE", settings.tls_client_ca_file),
    ):
        if path:
            problem = _unreadable(name, path)
            if problem:
                problems.append(problem)
    return problems


def cert_expiry(path: str) -> float:
    """The notAfter of the first certificate in the PEM file ``path``, as a Unix time."""
    # The stdlib's only certificate parser without a handshake; stable since Python 2.7.
    decoded: dict[str, Any] = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]  # noqa: SLF001
    return ssl.cert_time_to_seconds(decoded["notAfter"])


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or None when TLS is off.

    Raises ``ConfigError`` (one line per problem): a missing or unreadable
    file, a key that does not match its certificate, an expired
    certificate, a CA file with no certificate.
    """
    if not enabled(settings) and not settings.tls_client_ca_file:
        return None
    problems = _file_problems(settings)
    if problems:
        raise ConfigError("\n".join(problems))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[settings.tls_min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(CIPHERS_TLS12)
    try:
        ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except ssl.SSLError as exc:
        why = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(exc) else exc.reason or exc
        problems.append(f"invalid TLS_CERT_FILE/TLS_KEY_FILE: {why}")
    else:
        expires = cert_expiry(settings.tls_cert_file)
        if expires <= time.time():
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
            problems.append(f"invalid TLS_CERT_FILE={settings.tls_cert_file!r}: the certificate expired on {when}")
    if settings.tls_client_ca_file:
        try:
            ctx.load_verify_locations(cafile=settings.tls_client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        except ssl.SSLError as exc:
            problems.append(f"invalid TLS_CLIENT_CA_FILE={settings.tls_client_ca_file!r}: {exc.reason or exc}")
    if problems:
        raise ConfigError("\n".join(problems))
    return ctx


def error_name(exc: BaseException | None) -> str:
    """The SSL error's short name (``WRONG_VERSION_NUMBER``), else the exception's type.

    A client certificate that does not verify adds OpenSSL's reason in
    brackets (``CERTIFICATE_VERIFY_FAILED (certificate has expired)``).
    """
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason} ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return type(exc).__name__ if exc is not None else "eof"


def _subject_cn(cert: dict[str, Any] | None) -> str | None:
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _TLSStage(Connection):
    """The TLS behaviour shared by both connection classes.

    No slots of its own: two bases that both add slots cannot be combined,
    so the concrete classes declare them (:data:`_TLS_SLOTS`).
    """

    __slots__ = ()

    sslcontext: ssl.SSLContext  # set on the class by connection_class()
    handshake_backstop: float
    tls: Any  # the TLS transport, once the handshake is done
    tls_error: str | None
    peer_name: str

    def _start_tls(self, transport: Any, first: bytes = b"") -> None:
        """Wrap the plain ``transport``; ``first``: bytes already read past a PROXY header."""
        self.started_at = self.opened  # the handshake is a started request
        # (the slots of these three names are declared by the concrete classes: _TLS_SLOTS)
        self.peer_name = Connection.peer(self)  # type: ignore[misc]  # the TLS transport forgets it once closed
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_over)
        wrapper = SSLProtocol(
            loop,
            self,
            self.sslcontext,
            waiter,
            True,  # server_side, positional in uvloop's signature
            None,
            call_connection_made=True,
            ssl_handshake_timeout=self.handshake_backstop,
        )
        transport.set_protocol(wrapper)
        wrapper.connection_made(transport)
        if first:
            buf = wrapper.get_buffer(len(first))
            buf[: len(first)] = first
            wrapper.buffer_updated(len(first))

    def _handshaken(self, transport: Any) -> None:
        """The handshake is done: serve questions on the TLS ``transport``."""
        self.tls = transport
        self.transport = transport
        high, low = self.ctx.write_limits
        transport.set_write_buffer_limits(high, low)
        self.active = time.monotonic()
        self.started_at = None

    def _handshake_over(self, waiter: asyncio.Future[Any]) -> None:
        """The handshake's end; on failure, report the close (uvloop tells the connection nothing)."""
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is None and self.tls is not None:
            return
        self.tls_error = "cancelled" if waiter.cancelled() else error_name(exc)  # type: ignore[misc]
        if not self.closing:
            self.closing = _TLS_ERROR
        if self.transport is not None:  # not reported yet
            self.transport.close()
            self.ctx.host.connection_lost(self, self.closing, self.tls_fields())

    def tls_fields(self) -> dict[str, Any]:
        """The TLS fields of the close line: version and cipher, the client's CN, or the error."""
        fields: dict[str, Any] = {}
        tls = self.tls
        if tls is not None:
            sslobj = tls.get_extra_info("ssl_object")
            if sslobj is not None:
                fields["tls_version"] = sslobj.version()
                cipher = sslobj.cipher()
                fields["tls_cipher"] = cipher[0] if cipher else None
                if self.sslcontext.verify_mode == ssl.CERT_REQUIRED:
                    fields["tls_client"] = _subject_cn(sslobj.getpeercert())
        if self.tls_error is not None:
            fields["tls_error"] = self.tls_error
        return fields

    def _tls_eof(self) -> bool:
        # uvloop ends a TLS stream after close_notify whatever this returns
        # (and warns if it is True): answer what is complete, then let it close.
        Connection.eof_received(self)
        return False

    def _tls_linger(self) -> None:
        # TLS has no half-close that uvloop exposes (write_eof is not
        # supported): keep discarding input, then close with close_notify
        # once the client is quiet (time_out below), so the answer survives.
        self.closing = _TOO_LONG
        self.started_at = self.active = time.monotonic()

    def _tls_time_out(self, reason: CloseReason) -> None:
        if self.closing is _TOO_LONG and self.tls is not None:
            self.transport.close()  # the lingering close's end: close_notify, then FIN
        elif self.closing:
            self.abort(reason)
        else:
            self.expire(reason)

    def _tls_lost(self, exc: Exception | None, fields: dict[str, Any]) -> None:
        if isinstance(exc, ssl.SSLError) and not self.closing:
            self.closing = _TLS_ERROR
            self.tls_error = error_name(exc)  # type: ignore[misc]
        reason = self.closing or (_RESET if exc is not None else _EOF)
        fields.update(self.tls_fields())
        partial = self.partial
        if partial and reason is not _TOO_LONG:
            fields["unfinished"] = printable(partial)
        self.ctx.host.connection_lost(self, reason, fields)


_TLS_SLOTS: Final = ("peer_name", "tls", "tls_error")


class TLSConnection(_TLSStage, Connection):
    """A connection that speaks TLS from its first byte."""

    __slots__ = _TLS_SLOTS

    def __init__(self, ctx: ConnectionContext) -> None:
        super().__init__(ctx)
        self.tls: Any = None  # the TLS transport, once the handshake is done
        self.tls_error: str | None = None
        self.peer_name = ""

    def connection_made(self, transport: Any) -> None:
        if self.transport is not None:  # called again by the TLS layer: the handshake is done
            self._handshaken(transport)
            return
        Connection.connection_made(self, transport)
        if not self.closing:
            self._start_tls(transport)

    def eof_received(self) -> bool:
        return self._tls_eof()

    def _linger(self) -> None:
        self._tls_linger()

    def time_out(self, reason: CloseReason) -> None:
        self._tls_time_out(reason)

    def peer(self) -> str:
        return self.peer_name or Connection.peer(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._tls_lost(exc, {})


class ProxiedTLSConnection(_TLSStage, ProxiedConnection):
    """A PROXY header in plain text (from a trusted load balancer), then TLS."""

    __slots__ = _TLS_SLOTS

    def __init__(self, ctx: ConnectionContext) -> None:
        super().__init__(ctx)
        self.tls: Any = None
        self.tls_error: str | None = None
        self.peer_name = ""

    def connection_made(self, transport: Any) -> None:
        if self.transport is not None:
            self._handshaken(transport)
            return
        ProxiedConnection.connection_made(self, transport)

    def data_received(self, data: bytes) -> None:
        if self.tls is not None:
            Connection.data_received(self, data)
            return
        if self.header is None or self.closing:  # closing (the TLS layer reads once the header is parsed)
            self.bytes_in += len(data)
            return
        # Hand _header_data the header's bytes only: what follows it is the ClientHello's start.
        held = self.header or b""
        try:
            header = proxy.parse_header(held + data, self.ctx.proxy_versions)
        except proxy.ProxyHeaderError:
            header = None  # _header_data rejects it, with the reason
        cut = len(data) if header is None else header.length - len(held)
        self._header_data(data[:cut])
        if self.header is None and not self.closing:
            self._start_tls(self.transport, data[cut:])

    def peer(self) -> str:
        return self.client if self.client is not None else self.peer_name or Connection.peer(self)

    def eof_received(self) -> bool:
        if self.tls is None:
            return ProxiedConnection.eof_received(self)
        return self._tls_eof()

    def _linger(self) -> None:
        self._tls_linger()

    def time_out(self, reason: CloseReason) -> None:
        self._tls_time_out(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        fields: dict[str, Any] = {}
        if self.via is not None:
            fields["via"] = self.via
        if self.proxy_error is not None:
            fields["proxy_error"] = self.proxy_error
        self._tls_lost(exc, fields)


def connection_class(settings: Settings, proxied: bool) -> tuple[type[Connection], ssl.SSLContext | None]:
    """The connection class of a worker under ``settings`` (None: TLS is off), and its TLS context.

    A subclass per worker carries the context, so a connection holds no
    extra reference to it.  Raises ``ConfigError`` as :func:`server_context`.
    """
    sslctx = server_context(settings)
    if sslctx is None:
        return (ProxiedConnection if proxied else Connection), None
    base: type[Any] = ProxiedTLSConnection if proxied else TLSConnection
    attrs = {
        "__slots__": (),
        "sslcontext": sslctx,
        "handshake_backstop": settings.request_timeout * HANDSHAKE_BACKSTOP,
    }
    return type(base.__name__, (base,), attrs), sslctx
