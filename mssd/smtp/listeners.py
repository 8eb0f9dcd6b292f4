"""Starting and stopping the SMTP listeners."""

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
        "proxy_protocol_timeout": 10.0 if smtp.proxy_protocol else None,
    }

    def factory(
        cls: type[MssdSMTP],
        source: Source,
        tls_context: ssl.SSLContext | None,
        **options: Any,
    ) -> Callable[[], MssdSMTP]:
        def make() -> MssdSMTP:
            return cls(
                Handler(pipeline, source=source),
                tls_context=tls_context,
                loop=loop,
                **common,
                **options,
            )

        return make

    # (name, address, protocol factory, TLS context of an implicit-TLS listener)
    plans: list[tuple[str, str, Callable[[], MssdSMTP], ssl.SSLContext | None]] = [
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
            server = await loop.create_server(
                protocol, host, int(port), ssl=implicit, reuse_address=True, backlog=512
            )
            bound = server.sockets[0].getsockname()
            listeners.append(Listener(name, server, host, int(bound[1])))
    except OSError as error:
        for listener in listeners:
            listener.server.close()
        raise OSError(f"cannot listen for smtp.{name}_listen on {address}: {error}") from error
    return listeners
