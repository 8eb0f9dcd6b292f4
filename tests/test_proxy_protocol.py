"""The PROXY protocol header parser on the exact octets of haproxy's
``proxy-protocol.txt`` (cited as PP §n), and fuzzed: it never reads past a header
and never fails with anything but HeaderError. The listeners that use it are
tested over real sockets in ``test_imap_proxy_protocol.py`` and
``test_smtp_proxy_protocol.py``."""

from __future__ import annotations

import asyncio

import pytest
from fuzzing import mutated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxy_headers import SIGNATURE, V2_LOCAL, tlv, v1, v2

from mssd.proxy_protocol import (
    Endpoint,
    HeaderError,
    Incomplete,
    ProxyHeader,
    parse,
    start_proxied_server,
)
from mssd.proxy_protocol.accept import REFUSED
from mssd.proxy_protocol.header import V1_MAX_LENGTH, V2_MAX_BLOCK

IMAP_COMMAND = b"a1 CAPABILITY\r\n"
MAX_V6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


# -- version 1 (PP §2.1) ----------------------------------------------------------


def test_v1_example_line_of_the_specification() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert parse(line + b"GET / HTTP/1.1\r\n") == ProxyHeader(
        version=1,
        length=len(line),
        source=Endpoint("192.168.0.1", 56324),
        destination=Endpoint("192.168.0.11", 443),
    )


@pytest.mark.parametrize(
    ("line", "source"),
    [
        (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", "255.255.255.255"),
        (f"PROXY TCP6 {MAX_V6} {MAX_V6} 65535 65535\r\n".encode(), MAX_V6),
        (b"PROXY TCP6 2001:DB8::A 2001:db8::1 1 0\r\n", "2001:db8::a"),
    ],
)
def test_v1_longest_lines_of_each_family(line: bytes, source: str) -> None:
    header = parse(line)
    assert isinstance(header, ProxyHeader)
    assert header.length == len(line) and header.source is not None
    assert header.source.address == source


@pytest.mark.parametrize(
    "line",
    [b"PROXY UNKNOWN\r\n", f"PROXY UNKNOWN {MAX_V6} {MAX_V6} 65535 65535\r\n".encode()],
)
def test_v1_unknown_keeps_the_real_endpoints(line: bytes) -> None:
    assert len(line) <= V1_MAX_LENGTH
    assert parse(line + IMAP_COMMAND) == ProxyHeader(version=1, length=len(line))


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 443\r\n",  # heading zeroes
        b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
        b"PROXY TCP4 256.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY TCP4 ::1 ::1 56324 443\r\n",  # family and address disagree
        b"PROXY TCP6 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY TCP6 fe80::1%eth0 fe80::2 56324 443\r\n",
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 56324 443\r\n",
        b"PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n",  # two spaces
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",
        b"PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n",  # a lone LF never ends it
        b"PROXY TCP4 192.168.0.1\r192.168.0.11 56324 443\r\n",
        "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443é\r\n".encode(),
        b"PROXY " + b"x" * (V1_MAX_LENGTH - 6),  # no CRLF in 107 octets
    ],
)
def test_v1_anything_but_the_exact_format_is_refused(line: bytes) -> None:
    with pytest.raises(HeaderError):
        parse(line)


def test_v1_is_read_at_most_to_its_crlf() -> None:
    assert parse(b"") == Incomplete(15)
    assert parse(b"PROX") == Incomplete(11)
    assert parse(b"PROXY TCP4 192.168") == Incomplete(2)
    assert parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r") == Incomplete(1)


# -- version 2 (PP §2.2) ----------------------------------------------------------


def test_v2_tcp_over_ipv4() -> None:
    header = (
        b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # signature
        b"\x21"  # version 2, PROXY
        b"\x11"  # AF_INET, STREAM
        b"\x00\x0c"  # 12 octets of addresses
        b"\xac\x13\x00\x01\xac\x13\x00\x03"  # 172.19.0.1 -> 172.19.0.3
        b"\xa6\x52\x00\x8f"  # 42578 -> 143
    )
    assert parse(header + IMAP_COMMAND) == ProxyHeader(
        version=2,
        length=28,
        source=Endpoint("172.19.0.1", 42578),
        destination=Endpoint("172.19.0.3", 143),
    )


def test_v2_tcp_over_ipv6() -> None:
    header = v2("2001:db8::7", "2001:db8::1", 50000, 993)
    assert header[12:16] == b"\x21\x21\x00\x24"
    assert parse(header + b"\x16\x03\x01") == ProxyHeader(
        version=2,
        length=16 + 36,
        source=Endpoint("2001:db8::7", 50000),
        destination=Endpoint("2001:db8::1", 993),
    )


@pytest.mark.parametrize(
    "header",
    [
        V2_LOCAL,
        # LOCAL with an address block: skipped, never assumed empty (PP §2.2).
        SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12),
        SIGNATURE + b"\x21\x00\x00\x00",  # PROXY, UNSPEC
        SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # UDP over IPv4
        SIGNATURE + b"\x21\x22\x00\x24" + bytes(36),  # UDP over IPv6
        SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216),  # UNIX stream
    ],
)
def test_v2_local_and_unsupported_families_keep_the_real_endpoints(header: bytes) -> None:
    assert parse(header + IMAP_COMMAND) == ProxyHeader(version=2, length=len(header))


def test_v2_tlvs_are_skipped() -> None:
    tlvs = tlv(0x01, b"imap") + tlv(0x04, b"") + tlv(0x20, b"\x01\x00\x00\x00\x00")
    header = v2("192.0.2.10", "192.0.2.1", 40000, 143, tlvs=tlvs)
    parsed = parse(header)
    assert isinstance(parsed, ProxyHeader)
    assert parsed.length == len(header) and parsed.source == Endpoint("192.0.2.10", 40000)


@pytest.mark.parametrize(
    "header",
    [
        SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a binary header
        SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),  # family 4
        SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),  # protocol 3
        SIGNATURE + b"\x21\x11\x00\x08" + bytes(8),  # IPv4 addresses need 12 octets
        SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # IPv6 addresses need 36
        v2("192.0.2.10", "192.0.2.1", 1, 2, tlvs=b"\x04\x00"),  # truncated TLV
        v2("192.0.2.10", "192.0.2.1", 1, 2, tlvs=b"\x04\x00\x05ab"),  # TLV overruns
        SIGNATURE + b"\x21\x11" + (V2_MAX_BLOCK + 1).to_bytes(2, "big"),
    ],
)
def test_v2_invalid_headers_are_refused(header: bytes) -> None:
    with pytest.raises(HeaderError):
        parse(header)


def test_v2_is_read_exactly() -> None:
    header = v2("192.0.2.10", "192.0.2.1", 40000, 143)
    assert parse(header[:5]) == Incomplete(11)
    assert parse(header[:16]) == Incomplete(12)
    assert parse(header[:27]) == Incomplete(1)


@pytest.mark.parametrize(
    "data",
    [IMAP_COMMAND, b"\x16\x03\x01\x02\x00\x01", b"EHLO x\r\n", b"\r\n\r\nQUIT", b"proxy "],
)
def test_other_protocols_are_refused_at_their_first_octets(data: bytes) -> None:
    with pytest.raises(HeaderError):
        parse(data)


# -- fuzz -------------------------------------------------------------------------


def read_like_a_listener(stream: bytes, sizes: list[int]) -> tuple[ProxyHeader, int]:
    """Feed ``stream`` as the asyncio layer does: never more than ``at_most`` per
    read, reads possibly shorter (``sizes``); returns the header and octets read."""
    received = b""
    reads = iter(sizes)
    while True:
        result = parse(received)
        if isinstance(result, ProxyHeader):
            return result, len(received)
        assert result.at_most >= 1
        size = min(result.at_most, next(reads, result.at_most))
        assert len(received) < len(stream), "asked for more than the stream holds"
        received += stream[len(received) : len(received) + size]


addresses_v4 = st.ip_addresses(v=4).map(str)
addresses_v6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, Endpoint]:
    family = draw(st.sampled_from([addresses_v4, addresses_v6]))
    source, destination = draw(family), draw(family)
    source_port, destination_port = draw(ports), draw(ports)
    if draw(st.booleans()):
        header = v1(source, destination, source_port, destination_port)
    else:
        tlvs = b"".join(
            tlv(kind, value)
            for kind, value in draw(
                st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)
            )
        )
        header = v2(source, destination, source_port, destination_port, tlvs=tlvs)
    return header, Endpoint(source, source_port)


@given(headers(), st.binary(max_size=64), st.lists(st.integers(1, 60), max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_valid_header_is_read_to_its_last_octet_and_no_further(
    case: tuple[bytes, Endpoint], after: bytes, sizes: list[int]
) -> None:
    header, source = case
    parsed, read = read_like_a_listener(header + after, sizes)
    assert read == len(header) == parsed.length
    assert parsed.source == source


@given(
    st.one_of(mutated(headers().map(lambda case: case[0])), st.binary(max_size=200)),
    st.lists(st.integers(1, 60), max_size=40),
)
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_damaged_input_is_refused_or_read_exactly(data: bytes, sizes: list[int]) -> None:
    stream = data + bytes(V1_MAX_LENGTH + 16 + V2_MAX_BLOCK)  # as if the client went on
    try:
        parsed, read = read_like_a_listener(stream, sizes)
    except HeaderError:
        return
    assert parsed.length == read
    assert parsed.version in (1, 2)


# -- the asyncio layer, in process ------------------------------------------------


async def test_connections_closed_before_a_session_are_counted_by_reason() -> None:
    served: list[ProxyHeader] = []

    async def serve(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, header: ProxyHeader
    ) -> None:
        served.append(header)
        writer.close()

    async def listen(name: str, allowed: bool) -> int:
        server = await start_proxied_server(
            serve,
            "127.0.0.1",
            0,
            name=name,
            allowed=lambda address: allowed,
            header_timeout=0.2,
            tls=None,
            limit=1024,
            backlog=8,
        )
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def closed_after(port: int, sent: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        try:
            return await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            return b""
        finally:
            writer.close()

    servers: list[asyncio.Server] = []
    try:
        balanced = await listen("test-balanced", allowed=True)
        elsewhere = await listen("test-elsewhere", allowed=False)
        before = {
            reason: REFUSED.value(name, reason)
            for name, reason in [
                ("test-balanced", "invalid"),
                ("test-balanced", "timeout"),
                ("test-elsewhere", "not-allowed"),
            ]
        }
        assert await closed_after(balanced, b"a1 NOOP\r\n\r\n\r\n") == b""
        assert await closed_after(balanced, b"") == b""  # the timeout closes it
        assert await closed_after(elsewhere, v2("192.0.2.1", "192.0.2.2", 1, 2)) == b""
        assert REFUSED.value("test-balanced", "invalid") == before["invalid"] + 1
        assert REFUSED.value("test-balanced", "timeout") == before["timeout"] + 1
        assert REFUSED.value("test-elsewhere", "not-allowed") == before["not-allowed"] + 1
        assert served == []
    finally:
        for server in servers:
            server.close()
