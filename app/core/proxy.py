"""The PROXY protocol header (HAProxy's ``proxy-protocol.txt``, v1 and v2), sans-I/O.

Owns: recognising and parsing the header a TCP load balancer puts before
the first byte of a relayed connection (v1 text line or v2 binary block,
with its TLVs and CRC32c), and deciding whether a peer address is one of
the trusted load balancers.

Never: touches a socket, a clock or an event loop (the worker feeds bytes
in and acts on the result), and never *guesses* whether a header is there:
the spec (section 5) forbids serving headerless and headered connections on
one port, so the caller says which versions it requires.

Error handling: :func:`parse_header` returns ``None`` while the header is
incomplete (the spec recommends tolerating split headers), raises
:class:`MissingProxyHeaderError` when the bytes cannot start a header of an
accepted version, and :class:`ProxyHeaderError` for any other deviation
("Any sequence which does not exactly match the protocol must be discarded
and cause the receiver to abort the connection", section 2.1).

Resource handling: a v1 line is at most 107 bytes; a v2 header at most
16 + 65535 bytes (its length field), so a caller buffers a bounded amount.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

V1_PREFIX: Final = b"PROXY "
#: Longest v1 line including CRLF (spec 2.1, "worst case").
V1_MAX_LINE: Final = 107
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED: Final = 16
V2_MAX: Final = V2_FIXED + 0xFFFF

CMD_LOCAL: Final = 0x0
CMD_PROXY: Final = 0x1
#: Address block sizes by family nibble (spec 2.2): INET, INET6, UNIX.
_V2_ADDR_SIZE: Final = {0x1: 12, 0x2: 36, 0x3: 216}
_STREAM: Final = 0x1
_AF_UNIX: Final = 0x3

PP2_TYPE_CRC32C: Final = 0x03

#: PROXY_PROTOCOL setting -> header versions accepted.
MODES: Final[dict[str, frozenset[int]]] = {
    "off": frozenset(),
    "v1": frozenset({1}),
    "v2": frozenset({2}),
    "any": frozenset({1, 2}),
}

_PORT: Final = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header of an accepted version."""


class MissingProxyHeaderError(ProxyHeaderError):
    """The connection does not start with a PROXY header at all."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header.

    ``source`` and ``destination`` are ``None`` when the receiver must use
    the connection's own endpoints: a v2 ``LOCAL`` command (health checks),
    a v1 ``UNKNOWN`` line, or a v2 family/transport this server does not
    relay (UNSPEC, UNIX, DGRAM: the spec's fallback to UNSPEC mode).
    """

    version: int
    command: str  # "PROXY" or "LOCAL" (v1 is always "PROXY")
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes of the connection the header takes
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse_header(data: bytes, versions: Iterable[int] = (1, 2)) -> ProxyHeader | None:
    """Parse the header at the start of ``data``; ``None`` = incomplete, feed more.

    The bytes after ``header.length`` belong to the relayed stream.
    """
    accepted = versions if isinstance(versions, frozenset) else frozenset(versions)
    head = data[: len(V2_SIGNATURE)]
    if 2 in accepted and head == V2_SIGNATURE[: len(head)]:
        return _parse_v2(data) if len(head) == len(V2_SIGNATURE) else None
    head = data[: len(V1_PREFIX)]
    if 1 in accepted and head == V1_PREFIX[: len(head)]:
        return _parse_v1(data) if len(head) == len(V1_PREFIX) else None
    if not data:
        return None
    raise MissingProxyHeaderError(f"no PROXY {_names(accepted)} header: starts with {data[:16]!r}")


def _names(accepted: frozenset[int]) -> str:
    return " or ".join(f"v{v}" for v in sorted(accepted)) or "(none accepted)"


# -- version 1: one text line --------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    window = data[:V1_MAX_LINE]
    end = window.find(b"\r\n")
    stray = _stray_line_end(window, complete=False) if end < 0 else _stray_line_end(window[:end], complete=True)
    if stray:
        raise ProxyHeaderError(f"v1: {stray}")
    if end < 0:
        if len(window) >= V1_MAX_LINE:
            raise ProxyHeaderError(f"v1: no CRLF in the first {V1_MAX_LINE} bytes")
        return None
    try:
        line = window[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1: not US-ASCII") from None
    fields = line.split(" ")
    if fields[1] == "UNKNOWN":  # the rest of the line must be ignored (spec 2.1)
        return ProxyHeader(1, "PROXY", None, None, end + 2)
    if fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"v1: unknown protocol {fields[1]!r}")
    if len(fields) != 6:
        raise ProxyHeaderError(f"v1: {len(fields)} fields separated by single spaces, expected 6")
    src, dst = (_v1_address(fields[1], text) for text in fields[2:4])
    sport, dport = (_v1_port(text) for text in fields[4:6])
    return ProxyHeader(1, "PROXY", (src, sport), (dst, dport), end + 2)


def _stray_line_end(line: bytes, *, complete: bool) -> str:
    """The spec forbids ending the line on a lone CR or LF; a last CR may await its LF."""
    if b"\n" in line:
        return "LF without CR"
    cr = line.find(b"\r")
    if cr >= 0 and (complete or cr < len(line) - 1):
        return "CR without LF"
    return ""


def _v1_address(proto: str, text: str) -> str:
    try:
        if proto == "TCP4":
            return str(ipaddress.IPv4Address(text))  # rejects leading zeroes (Python >= 3.9.5)
        if "%" not in text:  # a scope id is no address on the wire
            return str(ipaddress.IPv6Address(text))
    except ValueError:
        pass
    raise ProxyHeaderError(f"v1: {text!r} is not an {proto} address")


def _v1_port(text: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 0xFFFF:
        raise ProxyHeaderError(f"v1: bad port {text!r} (decimal 0..65535, no leading zeroes)")
    return int(text)


# -- version 2: binary ---------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        return None
    ver_cmd, fam = data[12], data[13]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"v2: version {ver_cmd >> 4}, expected 2")
    command = ver_cmd & 0xF
    if command not in (CMD_LOCAL, CMD_PROXY):
        raise ProxyHeaderError(f"v2: unassigned command {command:#x}")
    family, transport = fam >> 4, fam & 0xF
    if family > 0x3 or transport > 0x2:
        raise ProxyHeaderError(f"v2: unassigned family/transport byte {fam:#04x}")
    total = V2_FIXED + int.from_bytes(data[14:16], "big")
    if len(data) < total:
        return None
    header = data[:total]
    if command == CMD_LOCAL:
        # "must use the real connection endpoints and discard the protocol
        # block including the family which is ignored" (spec 2.2)
        return ProxyHeader(2, "LOCAL", None, None, total)
    if not family or not transport:
        # UNSPEC: the block's layout is unknown, so it is skipped whole
        # ("the receiver should ignore address information").
        return ProxyHeader(2, "PROXY", None, None, total)
    addr_size = _V2_ADDR_SIZE[family]
    if total - V2_FIXED < addr_size:
        raise ProxyHeaderError(f"v2: {total - V2_FIXED} address bytes, family {family:#x} needs {addr_size}")
    tlvs = _parse_tlvs(header, V2_FIXED + addr_size)
    source = destination = None
    if transport == _STREAM and family != _AF_UNIX:
        source, destination = _v2_inet(header[V2_FIXED : V2_FIXED + addr_size])
    return ProxyHeader(2, "PROXY", source, destination, total, tlvs)


def _v2_inet(block: bytes) -> tuple[tuple[str, int], tuple[str, int]]:
    size = (len(block) - 4) // 2
    src, dst = _ntop(block[:size]), _ntop(block[size : 2 * size])
    ports = block[2 * size :]
    return (src, int.from_bytes(ports[:2], "big")), (dst, int.from_bytes(ports[2:], "big"))


def _ntop(packed: bytes) -> str:
    # IPv4 by inet_ntop: once per connection, and ten times cheaper than
    # ipaddress.  IPv6 by ipaddress: glibc writes ::/96 as "::a.b.c.d", not RFC 5952.
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    return str(ipaddress.IPv6Address(packed))


def _parse_tlvs(header: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    pos = start
    while pos < len(header):
        if len(header) - pos < 3:
            raise ProxyHeaderError(f"v2: truncated TLV at byte {pos}")
        kind, size = header[pos], int.from_bytes(header[pos + 1 : pos + 3], "big")
        value = header[pos + 3 : pos + 3 + size]
        if len(value) != size:
            raise ProxyHeaderError(f"v2: TLV {kind:#04x} claims {size} bytes, {len(value)} left")
        if kind == PP2_TYPE_CRC32C:
            _check_crc(header, pos + 3, value)
        tlvs.append((kind, value))
        pos += 3 + size
    return tuple(tlvs)


def _check_crc(header: bytes, at: int, value: bytes) -> None:
    """Spec 2.2.3: the CRC32c of the whole header with the checksum field zeroed."""
    if len(value) != 4:
        raise ProxyHeaderError(f"v2: CRC32C TLV of {len(value)} bytes, expected 4")
    expected = crc32c(header[:at] + b"\0\0\0\0" + header[at + 4 :])
    if int.from_bytes(value, "big") != expected:
        raise ProxyHeaderError("v2: CRC32C mismatch")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B); only header-sized inputs, so pure Python."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- building headers (tests, tools) and trust -----------------------------------


def v1_line(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 header line; ``None`` endpoints give ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP6" if ipaddress.ip_address(source[0]).version == 6 else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


def v2_header(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    tlvs: Sequence[tuple[int, bytes]] = (),
    crc: bool = False,
) -> bytes:
    """A v2 header: PROXY over TCP with endpoints, LOCAL without; ``crc`` appends a CRC32C TLV."""
    if source is None or destination is None:
        ver_cmd, fam, block = 0x20 | CMD_LOCAL, 0x00, b""
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        ver_cmd, fam = 0x20 | CMD_PROXY, (0x11 if src.version == 4 else 0x21)
        block = src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    for kind, value in tlvs:
        block += bytes([kind]) + len(value).to_bytes(2, "big") + value
    if crc:
        block += bytes([PP2_TYPE_CRC32C]) + b"\x00\x04" + b"\0\0\0\0"
    header = V2_SIGNATURE + bytes([ver_cmd, fam]) + len(block).to_bytes(2, "big") + block
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def parse_networks(cidrs: Iterable[str]) -> Networks:
    """``PROXY_TRUSTED`` entries as networks; raises ValueError on a bad one."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


@functools.lru_cache(maxsize=4096)  # a fleet has few balancers: skip ipaddress per connection
def is_trusted(host: str | None, networks: Networks) -> bool:
    """True when ``host`` (a peer address) is inside one of ``networks``."""
    if host is None:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
    return any(addr in net for net in networks)
