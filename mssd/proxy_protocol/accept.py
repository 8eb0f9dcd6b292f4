"""Listening behind a load balancer: each connection's PROXY header is read, then
the connection is handed to the protocol that serves it, in plaintext or after the
TLS handshake of an implicit-TLS port (the load balancer sends the header first and
relays the client's TLS after it).

The header is read through a :class:`asyncio.BufferedProtocol` whose buffers are
exactly as large as :func:`header.parse` allows, so the kernel keeps whatever
follows the header; the transport is then switched to the serving protocol (or
wrapped with ``loop.start_tls``), as ``loop.create_server`` would have connected
it. :func:`start_proxied_protocol_server` hands the transport to any
:class:`asyncio.Protocol` (aiosmtpd's SMTP is one);
:func:`start_proxied_server` builds a :class:`asyncio.StreamReaderProtocol` on it
for a stream handler, as ``asyncio.start_server`` would. This works on asyncio's
loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from mssd import metrics
from mssd.proxy_protocol.header import (
    SHORTEST_HEADER,
    HeaderError,
    Incomplete,
    ProxyHeader,
    parse,
)

log = logging.getLogger(__name__)

ProxiedHandler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter, ProxyHeader], Awaitable[None]
]
"""Serves one connection; the header says who the client is."""

ProxiedProtocolFactory = Callable[[ProxyHeader], asyncio.BaseProtocol]
"""The protocol that serves one connection, made once its header has arrived."""

REFUSED = metrics.counter(
    "mssd_proxy_protocol_refused_total",
    "Connections closed before a valid PROXY header, by listener and reason",
    ("listener", "reason"),
)


@dataclass
class _Listener:
    name: str
    protocol: ProxiedProtocolFactory
    allowed: Callable[[str], bool]
    header_timeout: float
    tls: ssl.SSLContext | None
    handshakes: set[asyncio.Task[None]] = field(default_factory=set)


async def start_proxied_server(
    handler: ProxiedHandler,
    host: str,
    port: int,
    *,
    name: str,
    allowed: Callable[[str], bool],
    header_timeout: float,
    tls: ssl.SSLContext | None,
    limit: int,
    backlog: int,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """Listen on ``host:port`` (or on ``sock``, bound already); every connection
    must come from an ``allowed`` address and start with a PROXY header within
    ``header_timeout`` seconds; with ``tls``, the TLS handshake follows the
    header. ``limit`` is the stream reader's."""

    def streams(header: ProxyHeader) -> asyncio.StreamReaderProtocol:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await handler(reader, writer, header)

        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=limit), serve)

    return await start_proxied_protocol_server(
        streams,
        host,
        port,
        name=name,
        allowed=allowed,
        header_timeout=header_timeout,
        tls=tls,
        backlog=backlog,
        sock=sock,
    )


async def start_proxied_protocol_server(
    protocol: ProxiedProtocolFactory,
    host: str,
    port: int,
    *,
    name: str,
    allowed: Callable[[str], bool],
    header_timeout: float,
    tls: ssl.SSLContext | None,
    backlog: int,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """As :func:`start_proxied_server`, but each connection is served by
    ``protocol(header)``, whose ``connection_made`` receives the transport (the
    TLS one with ``tls``) once the header has been read."""
    listener = _Listener(name, protocol, allowed, header_timeout, tls)
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(lambda: _HeaderProtocol(listener), sock=sock)
    return await loop.create_server(
        lambda: _HeaderProtocol(listener), host, port, reuse_address=True, backlog=backlog
    )


class _HeaderProtocol(asyncio.BufferedProtocol):
    """One connection until its header has arrived."""

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._received = bytearray()
        self._chunk = bytearray(SHORTEST_HEADER)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else ""
        if not self._listener.allowed(self._peer):
            # PP §2: "only trusted proxies are allowed to use this protocol".
            self._refuse("not-allowed", "not in the networks allowed to send PROXY headers")
            return
        # PP §2: "The receiver may apply a short timeout and decide to abort".
        self._timer = asyncio.get_running_loop().call_later(
            self._listener.header_timeout, self._refuse, "timeout", "no PROXY header in time"
        )

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._chunk

    def buffer_updated(self, nbytes: int) -> None:
        self._received += self._chunk[:nbytes]
        try:
            result = parse(bytes(self._received))
        except HeaderError as error:
            self._refuse("invalid", str(error))
            return
        if isinstance(result, Incomplete):
            self._chunk = bytearray(result.at_most)
            return
        self._cancel_timer()
        self._hand_over(result)

    def eof_received(self) -> bool:
        if self._received:
            self._refuse("invalid", "closed in the middle of a PROXY header")
        else:
            # Load balancers' TCP health checks connect and close: not worth a warning.
            log.debug("%s: %s closed before sending anything", self._listener.name, self._peer)
            self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()

    def _hand_over(self, header: ProxyHeader) -> None:
        transport = self._transport
        assert transport is not None
        # PP §2: nothing is processed before a complete header; what follows it
        # is still in the socket, for the protocol that serves the connection.
        transport.pause_reading()
        listener = self._listener
        protocol = listener.protocol(header)
        if listener.tls is None:
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            transport.resume_reading()
            return
        task = asyncio.get_running_loop().create_task(self._start_tls(protocol, listener.tls))
        listener.handshakes.add(task)
        task.add_done_callback(listener.handshakes.discard)

    async def _start_tls(self, protocol: asyncio.BaseProtocol, context: ssl.SSLContext) -> None:
        transport = self._transport
        assert transport is not None
        try:
            secured = await asyncio.get_running_loop().start_tls(
                transport, protocol, context, server_side=True
            )
        except OSError as error:  # ssl.SSLError, a reset, the handshake timeout
            log.info("%s: TLS handshake with %s failed: %s", self._listener.name, self._peer, error)
            transport.close()
            return
        if secured is None:
            transport.close()
            return
        protocol.connection_made(secured)

    def _refuse(self, reason: str, text: str) -> None:
        log.warning("%s: closing %s, no session: %s", self._listener.name, self._peer, text)
        REFUSED.inc(self._listener.name, reason)
        self._close()

    def _close(self) -> None:
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
