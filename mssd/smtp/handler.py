"""aiosmtpd handler hooks: they turn SMTP commands into delivery-pipeline calls
and pipeline outcomes into SMTP replies."""

from __future__ import annotations

import dataclasses
import logging
import ssl
from typing import Any

from aiosmtpd.smtp import Session, TLSSetupException

from mssd import metrics
from mssd.auth import Principal
from mssd.delivery import DeliveryPipeline, PolicyRefusal, SessionInfo, Transaction
from mssd.delivery.pipeline import Source
from mssd.smtp.server import MssdEnvelope, MssdSMTP

log = logging.getLogger(__name__)

STARTTLS_REFUSED = metrics.counter(
    "mssd_smtp_starttls_failed_total",
    "STARTTLS handshakes that failed, by reason",
    ("reason",),
)


class Handler:
    """Hooks shared by the MTA (port 25) and submission (587/465) listeners."""

    def __init__(self, pipeline: DeliveryPipeline, *, source: Source) -> None:
        self.pipeline = pipeline
        self.source = source

    async def handle_EHLO(
        self, server: MssdSMTP, session: Session, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        kept = [r for r in responses[:-1] if not r.startswith("250-AUTH")]
        kept += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]
        authenticator = server.mssd_authenticator
        if authenticator is not None and not session.authenticated:
            mechanisms = authenticator.mechanisms(server.auth_context())
            if mechanisms:
                kept.append("250-AUTH " + " ".join(mechanisms))
        kept.append("250 HELP")
        return kept

    def _session_info(self, server: MssdSMTP, session: Session) -> SessionInfo:
        principal: Principal | None = session.auth_data if session.authenticated else None
        return SessionInfo(
            source=self.source,
            remote_ip=server.remote_ip,
            helo=session.host_name or "",
            tls=server.tls_description(),
            account_id=principal.account_id if principal else None,
            login=principal.login if principal else None,
            peer_certificate=server.peer_certificate(),
        )

    async def handle_MAIL(
        self,
        server: MssdSMTP,
        session: Session,
        envelope: MssdEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        transaction = Transaction(
            session=self._session_info(server, session),
            mail_from=address,
            smtputf8=bool(envelope.smtp_utf8),
            body=envelope.body,
            dsn_ret=envelope.dsn_ret,
            dsn_envid=envelope.dsn_envid,
            size=envelope.size,
        )
        try:
            await self.pipeline.check_sender(transaction)
        except PolicyRefusal as refusal:
            return refusal.reply
        envelope.transaction = transaction
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self,
        server: MssdSMTP,
        session: Session,
        envelope: MssdEnvelope,
        address: str,
        dsn: tuple[str | None, str | None],
    ) -> str:
        transaction: Transaction = envelope.transaction
        try:
            record = await self.pipeline.check_recipient(transaction, address)
        except PolicyRefusal as refusal:
            return refusal.reply
        notify, orcpt = dsn
        transaction.recipients.append(
            dataclasses.replace(record, dsn_notify=notify, dsn_orcpt=orcpt)
        )
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(
        self, server: MssdSMTP, session: Session, envelope: MssdEnvelope, data: bytes
    ) -> str:
        transaction: Transaction = envelope.transaction
        try:
            stored = await self.pipeline.accept(transaction, data)
        except PolicyRefusal as refusal:
            return refusal.reply
        except Exception:
            log.exception("could not store a message from %s", server.remote_ip)
            return "451 4.3.0 The message could not be stored; nothing was kept, try again later"
        log.info(
            "%s accepted from=<%s> recipients=%d size=%d remote=%s",
            stored.envelope_id,
            transaction.mail_from,
            len(transaction.recipients),
            len(data),
            server.remote_ip,
        )
        return f"250 2.0.0 Ok: queued as {stored.envelope_id}"

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # The client broke off or botched the STARTTLS handshake (RFC 3207 §4):
            # its failure, not ours. aiosmtpd closes the connection without a reply.
            cause = error.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                # A client certificate that does not chain to the configured CAs: the TLS
                # alert (unknown_ca) is all the peer gets, so say it here.
                STARTTLS_REFUSED.inc("untrusted_chain")
                log.warning(
                    "STARTTLS refused: client certificate not trusted (untrusted chain): %s",
                    cause.verify_message,
                )
            else:
                STARTTLS_REFUSED.inc("handshake")
                log.info("STARTTLS handshake failed: %r", cause)
            return "454 4.7.0 TLS not available due to temporary reason"
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Internal error; the command was not carried out"
