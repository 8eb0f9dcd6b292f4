"""Trusted networks: where plaintext authentication is allowed without TLS
(TLS-terminating proxies, local test tools), for SMTP submission and IMAP."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable


def trusted_matcher(networks: tuple[str, ...]) -> Callable[[str], bool]:
    parsed = [ipaddress.ip_network(n, strict=False) for n in networks]

    def trusted(address: str) -> bool:
        if not parsed or not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in parsed)

    return trusted
