"""Value objects and interfaces of authentication, shared by SMTP and IMAP.

This module owns the vocabulary the protocol servers speak with :mod:`mssd.auth`:
the connection context, the authenticated principal, the three outcomes of a SASL
step, the two exceptions raised before an exchange starts, and the two interfaces
the store and the audit trail implement. It must never do I/O or hold state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from mssd.store.records import Account, AuditEvent


@dataclass(frozen=True)
class AuthContext:
    """What the protocol layer knows about the connection asking to authenticate."""

    protocol: str
    """``"smtp"`` or ``"imap"``, recorded in the audit trail."""
    remote_ip: str
    tls: bool
    """The connection is encrypted (implicit TLS or after STARTTLS)."""
    peer_certificate: bytes | None = None
    """DER of the TLS client leaf certificate, already chain-verified by the TLS layer."""
    trusted_network: bool = False
    """The peer is a TLS-terminating proxy or a local tool: plaintext credentials allowed."""


@dataclass(frozen=True)
class Principal:
    """Who authenticated, and until when the credential holds."""

    account_id: int
    login: str
    mechanism: str
    """``PLAIN``, ``LOGIN``, ``XOAUTH2``, ``OAUTHBEARER`` or ``EXTERNAL``."""
    idnat_ps: str | None
    """National id of the professional, when the account is a person's."""
    expires_at: float | None
    """Epoch seconds when the credential stops being valid (token ``exp``,
    certificate ``notAfter``), or None for a password."""


@dataclass(frozen=True)
class Challenge:
    """Send ``data`` to the client (the protocol base64-encodes it), then call
    :meth:`SaslExchange.step` with the decoded reply."""

    data: bytes


@dataclass(frozen=True)
class Success:
    principal: Principal


@dataclass(frozen=True)
class Failure:
    """The exchange is over and the client is not authenticated."""

    reason: str
    """Short English text safe to show the client: never says whether a login exists."""
    temporary: bool
    """Refused by the rate limiter or an unreachable identity provider:
    SMTP ``454 4.7.0``, IMAP ``NO [UNAVAILABLE]``. Otherwise SMTP ``535 5.7.8``,
    IMAP ``NO [AUTHENTICATIONFAILED]`` (RFC 4954 §6, RFC 5530 §3)."""
    malformed: bool = False
    """The client sent undecodable SASL data: SMTP ``501 5.5.2``, IMAP ``BAD``."""


StepResult = Challenge | Success | Failure


class AuthError(Exception):
    """Base of the errors raised before an exchange starts; each carries its replies."""

    smtp_reply: ClassVar[tuple[int, str]] = (504, "5.5.4")
    imap_status: ClassVar[str] = "NO"
    imap_code: ClassVar[str | None] = None


class UnknownMechanism(AuthError):
    """The mechanism is not implemented or not offered on this connection.

    RFC 4954 §4: "504 5.5.4 Unrecognized authentication type"; RFC 9051 §6.2.2:
    ``NO`` for an unsupported mechanism.
    """


class EncryptionRequired(UnknownMechanism):
    """The mechanism sends reusable secrets and the connection is not encrypted.

    RFC 4954 §6: "538 5.7.11 Encryption required for requested authentication
    mechanism"; RFC 5530 §3: ``NO [PRIVACYREQUIRED]``. It is a subclass of
    :class:`UnknownMechanism` so a handler that only knows that one still refuses
    the command; catch this one first to give the precise reply.
    """

    smtp_reply: ClassVar[tuple[int, str]] = (538, "5.7.11")
    imap_code: ClassVar[str | None] = "PRIVACYREQUIRED"


class ExchangeFinished(RuntimeError):
    """:meth:`SaslExchange.step` was called after the exchange ended (a caller bug)."""


class AccountLookup(Protocol):
    """How authentication finds accounts; the store implements it."""

    async def by_login(self, login: str) -> Account | None:
        """The account whose login equals ``login`` compared case-insensitively."""
        ...

    async def by_idnat_ps(self, idnat_ps: str) -> Account | None: ...

    async def by_cert_dn(self, normalised_dn: str) -> Account | None: ...

    async def claim_totp_step(self, account_id: int, step: int) -> bool:
        """True once per (account, step), and only if ``step`` is above the last
        claimed one, so a one-time code cannot be replayed (RFC 6238 §5.2)."""
        ...


class AuditSink(Protocol):
    """The append-only audit trail."""

    async def record(self, event: AuditEvent) -> None: ...
