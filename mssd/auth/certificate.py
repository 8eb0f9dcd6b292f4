"""Mapping a TLS client certificate to an account, for SASL EXTERNAL (RFC 4422 Appendix A).

This module owns the rule "which account does this certificate authenticate":
a CPS-style personal certificate whose CN is an idNat_PS maps through
``AccountLookup.by_idnat_ps``; any other certificate maps through its normalised
subject DN (``AccountLookup.by_cert_dn``). It must never verify the certificate
chain or revocation (the TLS layer has done that before the certificate reaches
us) and never compare DNs as raw strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from mssd.auth.model import AccountLookup
from mssd.store.records import Account
from mssd.trust.identity import identity_from_der


class CertificateUnreadable(ValueError):
    """The peer certificate's DER cannot be parsed."""


@dataclass(frozen=True)
class CertificateMatch:
    actor: str
    """The idNat_PS of a personal certificate, else the normalised subject DN (for audit)."""
    idnat_ps: str | None
    account: Account | None
    not_after: float


async def account_for_certificate(der: bytes, accounts: AccountLookup) -> CertificateMatch:
    """Find the account a verified peer certificate authenticates."""
    try:
        identity = identity_from_der(der)
    except ValueError as error:
        raise CertificateUnreadable(str(error)) from None
    if identity.idnat_ps is not None:
        account = await accounts.by_idnat_ps(identity.idnat_ps)
        actor = identity.idnat_ps
    else:
        account = await accounts.by_cert_dn(identity.subject_dn)
        actor = identity.subject_dn
    return CertificateMatch(
        actor=actor,
        idnat_ps=identity.idnat_ps,
        account=account,
        not_after=identity.not_after.timestamp(),
    )
