"""The trust-space policy of the MTA listener (port 25): who may hand us mail.

An MSSanté operator accepts mail only from the other operators of the trust space
(DESIGN.md, "One message", step 1): at MAIL, the peer must have presented a TLS client
certificate, issued by a configured IGC-Santé CA, not revoked, whose DN the ANS whitelist
lists for the MAIL FROM domain. Otherwise MAIL gets ``550 5.7.1`` (RFC 3463 §3.8:
delivery not authorized) with the reason: no certificate, untrusted chain, revoked,
unknown domain, or DN not listed for that domain.

Two senders are not in the whitelist and still allowed:
- the null reverse-path (RFC 5321 §4.5.5, delivery reports): the sender is then the peer
  itself, accepted when its DN is listed for any domain;
- our own domains, from our own server certificate (another mssd process of this
  operator, or our relay delivering to ourselves), which the list need not name.

It plugs into the delivery pipeline as a ``PolicyCheck`` and never looks at recipients
(the pipeline only accepts local ones on port 25).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509

from mssd import metrics
from mssd.delivery import PolicyRefusal, Transaction
from mssd.trust.identity import normalise_dn
from mssd.trust.verify import CertificateRejected, TrustFiles
from mssd.trust.whitelist import Whitelist, normalise_domain

log = logging.getLogger(__name__)

REFUSED = metrics.counter(
    "mssd_mta_senders_refused_total",
    "MAIL commands refused on port 25 by the trust-space policy, by reason",
    ("reason",),
)


def own_certificate_dn(cert_file: Path) -> str:
    """Normalised subject DN of the first certificate in our server chain file."""
    return normalise_dn(x509.load_pem_x509_certificate(cert_file.read_bytes()).subject)


class InboundTrustCheck:
    """``PolicyCheck`` for port 25: the peer's certificate against the whitelist."""

    def __init__(
        self,
        *,
        whitelist: Callable[[], Whitelist | None],
        trust: TrustFiles,
        local_domains: Callable[[], Awaitable[frozenset[str]]],
        own_dn: str,
        require_certificate: bool = True,
    ) -> None:
        self._whitelist = whitelist
        self._trust = trust
        self._local_domains = local_domains
        self._own_dn = own_dn
        self._require_certificate = require_certificate

    def _refuse(self, reason: str, text: str, transaction: Transaction) -> PolicyRefusal:
        REFUSED.inc(reason)
        log.warning(
            "port 25: MAIL FROM:<%s> from %s refused (%s): %s",
            transaction.mail_from,
            transaction.session.remote_ip,
            reason,
            text,
        )
        return PolicyRefusal(550, "5.7.1", text)

    async def check_sender(self, transaction: Transaction) -> None:
        session = transaction.session
        if session.source != "mta":
            return
        der = session.peer_certificate
        if der is None:
            if not self._require_certificate:
                return
            raise self._refuse(
                "no_certificate",
                "A client certificate is required on this port: present the operator's "
                "IGC-Santé server certificate (MSSanté trust space)",
                transaction,
            )
        try:
            cert = self._trust.verify(der)
        except CertificateRejected as rejected:
            reason = "revoked" if rejected.reason == "revoked" else "untrusted_chain"
            label = "certificate revoked" if reason == "revoked" else "untrusted chain"
            raise self._refuse(
                reason, f"Client certificate refused ({label}): {rejected.message}", transaction
            ) from None
        dn = normalise_dn(cert.subject)
        if dn == self._own_dn and await self._own_traffic(transaction):
            return  # our own server certificate, for our own domains or a report
        listed = self._whitelist()
        if listed is None:
            raise self._refuse(
                "no_whitelist",
                "No MSSanté whitelist is loaded on this server yet; try again later",
                transaction,
            )
        if not transaction.mail_from:
            # RFC 5321 §4.5.5: a report has no sender; the peer itself is vouched for.
            if listed.is_operator(dn):
                return
            raise self._refuse(
                "dn_not_listed",
                f"Certificate {dn} is not listed in the MSSanté whitelist for any domain",
                transaction,
            )
        await self._check_domain(transaction, listed, dn)

    async def _own_traffic(self, transaction: Transaction) -> bool:
        """A report, or a sender in one of our own domains: what our own server
        certificate may send without the whitelist naming it. For any other
        domain it is checked against the list like any operator's."""
        if not transaction.mail_from:
            return True
        raw_domain = transaction.mail_from.rpartition("@")[2]
        try:
            # Our domains are stored as A-labels, like the whitelist's.
            return normalise_domain(raw_domain) in await self._local_domains()
        except ValueError:
            return False

    async def _check_domain(self, transaction: Transaction, listed: Whitelist, dn: str) -> None:
        raw_domain = transaction.mail_from.rpartition("@")[2]
        try:
            domain = normalise_domain(raw_domain)
        except ValueError:
            domain = ""
        operators = listed.domains.get(domain, frozenset()) if domain else frozenset()
        if dn in operators:
            return
        if not operators:
            if domain and domain in await self._local_domains():
                raise self._refuse(
                    "dn_not_listed",
                    f"<{transaction.mail_from}>: domain {raw_domain} is hosted here; only this "
                    f"operator's certificate may send for it, not {dn}",
                    transaction,
                )
            raise self._refuse(
                "unknown_domain",
                f"<{transaction.mail_from}>: domain {raw_domain} is not in the MSSanté "
                "whitelist (unknown domain)",
                transaction,
            )
        raise self._refuse(
            "dn_not_listed",
            f"<{transaction.mail_from}>: certificate {dn} is not listed for domain "
            f"{raw_domain} in the MSSanté whitelist",
            transaction,
        )

    async def check_recipient(self, transaction: Transaction, recipient: str) -> None:
        return None
