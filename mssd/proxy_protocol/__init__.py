"""PROXY protocol (haproxy's ``proxy-protocol.txt``, versions 1 and 2): how mssd
learns the client's address when a TCP load balancer stands in front of it
(DESIGN.md, Scale-out). ``header`` is the sans-I/O parser; ``accept`` is the thin
asyncio layer that reads a header off each new connection before handing it to a
protocol server (IMAP's stream handler, SMTP's aiosmtpd protocol). It sits beside
``config`` at the bottom of the import order, so any listener may use it; it
imports nothing from mssd but ``metrics``.

Invariants:
- A listener configured for the protocol requires a header on every connection
  and never guesses whether one is present (PP §2, §5): no header, no session.
- Headers are accepted only from the configured load balancer networks, and
  checked before a byte is read (PP §2: "only trusted proxies").
- Nothing past the header is read by this package: the octets after it (a command,
  a TLS ClientHello) stay in the socket for the protocol that owns them; the header
  precedes TLS on implicit-TLS ports.
- Memory per connection is bounded by the header limits (107 octets for version 1,
  16 + ``V2_MAX_BLOCK`` for version 2), and a header that has not arrived within the
  timeout closes the connection.
"""

from mssd.proxy_protocol.accept import (
    ProxiedHandler,
    ProxiedProtocolFactory,
    start_proxied_protocol_server,
    start_proxied_server,
)
from mssd.proxy_protocol.header import (
    Endpoint,
    HeaderError,
    Incomplete,
    ProxyHeader,
    parse,
)

__all__ = [
    "Endpoint",
    "HeaderError",
    "Incomplete",
    "ProxiedHandler",
    "ProxiedProtocolFactory",
    "ProxyHeader",
    "parse",
    "start_proxied_protocol_server",
    "start_proxied_server",
]
