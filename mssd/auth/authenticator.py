"""The SASL exchanges SMTP AUTH and IMAP AUTHENTICATE run, and the decisions behind them.

This module owns which mechanisms a connection may use, the state of each
exchange, the order of checks (rate limit first, then credentials, then account
status), what the client is told, and what the audit trail records. It must
never do socket I/O (the protocol layer sends challenges and replies), never
tell the client whether a login exists or why exactly it failed, never run
scrypt on the event loop, and never put a password, code or token in an audit
event or a log line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from mssd.auth.certificate import CertificateUnreadable, account_for_certificate
from mssd.auth.model import (
    AccountLookup,
    AuditSink,
    AuthContext,
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
    VerifiedPasswords,
    hash_password_async,
    verify_password_async,
)
from mssd.auth.psc import IdpUnavailable, PscTokenError, PscTokenVerifier
from mssd.auth.ratelimit import AuthRateLimiter
from mssd.auth.sasl import (
    BearerResponse,
    SaslMalformed,
    bearer_error_challenge,
    parse_external,
    parse_login_field,
    parse_oauthbearer,
    parse_plain,
    parse_xoauth2,
)
from mssd.auth.totp import matching_step, split_password_and_code
from mssd.config import AuthSettings
from mssd.store.records import Account, AuditEvent
from mssd.trust.whitelist import mailbox_key

log = logging.getLogger(__name__)

PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")
BEARER_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")
ALL_MECHANISMS = (*PASSWORD_MECHANISMS, *BEARER_MECHANISMS, "EXTERNAL")

FAILED = "authentication failed"
RATE_LIMITED = "too many failed attempts, try again later"
IDP_UNAVAILABLE = "identity provider unavailable"
MALFORMED = "malformed SASL response"
BEARER_SCOPE = "openid"
_UNKNOWN_ACTOR = "unknown"
_DUMMY_PASSWORD = "mssd timing equaliser"


def login_key(typed: str) -> str:
    """The one form of a login the client typed that accounts are looked up, failures
    counted and attempts audited under: local part in lower case, domain as an A-label.

    Logins are addresses and mssd stores their domain as A-labels (RFC 5890 §2.3.2.1,
    migration 0007), while a user types ``claire@hôpital.test`` with U-labels, which
    SASL carries as UTF-8 (RFC 4616 §2, RFC 9755 §5). A domain that is not a valid IDN
    is only lower-cased: it matches no account, and fails like any unknown login.
    """
    return mailbox_key(typed)


class Authenticator:
    """Starts SASL exchanges for one listener or the whole process.

    Takes ownership of ``psc`` (closed by :meth:`close`); when None and
    ``settings.psc_issuer`` is set, creates its own verifier.
    """

    def __init__(
        self,
        settings: AuthSettings,
        accounts: AccountLookup,
        audit: AuditSink,
        *,
        clock: Callable[[], float] = time.time,
        psc: PscTokenVerifier | None = None,
    ) -> None:
        self.settings = settings
        self.accounts = accounts
        self.audit = audit
        self.clock = clock
        if psc is None and settings.psc_issuer:
            psc = PscTokenVerifier(settings, clock=clock)
        self.psc = psc
        self.limiter = AuthRateLimiter(settings, clock=clock)
        self.verified = VerifiedPasswords(settings.verified_cache_seconds)
        self._dummy_hash: str | None = None
        self._background: set[asyncio.Task[None]] = set()

    # --- what the protocol layer calls ------------------------------------------------------

    def mechanisms(self, ctx: AuthContext) -> list[str]:
        """The mechanisms to advertise on this connection (EHLO AUTH, IMAP AUTH=)."""
        offered: list[str] = []
        if ctx.peer_certificate is not None:
            offered.append("EXTERNAL")
        if self.psc is not None and _encrypted(ctx):
            offered.extend(BEARER_MECHANISMS)
        # RFC 4954 §4 / RFC 9051 §11.1: no plaintext passwords on an unencrypted link.
        if _encrypted(ctx):
            offered.extend(PASSWORD_MECHANISMS)
        return offered

    def start(self, mechanism: str, ctx: AuthContext) -> SaslExchange:
        """Begin an exchange; raise UnknownMechanism or EncryptionRequired before any step."""
        # RFC 4422 §3.1: mechanism names are upper case; RFC 9051 §6.2.2 compares them
        # case-insensitively, so normalise.
        name = mechanism.upper()
        if name in PASSWORD_MECHANISMS:
            if not _encrypted(ctx):
                raise EncryptionRequired(f"{name} needs an encrypted connection")
            if name == "PLAIN":
                return _PlainExchange(self, name, ctx)
            return _LoginExchange(self, name, ctx)
        if name in BEARER_MECHANISMS:
            if self.psc is None:
                raise UnknownMechanism(f"{name} is not enabled (no Pro Santé Connect issuer)")
            if not _encrypted(ctx):
                raise EncryptionRequired(f"{name} needs an encrypted connection")
            return _BearerExchange(self, name, ctx)
        if name == "EXTERNAL":
            if ctx.peer_certificate is None:
                raise UnknownMechanism("EXTERNAL needs a TLS client certificate")
            return _ExternalExchange(self, name, ctx)
        raise UnknownMechanism(f"unknown authentication mechanism {mechanism!r}")

    async def close(self) -> None:
        """Finish pending audit writes and close the JWKS HTTP client."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.psc is not None:
            await self.psc.close()

    # --- shared decisions ---------------------------------------------------------------------

    async def audit_event(
        self,
        ctx: AuthContext,
        mechanism: str,
        *,
        ok: bool,
        actor: str,
        target: str,
        result: str,
    ) -> None:
        details: dict[str, Any] = {"mechanism": mechanism, "protocol": ctx.protocol}
        await self.audit.record(
            AuditEvent(
                actor=actor or _UNKNOWN_ACTOR,
                action="auth.success" if ok else "auth.failure",
                target=target,
                remote=ctx.remote_ip,
                result=result,
                details=details,
            )
        )

    def audit_later(self, ctx: AuthContext, mechanism: str, *, actor: str, result: str) -> None:
        """Audit a failure from synchronous code (a cancel); :meth:`close` waits for it."""
        task = asyncio.get_running_loop().create_task(
            self.audit_event(ctx, mechanism, ok=False, actor=actor, target="", result=result)
        )
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("audit write failed", exc_info=task.exception())

    async def rate_limited(
        self, ctx: AuthContext, mechanism: str, login: str | None, actor: str
    ) -> Failure | None:
        """Refuse before looking at credentials when a limit is reached, so a locked
        account cannot be used as an oracle."""
        which = self.limiter.limited(login, ctx.remote_ip)
        if which is None:
            return None
        await self.audit_event(
            ctx, mechanism, ok=False, actor=actor, target="", result="rate-limited"
        )
        return Failure(reason=RATE_LIMITED, temporary=True)

    async def refuse(
        self,
        ctx: AuthContext,
        mechanism: str,
        *,
        actor: str,
        target: str,
        result: str,
        login: str | None,
    ) -> Failure:
        """Count, audit with the real ``result``, answer the client with the generic text."""
        self.limiter.failure(login, ctx.remote_ip)
        await self.audit_event(ctx, mechanism, ok=False, actor=actor, target=target, result=result)
        return Failure(reason=FAILED, temporary=False)

    async def malformed(self, ctx: AuthContext, mechanism: str, actor: str = "") -> Failure:
        await self.audit_event(ctx, mechanism, ok=False, actor=actor, target="", result="malformed")
        return Failure(reason=MALFORMED, temporary=False, malformed=True)

    async def accept(
        self,
        ctx: AuthContext,
        mechanism: str,
        account: Account,
        *,
        actor: str,
        typed_login: str | None,
        idnat_ps: str | None,
        expires_at: float | None,
    ) -> Success:
        self.limiter.success(account.login, typed_login or "")
        await self.audit_event(
            ctx, mechanism, ok=True, actor=actor, target=account.login, result="ok"
        )
        return Success(
            Principal(
                account_id=account.id,
                login=account.login,
                mechanism=mechanism,
                idnat_ps=idnat_ps,
                expires_at=expires_at,
            )
        )

    async def password_login(
        self, ctx: AuthContext, mechanism: str, login: str, secret: str
    ) -> Success | Failure:
        """Check ``login`` (as typed: :func:`login_key` normalises it) and ``secret``
        (the password, followed by the current 6-digit code when the account has a
        TOTP secret)."""
        login = login_key(login)
        limited = await self.rate_limited(ctx, mechanism, login, login)
        if limited is not None:
            return limited
        account = await self.accounts.by_login(login)
        if account is None or account.password_hash is None:
            # Spend the same scrypt work as for a real account, so response time
            # does not reveal which logins exist.
            await self._spend_dummy_work(secret)
            return await self.refuse(
                ctx,
                mechanism,
                actor=login,
                target=account.login if account else "",
                result="unknown-account" if account is None else "no-password",
                login=login,
            )
        password, code = secret, None
        if account.totp_secret:
            split = split_password_and_code(secret)
            if split is not None:
                password, code = split
        try:
            good = await self.verified.verify(password, account.password_hash)
        except PasswordHashError:
            log.error("account %d has an unreadable password hash", account.id)
            return await self.refuse(
                ctx,
                mechanism,
                actor=login,
                target=account.login,
                result="bad-stored-hash",
                login=login,
            )
        if not good:
            return await self.refuse(
                ctx,
                mechanism,
                actor=login,
                target=account.login,
                result="bad-credentials",
                login=login,
            )
        if account.totp_secret:
            result = await self._check_code(account, code)
            if result is not None:
                return await self.refuse(
                    ctx, mechanism, actor=login, target=account.login, result=result, login=login
                )
        if account.status != "active":
            return await self.refuse(
                ctx,
                mechanism,
                actor=login,
                target=account.login,
                result=account.status,
                login=login,
            )
        return await self.accept(
            ctx,
            mechanism,
            account,
            actor=login,
            typed_login=login,
            idnat_ps=account.idnat_ps,
            expires_at=None,
        )

    async def _check_code(self, account: Account, code: str | None) -> str | None:
        """None if ``code`` is valid now and not used before, else the audit result."""
        assert account.totp_secret is not None
        if code is None:
            return "missing-code"
        try:
            step = matching_step(account.totp_secret, code, self.clock(), self.settings.totp_window)
        except ValueError:
            log.error("account %d has an unreadable TOTP secret", account.id)
            return "bad-stored-secret"
        if step is None:
            return "bad-code"
        # RFC 6238 §5.2: a code is accepted once; the store remembers the last step
        # claimed, so this holds across connections and processes.
        if not await self.accounts.claim_totp_step(account.id, step):
            return "code-replayed"
        return None

    async def _spend_dummy_work(self, secret: str) -> None:
        """One scrypt run with the current parameters, whose result is ignored."""
        if self._dummy_hash is None:
            # Computing the dummy hash costs the same as verifying against it.
            self._dummy_hash = await hash_password_async(_DUMMY_PASSWORD, self.settings)
            return
        await verify_password_async(secret, self._dummy_hash)


def _encrypted(ctx: AuthContext) -> bool:
    return ctx.tls or ctx.trusted_network


# --- exchanges ----------------------------------------------------------------------------------


class SaslExchange(ABC):
    """One AUTH / AUTHENTICATE exchange.

    Call :meth:`step` first with the SASL initial response (RFC 4954 §4, RFC 4959),
    or None if the client sent none; then, after each :class:`Challenge`, with the
    client's decoded reply. A :class:`Success` or :class:`Failure` ends it. On a
    client cancel (``*``, RFC 4954 §4 / RFC 9051 §6.2.2) call :meth:`cancel`.
    """

    def __init__(self, auth: Authenticator, mechanism: str, ctx: AuthContext) -> None:
        self.auth = auth
        self.mechanism = mechanism
        self.ctx = ctx
        self._finished = False
        self._audited = False
        self._actor = ""

    async def step(self, response: bytes | None) -> StepResult:
        if self._finished:
            raise ExchangeFinished(f"{self.mechanism} exchange already finished")
        try:
            result = await self._step(response)
        except BaseException:
            self._finished = True
            raise
        if not isinstance(result, Challenge):
            self._finished = True
            self._audited = True
        return result

    def cancel(self) -> None:
        """The client gave up: audited as a failure ("cancelled") unless already decided."""
        if self._finished:
            return
        self._finished = True
        if not self._audited:
            self._audited = True
            self.auth.audit_later(self.ctx, self.mechanism, actor=self._actor, result="cancelled")

    @abstractmethod
    async def _step(self, response: bytes | None) -> StepResult: ...


class _PlainExchange(SaslExchange):
    """RFC 4616. An authzid other than empty or the login itself is refused: mssd
    has no proxy authorization (delegation to ORG mailboxes is a mailbox right,
    not a login identity)."""

    async def _step(self, response: bytes | None) -> StepResult:
        if response is None:
            # RFC 4422 §5 (a): no initial response, so send an empty challenge.
            return Challenge(b"")
        try:
            message = parse_plain(response)
        except SaslMalformed:
            return await self.auth.malformed(self.ctx, self.mechanism)
        login = self._actor = login_key(message.authcid)
        if message.authzid and login_key(message.authzid) != login:
            limited = await self.auth.rate_limited(self.ctx, self.mechanism, login, login)
            if limited is not None:
                return limited
            # RFC 4616 §2: the server decides whether authcid may act as authzid;
            # mssd allows only itself.
            return await self.auth.refuse(
                self.ctx,
                self.mechanism,
                actor=login,
                target="",
                result="authzid-refused",
                login=login,
            )
        return await self.auth.password_login(self.ctx, self.mechanism, login, message.password)


class _LoginExchange(SaslExchange):
    """The LOGIN mechanism (draft-murchison-sasl-login): ``Username:``, then ``Password:``."""

    def __init__(self, auth: Authenticator, mechanism: str, ctx: AuthContext) -> None:
        super().__init__(auth, mechanism, ctx)
        self._username: str | None = None
        self._asked = False

    async def _step(self, response: bytes | None) -> StepResult:
        if self._username is None:
            if response is None or (not response and not self._asked):
                # No (or an empty) initial response: ask for the user name.
                self._asked = True
                return Challenge(b"Username:")
            try:
                self._username = login_key(parse_login_field(response, "LOGIN user name"))
            except SaslMalformed:
                return await self.auth.malformed(self.ctx, self.mechanism)
            self._actor = self._username
            return Challenge(b"Password:")
        if response is None:
            return await self.auth.malformed(self.ctx, self.mechanism, self._username)
        try:
            password = parse_login_field(response, "LOGIN password")
        except SaslMalformed:
            return await self.auth.malformed(self.ctx, self.mechanism, self._username)
        return await self.auth.password_login(self.ctx, self.mechanism, self._username, password)


class _BearerExchange(SaslExchange):
    """XOAUTH2 and OAUTHBEARER (RFC 7628) carrying a Pro Santé Connect access token."""

    def __init__(self, auth: Authenticator, mechanism: str, ctx: AuthContext) -> None:
        super().__init__(auth, mechanism, ctx)
        self._pending: Failure | None = None

    async def _step(self, response: bytes | None) -> StepResult:
        if self._pending is not None:
            # RFC 7628 §3.2.3: after the error challenge the client sends a dummy
            # response (0x01); whatever it sends, the exchange fails now.
            return self._pending
        if response is None:
            return Challenge(b"")
        xoauth2 = self.mechanism == "XOAUTH2"
        try:
            message = parse_xoauth2(response) if xoauth2 else parse_oauthbearer(response)
        except SaslMalformed:
            return await self.auth.malformed(self.ctx, self.mechanism)
        # The login the client named, if any, in the form accounts are stored in.
        message = dataclasses.replace(message, user=login_key(message.user))
        self._actor = message.user
        limited = await self.auth.rate_limited(
            self.ctx, self.mechanism, message.user or None, message.user
        )
        if limited is not None:
            return limited
        return await self._verify(message, xoauth2=xoauth2)

    async def _verify(self, message: BearerResponse, *, xoauth2: bool) -> StepResult:
        auth, ctx = self.auth, self.ctx
        assert auth.psc is not None
        try:
            claims = await auth.psc.verify(message.token)
        except IdpUnavailable as error:
            log.warning("Pro Santé Connect JWKS unavailable: %s", error)
            await auth.audit_event(
                ctx,
                self.mechanism,
                ok=False,
                actor=message.user,
                target="",
                result="idp-unavailable",
            )
            return Failure(reason=IDP_UNAVAILABLE, temporary=True)
        except PscTokenError as error:
            return await self._fail(message, "", error.result, xoauth2=xoauth2)
        self._actor = message.user or claims.idnat_ps
        account = await auth.accounts.by_idnat_ps(claims.idnat_ps)
        if account is None:
            return await self._fail(message, "", "unknown-account", xoauth2=xoauth2)
        # The login the client named must be the token holder's own account.
        if message.user and message.user != account.login.lower():
            return await self._fail(message, account.login, "authzid-refused", xoauth2=xoauth2)
        if account.status != "active":
            return await self._fail(message, account.login, account.status, xoauth2=xoauth2)
        return await auth.accept(
            ctx,
            self.mechanism,
            account,
            actor=self._actor,
            typed_login=message.user or None,
            idnat_ps=claims.idnat_ps,
            expires_at=claims.expires_at,
        )

    async def _fail(
        self, message: BearerResponse, target: str, result: str, *, xoauth2: bool
    ) -> Challenge:
        """RFC 7628 §3.2.2: answer with the JSON error as a challenge; fail on the next step."""
        auth = self.auth
        self._pending = await auth.refuse(
            self.ctx,
            self.mechanism,
            actor=self._actor,
            target=target,
            result=result,
            login=message.user or None,
        )
        self._audited = True
        issuer = auth.settings.psc_issuer.rstrip("/")
        return Challenge(
            bearer_error_challenge(
                xoauth2=xoauth2,
                scope=BEARER_SCOPE,
                openid_configuration=f"{issuer}/.well-known/openid-configuration",
            )
        )


class _ExternalExchange(SaslExchange):
    """RFC 4422 Appendix A: the identity is the TLS client certificate's; the
    optional authzid must be empty or the account's own login."""

    async def _step(self, response: bytes | None) -> StepResult:
        if response is None:
            return Challenge(b"")
        auth, ctx = self.auth, self.ctx
        try:
            authzid = parse_external(response)
        except SaslMalformed:
            return await auth.malformed(ctx, self.mechanism)
        limited = await auth.rate_limited(ctx, self.mechanism, None, authzid)
        if limited is not None:
            return limited
        assert ctx.peer_certificate is not None
        try:
            match = await account_for_certificate(ctx.peer_certificate, auth.accounts)
        except CertificateUnreadable:
            return await auth.refuse(
                ctx,
                self.mechanism,
                actor=authzid,
                target="",
                result="bad-certificate",
                login=None,
            )
        self._actor = match.actor
        account = match.account
        if account is None:
            return await auth.refuse(
                ctx,
                self.mechanism,
                actor=match.actor,
                target="",
                result="unknown-account",
                login=None,
            )
        if authzid and login_key(authzid) != account.login.lower():
            return await auth.refuse(
                ctx,
                self.mechanism,
                actor=match.actor,
                target=account.login,
                result="authzid-refused",
                login=None,
            )
        if account.status != "active":
            return await auth.refuse(
                ctx,
                self.mechanism,
                actor=match.actor,
                target=account.login,
                result=account.status,
                login=None,
            )
        return await auth.accept(
            ctx,
            self.mechanism,
            account,
            actor=match.actor,
            typed_login=None,
            idnat_ps=match.idnat_ps or account.idnat_ps,
            expires_at=match.not_after,
        )
