"""Starting and stopping the SMTP listeners.

With ``smtp.proxy_protocol`` each listener is a :mod:`mssd.proxy_protocol`
server: only ``smtp.proxy_protocol_networks`` may connect, the PROXY header is
read before the greeting (and before the TLS handshake on 465), and the SMTP
protocol is made for the client the header names. aiosmtpd's own PROXY support
is not used: it accepts a header from any peer, and on 465 only inside TLS,
where a TCP load balancer never puts it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mssd.auth import Authenticator
from mssd.auth.networks import trusted_matcher
from mssd.config import Settings
from mssd.delivery import DeliveryPipeline
from mssd.delivery.pipeline import Source
from mssd.proxy_protocol import Endpoint, ProxyHeader, start_proxied_protocol_server
from mssd.smtp.handler import Handler
from mssd.smtp.server import MssdSMTP


@dataclass(frozen=True)
class Listener:
    name: str
    server: asyncio.Server
    host: str
    port: int


class _SubmissionSMTP(MssdSMTP):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._trusted(self.remote_ip):
            # A TLS-terminating proxy or local tool on a trusted network.
            self.require_starttls = False


async def start_smtp(
    settings: Settings,
    pipeline: DeliveryPipeline,
    authenticator: Authenticator,
    tls: ssl.SSLContext,
    *,
    mta_tls: ssl.SSLContext | None = None,
) -> list[Listener]:
    """Start the configured listeners; ``mta_tls`` is port 25's context (default ``tls``)."""
    loop = asyncio.get_running_loop()
    smtp = settings.smtp
    trusted = trusted_matcher(settings.server.trusted_networks)
    common: dict[str, Any] = {
        "hostname": settings.server.hostname,
        "ident": "mssd ESMTP",
        "data_size_limit": smtp.max_message_size,
        "timeout": smtp.timeout_seconds,
        "trusted": trusted,
        "max_recipients": smtp.max_recipients,
        "auth_require_tls": True,
    }

    def factory(
        cls: type[MssdSMTP],
        source: Source,
        tls_context: ssl.SSLContext | None,
        **options: Any,
    ) -> Callable[[Endpoint | None], MssdSMTP]:
        def make(client: Endpoint | None) -> MssdSMTP:
            return cls(
                Handler(pipeline, source=source),
                tls_context=tls_context,
                loop=loop,
                client=client,
                **common,
                **options,
            )

        return make

    # (name, address, protocol factory, TLS context of an implicit-TLS listener)
    plans: list[tuple[str, str, Callable[[Endpoint | None], MssdSMTP], ssl.SSLContext | None]] = [
        (
            "mta",
            smtp.mta_listen,
            factory(
                MssdSMTP,
                "mta",
                mta_tls or tls,
                authenticator=None,
                require_starttls=smtp.mta_require_tls,
            ),
            None,
        ),
        (
            "submission",
            smtp.submission_listen,
            factory(
                _SubmissionSMTP,
                "submission",
                tls,
                authenticator=authenticator,
                require_starttls=True,
                auth_required=True,
            ),
            None,
        ),
        (
            "submissions",
            smtp.submissions_listen,
            # RFC 8314 §3.3: TLS from the first byte, so no STARTTLS on this port.
            factory(MssdSMTP, "submission", None, authenticator=authenticator, auth_required=True),
            tls,
        ),
    ]
    listeners: list[Listener] = []
    try:
        for name, address, protocol, implicit in plans:
            if not address:
                continue
            host, _, port = address.rpartition(":")
            host = host.strip("[]")
            server = await _listen(settings, name, host, int(port), protocol, implicit)
            bound = server.sockets[0].getsockname()
            listeners.append(Listener(name, server, host, int(bound[1])))
    except OSError as error:
        for listener in listeners:
            listener.server.close()
        raise OSError(f"cannot listen for smtp.{name}_listen on {address}: {error}") from error
    return listeners


async def _listen(
    settings: Settings,
    name: str,
    host: str,
    port: int,
    protocol: Callable[[Endpoint | None], MssdSMTP],
    implicit: ssl.SSLContext | None,
) -> asyncio.Server:
    smtp = settings.smtp
    if not smtp.proxy_protocol:
        return await asyncio.get_running_loop().create_server(
            lambda: protocol(None), host, port, ssl=implicit, reuse_address=True, backlog=512
        )

    def proxied(header: ProxyHeader) -> MssdSMTP:
        # A LOCAL (v2) or UNKNOWN (v1) header names nobody: the balancer's own
        # connection, served as its own address (proxy-protocol.txt §2.1, §2.2).
        return protocol(header.source)

    # The header comes first, before the greeting or the TLS handshake on 465.
    return await start_proxied_protocol_server(
        proxied,
        host,
        port,
        name=f"smtp_{name}",
        allowed=trusted_matcher(smtp.proxy_protocol_networks),
        header_timeout=smtp.proxy_protocol_timeout_seconds,
        tls=implicit,
        backlog=512,
    )
