"""HAProxy and TLS on loopback: deploy/haproxy-tls-offload.cfg and deploy/haproxy-tls-passthrough.cfg, run as shipped.

Offload: HAProxy terminates TLS, ``python -m app`` behind it in plain text
with PROXY v2.  Passthrough: HAProxy relays the TLS bytes, the server reads
the PROXY header and then terminates TLS itself.  Each test starts one
server and one HAProxy (every ``ZEN_SERVER_n`` points at that server), on
127.0.0.1 only; both are stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.server import REPO, free_port, start_server
from tests.tls_support import PKI, client_context, make_pki, serial_of, tls_connect

Q1, A1 = b"Beautiful is better than?", b"Ugly."


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def haproxy(config: str, server_port: int, tmp: Path, **env: str) -> Iterator[int]:
    """Run ``deploy/<config>`` in front of 127.0.0.1:``server_port``; yields its port once it accepts."""
    if shutil.which("haproxy") is None:
        raise AssertionError("haproxy is not installed: .ci/apt-packages.txt lists it (apt-get install haproxy)")
    port = free_port()
    full_env = {
        **os.environ,
        "ZEN_BIND": f"127.0.0.1:{port}",
        **{f"ZEN_SERVER_{i}": f"127.0.0.1:{server_port}" for i in (1, 2, 3)},
        "ZEN_CHECK_INTER": "200ms",
        "ZEN_CHECK_TIMEOUT": "1s",
        "ZEN_STATS_SOCKET": str(tmp / "haproxy.sock"),
        **env,
    }
    log = (tmp / "haproxy.log").open("wb")
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(REPO / "deploy" / config)], env=full_env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (tmp / "haproxy.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "haproxy did not listen"
                time.sleep(0.05)
        yield port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


def ask(port: int, pki: PKI) -> tuple[bytes, int, str]:
    """One TLS question through ``port``: (answer, server certificate serial, our local address)."""
    with tls_connect("127.0.0.1", port, client_context(pki)) as sock:
        sock.sendall(Q1)
        answer = sock.recv(100)
        return answer, serial_of(sock), "{}:{}".format(*sock.getsockname())


def _is_check(event: dict[str, object]) -> bool:
    return event.get("event") == "connection_closed" and "via" not in event and event.get("answered") == 1


def test_offload_haproxy_terminates_tls_the_server_is_plain(pki: PKI, tmp_path: Path) -> None:
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes(pki.server[0].read_bytes() + pki.server[1].read_bytes())
    env = {"WORKERS": "1", "PROXY_PROTOCOL": "v2", "PROXY_TRUSTED": "127.0.0.1/32"}
    with (
        start_server(env) as server,
        haproxy("haproxy-tls-offload.cfg", server.port, tmp_path, ZEN_TLS_PEM=str(pem)) as port,
    ):
        server.wait_event("connection_closed", _is_check)  # a health check got its answer
        answer, serial, local = ask(port, pki)
        assert answer == A1
        assert serial == 1001  # HAProxy presented the certificate
        line = server.wait_event("connection_closed", lambda e: e.get("peer") == local)
        assert "via" in line  # through HAProxy, the client's own address from the PROXY header
        assert "tls_version" not in line  # plain text behind the load balancer
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
            plain.sendall(Q1)
            assert A1 not in recv_all(plain)  # HAProxy's port speaks TLS only


def test_passthrough_the_server_terminates_tls_after_the_proxy_header(pki: PKI, tmp_path: Path) -> None:
    env = {
        "WORKERS": "2",
        "PROXY_PROTOCOL": "v2",
        "PROXY_TRUSTED": "127.0.0.1/32",
        "TLS_CERT_FILE": str(pki.server[0]),
        "TLS_KEY_FILE": str(pki.server[1]),
    }
    with start_server(env) as server, haproxy("haproxy-tls-passthrough.cfg", server.port, tmp_path) as port:
        check = server.wait_event("connection_closed", lambda e: _is_check(e) and "tls_version" in e)
        assert check["reason"] in {"eof", "reset"}  # HAProxy's check: PROXY LOCAL, handshake, question
        answers = [ask(port, pki) for _ in range(5)]
        assert {a for a, _, _ in answers} == {A1}
        assert {s for _, s, _ in answers} == {1001}  # our server's certificate, relayed untouched
        local = answers[-1][2]
        line = server.wait_event("connection_closed", lambda e: e.get("peer") == local)
        assert line["via"].startswith("127.0.0.1:")
        assert line["tls_version"] == "TLSv1.3"
        assert line["reason"] == "eof"


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        pass
    return data


def test_configs_are_valid(tmp_path: Path) -> None:
    pem = tmp_path / "any.pem"
    pki = make_pki(tmp_path)
    pem.write_bytes(pki.server[0].read_bytes() + pki.server[1].read_bytes())
    for config in ("haproxy-tls-offload.cfg", "haproxy-tls-passthrough.cfg"):
        env = {**os.environ, "ZEN_TLS_PEM": str(pem), "ZEN_STATS_SOCKET": str(tmp_path / "s.sock")}
        result = subprocess.run(
            ["haproxy", "-c", "-f", str(REPO / "deploy" / config)], env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
