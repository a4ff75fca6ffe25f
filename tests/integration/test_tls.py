"""TLS and mutual TLS on a real worker: handshakes, the conformance table over TLS, mTLS, deadlines, logs."""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import ConfigError, Settings
from app.core import proxy
from app.server.connection import Connection
from app.server.tls import ProxiedTLSConnection, TLSConnection, server_context
from app.tools.bench import LoadSpec, run_load
from tests.conformance import _EOF_EXPECT, CASES, Case, recv_exactly, recv_until_eof
from tests.integration.conftest import FAST, RunningWorker, run_worker
from tests.tls_support import PKI, client_context, make_pki, serial_of, tls_connect

Q1, A1 = b"Beautiful is better than?", b"Ugly."
Q2, A2 = b"Simple is better than?", b"Complex."


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: PKI, **changes: Any) -> Settings:
    return FAST.replace(tls_cert_file=str(pki.server[0]), tls_key_file=str(pki.server[1]), **changes)


@pytest.fixture
def tls_worker(pki: PKI) -> Iterator[RunningWorker]:
    with run_worker(tls_settings(pki)) as running:
        yield running


@pytest.fixture
def mtls_worker(pki: PKI) -> Iterator[RunningWorker]:
    with run_worker(tls_settings(pki, tls_client_ca_file=str(pki.ca[0]))) as running:
        yield running


def closed_line(worker: RunningWorker, port: int) -> dict[str, object]:
    """The connection_closed line of the client whose local port is ``port``."""
    return worker.log.wait_for("connection_closed", lambda e: str(e["peer"]).endswith(f":{port}"))


# -- the class and the handshakes ------------------------------------------------------


def test_the_tls_class_is_chosen_at_construction(pki: PKI) -> None:
    with run_worker(tls_settings(pki)) as running:
        assert issubclass(running.worker.connection_class, TLSConnection)
    proxied = tls_settings(pki, proxy_protocol="v2", proxy_trusted=("127.0.0.0/8",))
    with run_worker(proxied) as running:
        assert issubclass(running.worker.connection_class, ProxiedTLSConnection)
    with run_worker() as plain:
        assert plain.worker.connection_class is Connection  # the plain hot path is untouched


@pytest.mark.parametrize(
    ("version", "name"), [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")]
)
def test_python_handshake_and_log_fields(
    tls_worker: RunningWorker, pki: PKI, version: ssl.TLSVersion, name: str
) -> None:
    with tls_connect(tls_worker.host, tls_worker.port, client_context(pki, version=version)) as sock:
        assert sock.version() == name
        assert serial_of(sock) == 1001
        sock.sendall(Q1)
        assert sock.recv(100) == A1
        sock.sendall(Q2)
        assert sock.recv(100) == A2
        port = sock.getsockname()[1]
    line = closed_line(tls_worker, port)
    assert line["tls_version"] == name
    assert isinstance(line["tls_cipher"], str)
    assert "GCM" in line["tls_cipher"] or "CHACHA20" in line["tls_cipher"]
    assert line["answered"] == 2
    assert line["bytes_in"] == len(Q1) + len(Q2)  # the application's bytes, not the records'
    assert "tls_error" not in line
    assert "tls_client" not in line  # no mutual TLS


def test_min_version_13_refuses_12(pki: PKI) -> None:
    with run_worker(tls_settings(pki, tls_min_version="1.3")) as running:
        with pytest.raises(ssl.SSLError):
            tls_connect(running.host, running.port, client_context(pki, version=ssl.TLSVersion.TLSv1_2)).close()
        line = running.log.wait_for("connection_closed")
        assert line["reason"] == "tls_error"
        with tls_connect(running.host, running.port, client_context(pki)) as sock:
            assert sock.version() == "TLSv1.3"


def _s_client(port: int, pki: PKI, flag: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            flag,
            "-CAfile",
            str(pki.ca[0]),
            "-servername",
            "localhost",
            "-verify_return_error",
            "-quiet",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _read_until(fd: int, want: bytes, timeout: float = 10.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            got += chunk
    return got


@pytest.mark.parametrize(("flag", "name"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_openssl_s_client(tls_worker: RunningWorker, pki: PKI, flag: str, name: str) -> None:
    proc = _s_client(tls_worker.port, pki, flag)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdin.write(Q1)
        proc.stdin.flush()
        assert A1 in _read_until(proc.stdout.fileno(), A1)
    finally:
        proc.kill()
        proc.wait(10)
    line = tls_worker.log.wait_for("connection_closed", lambda e: e.get("tls_version") == name)
    assert line["answered"] == 1


# -- the conformance table over TLS ---------------------------------------------------------


class TLSStream:
    """A blocking TLS client over memory BIOs, so that it can send close_notify and keep reading.

    ``shutdown()`` is TLS's half-close: the server answers what it has and
    then closes, as after a TCP FIN in plain text (a socket-level FIN under
    TLS is a truncation, not an end of stream).
    """

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self._until_done(self.obj.do_handshake)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def _until_done(self, op: object) -> object:
        while True:
            try:
                result = op()  # type: ignore[operator]
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("EOF inside a TLS operation") from None
            else:
                self._flush()
                return result

    def sendall(self, data: bytes) -> None:
        for i in range(0, len(data), 16384):
            self.obj.write(data[i : i + 16384])
            self._flush()

    def recv(self, size: int) -> bytes:
        try:
            return self._until_done(lambda: self.obj.read(size))  # type: ignore[return-value]
        except (ssl.SSLZeroReturnError, ConnectionError):
            return b""

    def shutdown(self) -> None:
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify sent; the server's comes later
        self._flush()

    def close(self) -> None:
        self.sock.close()


def check_case_tls(host: str, port: int, ctx: ssl.SSLContext, case: Case) -> None:
    """``tests.conformance.check_case`` over TLS: the same steps, sent whole (one thread owns the TLS state)."""
    stream = TLSStream(host, port, ctx)
    try:
        for step in case.steps:
            if step.split:
                for i in range(0, len(step.send), step.split):
                    stream.sendall(step.send[i : i + step.split])
                    time.sleep(0.001)
            else:
                stream.sendall(step.send)
            got = recv_exactly(stream, len(step.expect))
            assert got == step.expect, f"{case.id}: expected {step.expect!r}, got {got!r}"
        if case.half_close:
            stream.shutdown()
        if case.expect_eof:
            rest = recv_until_eof(stream)
            want = _EOF_EXPECT.get(case.id, b"")
            assert rest == want, f"{case.id}: expected {want!r} then EOF, got {rest!r}"
    finally:
        stream.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance_over_tls(tls_worker: RunningWorker, pki: PKI, case: Case) -> None:
    check_case_tls(tls_worker.host, tls_worker.port, client_context(pki), case)


# -- mutual TLS ------------------------------------------------------------------------


def _mtls_attempt(worker: RunningWorker, pki: PKI, cert: tuple[Path, Path] | None) -> dict[str, object]:
    """Connect with ``cert`` and ask; the server's close line (the client may or may not see an error)."""
    sock = socket.create_connection((worker.host, worker.port), timeout=5)
    port = sock.getsockname()[1]
    try:
        tls = client_context(pki, cert=cert).wrap_socket(sock, server_hostname="localhost")
        tls.sendall(Q1)
        answer = tls.recv(100)
        tls.close()
    except (ssl.SSLError, OSError):
        answer = b""
        sock.close()
    line = closed_line(worker, port)
    line["_answer"] = answer
    return line


def test_mtls_good_certificate_is_served_and_named(mtls_worker: RunningWorker, pki: PKI) -> None:
    line = _mtls_attempt(mtls_worker, pki, pki.client)
    assert line["_answer"] == A1
    assert line["tls_client"] == "client-1"
    assert line["reason"] == "eof"


@pytest.mark.parametrize(
    ("which", "error"),
    [
        ("none", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("other_client", "CERTIFICATE_VERIFY_FAILED (unable to get local issuer certificate)"),
        ("expired_client", "CERTIFICATE_VERIFY_FAILED (certificate has expired)"),
    ],
)
def test_mtls_refuses(mtls_worker: RunningWorker, pki: PKI, which: str, error: str) -> None:
    cert = None if which == "none" else getattr(pki, which)
    line = _mtls_attempt(mtls_worker, pki, cert)
    assert line["_answer"] == b""
    assert line["reason"] == "tls_error"
    assert line["tls_error"] == error
    assert line["answered"] == 0
    # and the worker still serves a good client
    assert _mtls_attempt(mtls_worker, pki, pki.client)["_answer"] == A1


# -- deadlines, plain text, PROXY + TLS ----------------------------------------------------------


def test_stalled_handshake_is_closed_at_the_request_timeout(pki: PKI) -> None:
    with run_worker(tls_settings(pki, request_timeout=0.5)) as running:
        with socket.create_connection((running.host, running.port), timeout=5) as sock:
            start = time.monotonic()
            assert sock.recv(100) == b""  # closed by the server, nothing sent
            elapsed = time.monotonic() - start
            port = sock.getsockname()[1]
        line = closed_line(running, port)
    assert line["reason"] == "request_timeout"
    assert 0.4 < elapsed < 2.0


def test_half_a_client_hello_is_closed_at_the_request_timeout(pki: PKI) -> None:
    with run_worker(tls_settings(pki, request_timeout=0.5)) as running:
        hello = _client_hello(pki)
        with socket.create_connection((running.host, running.port), timeout=5) as sock:
            sock.sendall(hello[: len(hello) // 2])
            assert sock.recv(100) == b""
            port = sock.getsockname()[1]
        assert closed_line(running, port)["reason"] == "request_timeout"


def _client_hello(pki: PKI) -> bytes:
    """A real ClientHello's bytes (from a memory-BIO handshake that goes no further)."""
    out = ssl.MemoryBIO()
    obj = client_context(pki).wrap_bio(ssl.MemoryBIO(), out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_plain_text_on_a_tls_port_is_closed_with_the_reason(tls_worker: RunningWorker, pki: PKI) -> None:
    with tls_connect(tls_worker.host, tls_worker.port, client_context(pki)) as good:
        with socket.create_connection((tls_worker.host, tls_worker.port), timeout=5) as plain:
            plain.sendall(Q1 + b"\r\n")
            try:
                data = plain.recv(100)
            except ConnectionResetError:
                data = b""
            assert A1 not in data
            port = plain.getsockname()[1]
        line = closed_line(tls_worker, port)
        assert line["reason"] == "tls_error"
        assert line["tls_error"] in {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL"}
        good.sendall(Q2)  # the other connection is still served
        assert good.recv(100) == A2


def test_proxy_header_then_tls(pki: PKI) -> None:
    client, server = ("203.0.113.7", 40001), ("198.51.100.1", 1060)
    settings = tls_settings(pki, proxy_protocol="v2", proxy_trusted=("127.0.0.0/8",))
    with run_worker(settings) as running:
        hello = _client_hello(pki)
        # The header and the ClientHello's start in one segment: the handshake must get those bytes.
        with socket.create_connection((running.host, running.port), timeout=5) as raw:
            raw.sendall(proxy.v2_header(client, server) + hello)
            raw.close()
        running.log.wait_for("connection_closed", lambda e: e["peer"] == "203.0.113.7:40001")
        sock = socket.create_connection((running.host, running.port), timeout=5)
        sock.sendall(proxy.v2_header(client, server))
        with client_context(pki).wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(Q1)
            assert tls.recv(100) == A1
            via = "{}:{}".format(*tls.getsockname())
        line = running.log.wait_for("connection_closed", lambda e: e.get("via") == via)
    assert line["peer"] == "203.0.113.7:40001"
    assert line["tls_version"] == "TLSv1.3"
    assert line["answered"] == 1


# -- the boot checks ----------------------------------------------------------------------


def test_server_context_names_each_problem(pki: PKI, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"TLS_CERT_FILE='.*nope.pem': cannot read it"):
        server_context(FAST.replace(tls_cert_file=missing, tls_key_file=str(pki.server[1])))
    with pytest.raises(ConfigError, match="TLS_KEY_FILE='': required"):
        server_context(FAST.replace(tls_cert_file=str(pki.server[0])))
    with pytest.raises(ConfigError, match="the key does not match the certificate"):
        server_context(FAST.replace(tls_cert_file=str(pki.server[0]), tls_key_file=str(pki.client[1])))
    with pytest.raises(ConfigError, match="the certificate expired on"):
        server_context(FAST.replace(tls_cert_file=str(pki.expired_server[0]), tls_key_file=str(pki.expired_server[1])))
    with pytest.raises(ConfigError) as both:
        server_context(FAST.replace(tls_cert_file=missing, tls_key_file=missing, tls_client_ca_file=missing))
    assert len(str(both.value).splitlines()) == 3  # one line per problem
    assert server_context(FAST) is None


def test_failed_handshakes_leave_no_connection_behind(tls_worker: RunningWorker, pki: PKI) -> None:
    for _ in range(20):
        with socket.create_connection((tls_worker.host, tls_worker.port), timeout=5) as plain:
            plain.sendall(Q1)
            try:
                plain.recv(100)
            except ConnectionResetError:
                pass
    deadline = time.monotonic() + 5
    while tls_worker.call(lambda: tls_worker.worker.stats.closes.get("tls_error", 0)) < 20:
        assert time.monotonic() < deadline, "the failed handshakes were not all reported"
        time.sleep(0.02)
    assert tls_worker.call(lambda: tls_worker.worker.conns.count) == 0  # each reported once, none left open
    with tls_connect(tls_worker.host, tls_worker.port, client_context(pki)) as sock:
        sock.sendall(Q1)
        assert sock.recv(100) == A1


@pytest.mark.parametrize("mode", ["churn", "pingpong"])
def test_bench_speaks_tls(tls_worker: RunningWorker, pki: PKI, mode: str) -> None:
    spec = LoadSpec(host=tls_worker.host, port=tls_worker.port, mode=mode, connections=4, duration=0.5,
                    processes=1, tls=True, tls_ca=str(pki.ca[0]))  # fmt: skip
    tally = run_load(spec)
    assert tally.errors == 0, tally.error_kinds
    assert tally.answers > 10
    line = tls_worker.log.wait_for("connection_closed", lambda e: e.get("answered", 0) > 0)
    assert line["tls_version"] == "TLSv1.3"
