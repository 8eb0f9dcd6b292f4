"""PROXY protocol headers as a load balancer sends them (haproxy's
``proxy-protocol.txt``, §2.1 and §2.2), written from the specification for tests."""

from __future__ import annotations

import ipaddress

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_LOCAL = SIGNATURE + b"\x20\x00\x00\x00"
"""A version 2 LOCAL header: the proxy's own connection, such as a health check."""


def v1(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = "TCP4" if src.version == 4 else "TCP6"
    # §2.1: IPv6 as groups of hexadecimal digits (never a dotted IPv4 suffix).
    text = " ".join(str(ip) if ip.version == 4 else ip.exploded for ip in (src, dst))
    return f"PROXY {family} {text} {source_port} {destination_port}\r\n".encode()


def v2(
    source: str,
    destination: str,
    source_port: int,
    destination_port: int,
    *,
    tlvs: bytes = b"",
) -> bytes:
    """A version 2 PROXY command for TCP over IPv4 or IPv6."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = b"\x11" if src.version == 4 else b"\x21"
    block = (
        src.packed
        + dst.packed
        + source_port.to_bytes(2, "big")
        + destination_port.to_bytes(2, "big")
        + tlvs
    )
    return SIGNATURE + b"\x21" + family + len(block).to_bytes(2, "big") + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value
