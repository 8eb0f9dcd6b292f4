"""The PROXY protocol header, versions 1 (text) and 2 (binary), as pure functions
over the first octets of a connection.

Specification: haproxy's ``doc/proxy-protocol.txt`` (2020/03/05), cited below as
"PP §n". :func:`parse` never consumes anything past the header and tells the
caller how many more octets it may read without reading past it
(:attr:`Incomplete.at_most`): the octets that follow (an IMAP command, a TLS
ClientHello) belong to the next layer.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""PP §2.2: the 12 octets that open a version 2 header."""
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
"""PP §2.1: a version 1 line, CRLF included, is never longer."""
V2_MAX_BLOCK = 4096
"""Largest version 2 address block with its TLVs that we accept. The length field
allows 64 KiB; a load balancer's addresses and TLVs (PP §2.2.1-2.2.7) fit well
within this, so more is treated as garbage rather than buffered."""
SHORTEST_HEADER = len(b"PROXY UNKNOWN\r\n")
"""PP §2.1: the shortest header of either version (a version 2 one has 16 octets)."""

_LOCAL, _PROXY = 0x0, 0x1
_AF_INET, _AF_INET6 = 0x1, 0x2
_STREAM = 0x1
_V1_IPV4 = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(r"[0-9A-Fa-f:]{2,39}")
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class HeaderError(ValueError):
    """Not a valid PROXY header: PP §2.1 and §2.2 require closing the connection."""


@dataclass(frozen=True)
class Endpoint:
    address: str
    """An IP address in Python's canonical text form (IPv6 compressed)."""
    port: int


@dataclass(frozen=True)
class ProxyHeader:
    version: int
    length: int
    """Octets of the connection the header occupies."""
    source: Endpoint | None = None
    """The client as the proxy saw it; None when the real connection's endpoints
    apply (version 2 LOCAL, version 1 UNKNOWN, families other than TCP)."""
    destination: Endpoint | None = None


@dataclass(frozen=True)
class Incomplete:
    at_most: int
    """Octets that may be read next without reading past the end of the header."""


def parse(data: bytes) -> ProxyHeader | Incomplete:
    """The header at the start of ``data``, or how much more to read; raises
    :class:`HeaderError` as soon as ``data`` cannot start a valid header."""
    if not data:
        return Incomplete(SHORTEST_HEADER)
    if _starts_like(data, V2_SIGNATURE):
        return _parse_v2(data)
    if _starts_like(data, V1_PREFIX):
        return _parse_v1(data)
    # PP §2.2, detecting the version: "otherwise ... the connection must be dropped".
    raise HeaderError("not a PROXY protocol header")


def _starts_like(data: bytes, prefix: bytes) -> bool:
    return data[: len(prefix)] == prefix[: len(data)]


# -- version 1 ----------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | Incomplete:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        # PP §2.1: a single CR or LF never ends the line, and the CRLF must come
        # within the first 107 characters.
        if b"\n" in data or b"\r" in data[:-1]:
            raise HeaderError("version 1 line with a lone CR or LF")
        needed = 1 if data.endswith(b"\r") else 2
        if len(data) + needed > V1_MAX_LENGTH:
            raise HeaderError(f"version 1 line without CRLF in {V1_MAX_LENGTH} octets")
        return Incomplete(min(max(SHORTEST_HEADER - len(data), needed), V1_MAX_LENGTH - len(data)))
    line = data[:end]
    if b"\r" in line or b"\n" in line:
        raise HeaderError("version 1 line with a lone CR or LF")
    try:
        fields = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise HeaderError("version 1 line is not US-ASCII") from None
    if fields[1] == "UNKNOWN":
        # PP §2.1: "the receiver must ignore anything presented before the CRLF"
        # and use the real connection's parameters.
        return ProxyHeader(version=1, length=end + 2)
    if len(fields) != 6:
        raise HeaderError("version 1 line needs exactly: PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    family, source, destination, source_port, destination_port = fields[1:]
    if family not in ("TCP4", "TCP6"):
        raise HeaderError(f"version 1 protocol {family[:8]!r} is not TCP4, TCP6 or UNKNOWN")
    return ProxyHeader(
        version=1,
        length=end + 2,
        source=Endpoint(_v1_address(family, source), _v1_port(source_port)),
        destination=Endpoint(_v1_address(family, destination), _v1_port(destination_port)),
    )


def _v1_address(family: str, text: str) -> str:
    # PP §2.1: dotted quads without heading zeroes; IPv6 as hexadecimal groups
    # and colons, one "::" at most; the family named on the line.
    try:
        if family == "TCP4" and _V1_IPV4.fullmatch(text):
            return str(ipaddress.IPv4Address(text))
        if family == "TCP6" and _V1_IPV6.fullmatch(text):
            return str(ipaddress.IPv6Address(text))
    except ValueError:
        pass
    raise HeaderError(f"version 1 address {text[:40]!r} is not a canonical {family} address")


def _v1_port(text: str) -> int:
    # PP §2.1: decimal in [0..65535], no heading zeroes.
    if _V1_PORT.fullmatch(text) and int(text) <= 65535:
        return int(text)
    raise HeaderError(f"version 1 port {text[:8]!r} is not a decimal in 0-65535")


# -- version 2 ----------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | Incomplete:
    if len(data) < 16:
        return Incomplete(16 - len(data))
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise HeaderError(f"version 2 signature with version {version}")
    if command not in (_LOCAL, _PROXY):
        # PP §2.2: "Receivers must drop connections presenting unexpected values here."
        raise HeaderError(f"version 2 command {command} is neither LOCAL nor PROXY")
    family, protocol = data[13] >> 4, data[13] & 0x0F
    if family > 0x3 or protocol > 0x2:
        # PP §2.2: other families and protocols "must be rejected as invalid".
        raise HeaderError(f"version 2 family/protocol byte {data[13]:#04x} is unassigned")
    block_length = int.from_bytes(data[14:16], "big")
    if block_length > V2_MAX_BLOCK:
        raise HeaderError(f"version 2 address block of {block_length} octets is too long")
    total = 16 + block_length
    if len(data) < total:
        return Incomplete(total - len(data))
    if command == _LOCAL:
        # PP §2.2: the proxy's own connection (a health check): "use the real
        # connection endpoints and discard the protocol block including the family".
        return ProxyHeader(version=2, length=total)
    sizes = {(_AF_INET, _STREAM): 4, (_AF_INET6, _STREAM): 16}
    size = sizes.get((family, protocol))
    if size is None:
        # PP §2.2: a receiver "automatically falls back to the UNSPEC mode for the
        # valid combinations ... that it does not support" (UDP, AF_UNIX, UNSPEC),
        # which keeps the real endpoints.
        return ProxyHeader(version=2, length=total)
    block = data[16:total]
    addresses = 2 * size + 4
    if len(block) < addresses:
        raise HeaderError(f"version 2 address block of {len(block)} octets, {addresses} needed")
    _check_tlvs(block[addresses:])
    ip = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    ports = block[2 * size : addresses]
    return ProxyHeader(
        version=2,
        length=total,
        source=Endpoint(str(ip(block[:size])), int.from_bytes(ports[:2], "big")),
        destination=Endpoint(str(ip(block[size : 2 * size])), int.from_bytes(ports[2:], "big")),
    )


def _check_tlvs(data: bytes) -> None:
    """PP §2.2: after the addresses, type (1 octet), length (2 octets), value.

    None is interpreted (PP §2.2: "A receiver may choose to skip over and ignore
    the TLVs"; checking PP2_TYPE_CRC32C is optional, PP §2.2.3), but they must tile the rest
    of the block exactly: anything else means the header is not what it claims."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise HeaderError("version 2 TLV truncated")
        offset += 3 + int.from_bytes(data[offset + 1 : offset + 3], "big")
        if offset > len(data):
            raise HeaderError("version 2 TLV longer than the address block")
