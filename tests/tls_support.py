"""Certificates for the TLS tests, made at run time with the ``openssl`` CLI (no key is committed).

All keys are ECDSA P-256.  A test CA signs the server's certificate
(``localhost`` and ``127.0.0.1``) and a client's (CN ``client-1``); another
CA signs a client the server must refuse; an expired client and an expired
server certificate come from the test CA (notAfter in the past).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

_LEAF_EXT = """\
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth,clientAuth
"""


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


#: What a CA certificate states about itself.  Python 3.13's default contexts verify with
#: VERIFY_X509_STRICT, which refuses a CA without a key usage extension.
_CA_EXT = ("basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign", "subjectKeyIdentifier=hash")


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-days", "30", "-subj", f"/CN={name}",
             *(arg for ext in _CA_EXT for arg in ("-addext", ext)))  # fmt: skip
    return cert, key


def issue(ca: tuple[Path, Path], directory: Path, name: str, *, serial: int = 1, days: int = 30) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca``: (certificate, key); ``days=-1`` gives an expired one."""
    cert, key, csr, ext = (directory / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
    ext.write_text(_LEAF_EXT)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}")  # fmt: skip
    sign = ("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial", str(serial),
            "-extfile", ext, "-out", cert)  # fmt: skip
    if days >= 0:
        _openssl(*sign, "-days", str(days))
        return cert, key
    try:  # OpenSSL 3.0-3.3 (Debian bookworm): a negative validity puts notAfter in the past
        _openssl(*sign, "-days", str(days))
    except subprocess.CalledProcessError:  # OpenSSL 3.4+ (Debian trixie) refuses it, but takes explicit dates
        _openssl(*sign, "-not_before", "20200101000000Z", "-not_after", "20200102000000Z")
    return cert, key


@dataclass(frozen=True)
class PKI:
    """The test certificates (each a (certificate, key) pair of paths)."""

    ca: tuple[Path, Path]
    other_ca: tuple[Path, Path]
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    other_client: tuple[Path, Path]
    expired_client: tuple[Path, Path]
    expired_server: tuple[Path, Path]


def make_pki(directory: Path) -> PKI:
    ca = make_ca(directory, "test-ca")
    other = make_ca(directory, "other-ca")
    return PKI(
        ca=ca,
        other_ca=other,
        server=issue(ca, directory, "localhost", serial=1001),
        client=issue(ca, directory, "client-1", serial=2001),
        other_client=issue(other, directory, "intruder", serial=3001),
        expired_client=issue(ca, directory, "expired-client", serial=4001, days=-1),
        expired_server=issue(ca, directory, "expired-server", serial=5001, days=-1),
    )


def client_context(
    pki: PKI, *, cert: tuple[Path, Path] | None = None, version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A client context trusting the test CA, presenting ``cert`` if given, pinned to ``version`` if given."""
    ctx = ssl.create_default_context(cafile=str(pki.ca[0]))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def tls_connect(host: str, port: int, ctx: ssl.SSLContext, *, timeout: float = 5.0) -> ssl.SSLSocket:
    """A TLS connection (handshake done) to ``host:port``, server name ``localhost``."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


def serial_of(sock: ssl.SSLSocket) -> int:
    """The serial number of the server certificate ``sock`` was given."""
    cert = sock.getpeercert()
    assert cert, "no verified peer certificate"
    return int(str(cert["serialNumber"]), 16)
