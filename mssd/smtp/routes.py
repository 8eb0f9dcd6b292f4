"""Where mail for a domain goes: static routes from the settings, else DNS MX records.

RFC 5321 §5.1: the MX records of the domain, lowest preference first (equal preferences
in random order); without MX, the domain itself (implicit MX); a single MX of "." is a
null MX (RFC 7505): the domain accepts no mail, a permanent failure.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from mssd.config import parse_route


@dataclass(frozen=True)
class Peer:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class RouteError(Exception):
    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class Router:
    def __init__(self, routes: Sequence[str], *, timeout: float, port: int = 25) -> None:
        self._static: dict[str, Peer] = {}
        for route in routes:
            domain, host, route_port = parse_route(route)
            self._static[domain] = Peer(host, route_port)
        self._timeout = timeout
        self._port = port
        self._resolver: dns.asyncresolver.Resolver | None = None

    async def peers(self, domain: str) -> list[Peer]:
        """The hosts to try, in order; RouteError when there is none."""
        static = self._static.get(domain.lower())
        if static is not None:
            return [static]
        try:
            domain_ascii = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise RouteError(f"invalid domain name {domain!r}", permanent=True) from None
        if self._resolver is None:
            # Made once (it reads /etc/resolv.conf), with dnspython's answer cache.
            self._resolver = dns.asyncresolver.Resolver()
            self._resolver.lifetime = self._timeout
            self._resolver.cache = dns.resolver.Cache()
        resolver = self._resolver
        try:
            answer = await resolver.resolve(domain_ascii, "MX")
        except dns.resolver.NXDOMAIN:
            raise RouteError(f"domain {domain} does not exist (DNS)", permanent=True) from None
        except dns.resolver.NoAnswer:
            return [Peer(domain_ascii, self._port)]  # RFC 5321 §5.1: implicit MX
        except dns.exception.DNSException as error:
            raise RouteError(f"MX look-up for {domain} failed: {error}", permanent=False) from None
        records: list[tuple[int, float, str]] = []
        for rdata in answer:
            host = str(rdata.exchange).rstrip(".")
            records.append((int(rdata.preference), random.random(), host))
        if len(records) == 1 and records[0][2] == "":
            raise RouteError(f"domain {domain} accepts no mail (null MX)", permanent=True)
        return [Peer(host, self._port) for _, _, host in sorted(records) if host]
