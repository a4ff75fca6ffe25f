"""Byte-level tests of app.core.proxy against HAProxy's proxy-protocol.txt (its examples and rules)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core import proxy
from app.core.proxy import MissingProxyHeaderError, ProxyHeader, ProxyHeaderError, parse_header

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # spec 2.2, byte for byte

# -- version 1: the spec's own lines (section 2.1) ------------------------------

V1_EXAMPLES = [
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ("255.255.255.255", 65535),
        ("255.255.255.255", 65535),
    ),
    (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
    ),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    (b"PROXY TCP6 2001:db8::1 ::1 1 0\r\n", ("2001:db8::1", 1), ("::1", 0)),
]


@pytest.mark.parametrize(("line", "src", "dst"), V1_EXAMPLES)
def test_v1_spec_examples(line: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
    header = parse_header(line + b"GET / HTTP/1.1\r\n")
    assert header == ProxyHeader(1, "PROXY", src, dst, len(line))


def test_v1_line_lengths_match_the_spec() -> None:
    assert len(V1_EXAMPLES[0][0]) == 56
    assert len(V1_EXAMPLES[1][0]) == 104
    worst = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(worst) == proxy.V1_MAX_LINE == 107
    assert parse_header(worst) == ProxyHeader(1, "PROXY", None, None, 107)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN whatever 1 2 3\r\n"])
def test_v1_unknown_uses_the_real_endpoints(line: bytes) -> None:
    header = parse_header(line + b"Simple is better than?")
    assert header is not None
    assert (header.source, header.destination, header.length) == (None, None, len(line))


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n",  # lone LF
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\r\n",  # CR then CRLF
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r443\r\n",  # CR inside
        b"PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n",  # two spaces
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n",  # trailing space
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",  # a field missing
        b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 443\r\n",  # heading zeroes in an address
        b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",  # heading zero in a port
        b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",  # port out of range
        b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family and address disagree
        b"PROXY TCP6 192.168.0.1 192.168.0.11 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # scope ids are not addresses on the wire
        b"PROXY UDP4 192.168.0.1 192.168.0.11 1 2\r\n",  # only TCP4, TCP6, UNKNOWN
        b"PROXY tcp4 192.168.0.1 192.168.0.11 1 2\r\n",
        b"PROXY \r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.\xc9 1 2\r\n",  # not US-ASCII
        b"PROXY TCP4 " + b"1" * 120,  # no CRLF within 107 bytes
    ],
)
def test_v1_deviations_are_rejected(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError) as info:
        parse_header(line)
    assert not isinstance(info.value, MissingProxyHeaderError)


def test_v1_waits_for_crlf_up_to_107_bytes() -> None:
    line = V1_EXAMPLES[2][0]
    for cut in range(len(line)):
        assert parse_header(line[:cut]) is None, cut
    assert parse_header(b"PROXY UNKNOWN " + b"x" * 92) is None  # 106 bytes, no CRLF yet
    with pytest.raises(ProxyHeaderError, match="no CRLF"):
        parse_header(b"PROXY UNKNOWN " + b"x" * 93)


# -- version 2 ------------------------------------------------------------------


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    size = len(block) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + block


TCP4_BLOCK = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + (56324).to_bytes(2, "big") + (443).to_bytes(2, "big")


def test_v2_signature_is_the_specs() -> None:
    assert proxy.V2_SIGNATURE == SIG
    assert SIG.startswith(b"\r\n\r\n\x00\r\nQUIT\n")


def test_v2_proxy_tcp4() -> None:
    data = v2(0x21, 0x11, TCP4_BLOCK) + b"Beautiful is better than?"
    header = parse_header(data)
    assert header == ProxyHeader(2, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443), 28)
    assert data[28:] == b"Beautiful is better than?"


def test_v2_proxy_tcp6() -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes(15) + b"\x01"
    data = v2(0x21, 0x21, src + dst + (1234).to_bytes(2, "big") + (1060).to_bytes(2, "big"))
    assert parse_header(data) == ProxyHeader(2, "PROXY", ("2001:db8::1", 1234), ("::1", 1060), 16 + 36)


def test_v2_local_as_haproxy_health_checks_send_it() -> None:
    # \x20 = version 2, LOCAL; \x00 = UNSPEC; length 0 (spec 2.2: "When a
    # sender presents a LOCAL connection, it should not present any address").
    data = SIG + b"\x20\x00\x00\x00" + b"Beautiful is better than?"
    assert parse_header(data) == ProxyHeader(2, "LOCAL", None, None, 16)


def test_v2_local_skips_whatever_block_its_length_announces() -> None:
    # "Receivers MUST always consider this field to skip the appropriate
    # number of bytes and must not assume zero is presented for LOCAL."
    data = v2(0x20, 0x11, TCP4_BLOCK + b"\x04\x00\x01x") + b"?"
    header = parse_header(data)
    assert header == ProxyHeader(2, "LOCAL", None, None, 16 + 16)


@pytest.mark.parametrize("fam", [0x00, 0x10, 0x01, 0x12, 0x22])
def test_v2_unspec_and_datagram_fall_back_to_the_real_endpoints(fam: int) -> None:
    block = TCP4_BLOCK if fam >> 4 == 1 else bytes(36) if fam >> 4 == 2 else b""
    header = parse_header(v2(0x21, fam, block))
    assert header is not None
    assert (header.command, header.source, header.destination) == ("PROXY", None, None)


def test_v2_unix_is_skipped_to_the_real_endpoints() -> None:
    header = parse_header(v2(0x21, 0x31, b"/run/a.sock".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")))
    assert header is not None
    assert (header.source, header.length) == (None, 16 + 216)


def test_v2_tlvs_are_kept_and_crc32c_is_checked() -> None:
    data = proxy.v2_header(("10.0.0.1", 5), ("10.0.0.2", 6), tlvs=[(0x05, b"id-42"), (0x04, b"")], crc=True)
    header = parse_header(data)
    assert header is not None
    assert header.source == ("10.0.0.1", 5)
    assert [k for k, _ in header.tlvs] == [0x05, 0x04, proxy.PP2_TYPE_CRC32C]
    assert header.tlvs[0] == (0x05, b"id-42")
    corrupt = bytearray(data)
    corrupt[16] ^= 0x01  # one bit of the source address
    with pytest.raises(ProxyHeaderError, match="CRC32C"):
        parse_header(bytes(corrupt))


def test_crc32c_check_value() -> None:
    assert proxy.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720 B.4)
    assert proxy.crc32c(b"") == 0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (SIG + b"\x11\x11\x00\x0c" + TCP4_BLOCK, "version 1"),  # version nibble must be 2
        (SIG + b"\x31\x11\x00\x0c" + TCP4_BLOCK, "version 3"),
        (SIG + b"\x22\x11\x00\x0c" + TCP4_BLOCK, "command"),  # commands other than LOCAL/PROXY
        (SIG + b"\x2f\x11\x00\x0c" + TCP4_BLOCK, "command"),
        (SIG + b"\x21\x41\x00\x0c" + TCP4_BLOCK, "family"),  # family 4 is unassigned
        (SIG + b"\x21\x13\x00\x0c" + TCP4_BLOCK, "family"),  # transport 3 is unassigned
        (SIG + b"\x21\x11\x00\x0b" + TCP4_BLOCK[:11], "address bytes"),  # too short for INET
        (SIG + b"\x21\x21\x00\x0c" + TCP4_BLOCK, "address bytes"),  # too short for INET6
        (v2(0x21, 0x11, TCP4_BLOCK + b"\x05\x00"), "truncated TLV"),
        (v2(0x21, 0x11, TCP4_BLOCK + b"\x05\x00\x09abc"), "claims 9"),
        (v2(0x21, 0x11, TCP4_BLOCK + b"\x03\x00\x02ab"), "CRC32C TLV of 2"),
    ],
)
def test_v2_deviations_are_rejected(data: bytes, match: str) -> None:
    with pytest.raises(ProxyHeaderError, match=match):
        parse_header(data)


def test_v2_waits_for_the_whole_header() -> None:
    data = v2(0x21, 0x11, TCP4_BLOCK)
    for cut in range(len(data)):
        assert parse_header(data[:cut]) is None, cut
    assert parse_header(data) is not None


def test_v2_length_field_up_to_64k() -> None:
    data = v2(0x21, 0x11, TCP4_BLOCK + b"\x04" + (0xFFFF - 15).to_bytes(2, "big") + bytes(0xFFFF - 15))
    header = parse_header(data)
    assert header is not None
    assert header.length == proxy.V2_MAX


# -- detection and versions -------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b"Beautiful is better than?", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PROXZ", b"\r\n\r\n\x01"]
)
def test_anything_else_is_a_missing_header(data: bytes) -> None:
    with pytest.raises(MissingProxyHeaderError):
        parse_header(data)


def test_only_the_configured_versions_are_accepted() -> None:
    line = V1_EXAMPLES[2][0]
    block = v2(0x21, 0x11, TCP4_BLOCK)
    assert parse_header(line, proxy.MODES["v1"]) is not None
    assert parse_header(block, proxy.MODES["v2"]) is not None
    with pytest.raises(MissingProxyHeaderError):
        parse_header(line, proxy.MODES["v2"])
    with pytest.raises(MissingProxyHeaderError):
        parse_header(block, proxy.MODES["v1"])
    with pytest.raises(MissingProxyHeaderError):
        parse_header(b"P", proxy.MODES["v2"])  # decided on the first byte
    assert parse_header(b"", proxy.MODES["any"]) is None


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    for mode in ("v1", "v2", "any"):
        try:
            header = parse_header(data, proxy.MODES[mode])
        except ProxyHeaderError:
            continue
        assert header is None or 0 < header.length <= len(data)


@given(
    st.ip_addresses(),
    st.ip_addresses(),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.booleans(),
)
def test_built_headers_round_trip(src: object, dst: object, sport: int, dport: int, crc: bool) -> None:
    s, d = str(src), str(dst)
    if (":" in s) != (":" in d):
        return  # one family per header
    for data in (proxy.v1_line((s, sport), (d, dport)), proxy.v2_header((s, sport), (d, dport), crc=crc)):
        header = parse_header(data + b"?")
        assert header is not None
        assert header.source == (s, sport)
        assert header.destination == (d, dport)
        assert header.length == len(data)


# -- trust ---------------------------------------------------------------------------


def test_trusted_networks() -> None:
    nets = proxy.parse_networks(["10.1.0.0/16", " ::1/128 ", "", "192.168.1.7"])
    assert proxy.is_trusted("10.1.2.3", nets)
    assert proxy.is_trusted("::ffff:10.1.2.3", nets)  # IPv4 peer on a dual-stack listener
    assert proxy.is_trusted("::1", nets)
    assert proxy.is_trusted("192.168.1.7", nets)
    assert not proxy.is_trusted("192.168.1.8", nets)
    assert not proxy.is_trusted("10.2.0.1", nets)
    assert not proxy.is_trusted(None, nets)
    assert not proxy.is_trusted("not-an-address", nets)
    assert not proxy.is_trusted("10.1.2.3", ())
    with pytest.raises(ValueError):
        proxy.parse_networks(["10.0.0.0/33"])
