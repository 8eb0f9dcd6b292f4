"""Authentication shared by SMTP and IMAP: SASL mechanisms, passwords, one-time
codes, Pro Santé Connect tokens, client certificates, rate limits.

The protocol servers call :class:`Authenticator` (``mechanisms``, ``start``) and
drive the returned :class:`SaslExchange` with the client's decoded responses;
everything else here is behind it. Parsing (``sasl``, ``totp``) is pure; I/O
happens only through the injected ``AccountLookup``, ``AuditSink`` and the JWKS
HTTP client.

Invariants:
- No reusable secret on a plaintext link: PLAIN, LOGIN, XOAUTH2 and OAUTHBEARER
  are neither offered nor accepted unless the connection is encrypted or comes
  from a trusted network (a TLS-terminating proxy); ``start`` raises
  ``EncryptionRequired`` (SMTP 538 5.7.11, RFC 4954 §6).
- The rate limiter is consulted before any credential is looked at, so a locked
  account answers the same whether the password is right or wrong.
- The client is never told why it failed beyond "authentication failed"; the
  audit trail gets the real reason (unknown-account, suspended, expired-token...).
- Unknown logins cost the same scrypt work as known ones.
- scrypt runs in a worker thread, never on the event loop.
- Every success and failure (including cancel) is audited; no password, one-time
  code or token ever enters an audit event or a log line.
- Token time checks use the injected clock; JWT ``none`` and ``HS*`` are refused
  whatever the configuration says.
- The certificate given to EXTERNAL has been chain-verified by TLS; this package
  only maps it to an account.
- One-time code replay is prevented by the store (``claim_totp_step``), not by
  memory here, so it holds across processes. Rate-limit counters are in
  memory, shared best effort between processes on PostgreSQL over
  LISTEN/NOTIFY (``ratelimit``; DESIGN.md, Scale-out: no in-memory state
  needed for correctness).
"""

from mssd.auth.authenticator import ALL_MECHANISMS, Authenticator, SaslExchange
from mssd.auth.model import (
    AccountLookup,
    AuditSink,
    AuthContext,
    AuthError,
    Challenge,
    EncryptionRequired,
    ExchangeFinished,
    Failure,
    Principal,
    StepResult,
    Success,
    UnknownMechanism,
)
from mssd.auth.passwords import (
    PasswordHashError,
    hash_password,
    hash_password_async,
    verify_password,
    verify_password_async,
)
from mssd.auth.psc import IdpUnavailable, PscClaims, PscTokenError, PscTokenVerifier
from mssd.auth.ratelimit import AuthRateLimiter
from mssd.auth.totp import generate_totp_secret, provisioning_uri, totp_code

__all__ = [
    "ALL_MECHANISMS",
    "AccountLookup",
    "AuditSink",
    "AuthContext",
    "AuthError",
    "AuthRateLimiter",
    "Authenticator",
    "Challenge",
    "EncryptionRequired",
    "ExchangeFinished",
    "Failure",
    "IdpUnavailable",
    "PasswordHashError",
    "Principal",
    "PscClaims",
    "PscTokenError",
    "PscTokenVerifier",
    "SaslExchange",
    "StepResult",
    "Success",
    "UnknownMechanism",
    "generate_totp_secret",
    "hash_password",
    "hash_password_async",
    "provisioning_uri",
    "totp_code",
    "verify_password",
    "verify_password_async",
]
