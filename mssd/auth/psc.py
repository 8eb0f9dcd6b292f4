"""Verification of Pro Santé Connect (PSC) access tokens: signed JWTs (RFC 7519).

This module owns fetching and caching the identity provider's JWKS (RFC 7517)
over HTTPS, checking a token's signature, issuer, audience and validity period,
and extracting the professional's idNat_PS from the ``SubjectNameID`` claim.
It must never accept an unsigned (``none``) or symmetric (``HS*``) token, trust a
key that did not come from the configured JWKS URL, read the system clock
directly (time comes from the injected ``clock``), or log a token.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from mssd.config import AuthSettings
from mssd.trust.idnat import IdNatError, check_idnat_ps

MIN_REFETCH_SECONDS = 30.0
"""Fetch attempts are spaced at least this far apart, so a flood of tokens with
unknown ``kid`` values, or an IdP outage, cannot make us hammer the IdP."""
MAX_JWKS_BYTES = 1024 * 1024
FETCH_TIMEOUT_SECONDS = 10.0
SUBJECT_CLAIM = "SubjectNameID"
_SYMMETRIC_PREFIX = "HS"


class PscTokenError(Exception):
    """The token is not acceptable. ``result`` is the audit code: ``malformed-token``,
    ``bad-algorithm``, ``unknown-key``, ``bad-signature``, ``wrong-issuer``,
    ``wrong-audience``, ``expired-token``, ``not-yet-valid`` or ``bad-subject``."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


class IdpUnavailable(Exception):
    """The JWKS could not be fetched (network, TLS, HTTP status, JSON); retry later."""


@dataclass(frozen=True)
class PscClaims:
    """What a verified token asserts."""

    idnat_ps: str
    expires_at: float
    issuer: str


def allowed_algorithms(settings: AuthSettings) -> frozenset[str]:
    """The configured algorithms minus ``none`` and the HMAC family, whatever the
    configuration says: a public JWKS key used as an HMAC secret would let anyone
    forge tokens (RFC 8725 §2.1, §3.1)."""
    return frozenset(
        alg
        for alg in settings.psc_algorithms
        if alg.lower() != "none" and not alg.upper().startswith(_SYMMETRIC_PREFIX)
    )


class PscTokenVerifier:
    """Verifies PSC access tokens against the JWKS at ``settings.psc_jwks_url``."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._transport = transport
        self._algorithms = allowed_algorithms(settings)
        self._client: httpx.AsyncClient | None = None
        self._keys: dict[str, Mapping[str, Any]] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._last_error: IdpUnavailable | None = None
        self._lock = asyncio.Lock()
        self.fetch_count = 0
        """JWKS fetch attempts so far (for metrics and tests)."""

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self._settings.psc_ca_file is not None:
                verify = ssl.create_default_context(cafile=str(self._settings.psc_ca_file))
            self._client = httpx.AsyncClient(
                verify=verify,
                timeout=FETCH_TIMEOUT_SECONDS,
                follow_redirects=False,
                transport=self._transport,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _cache_fresh(self, now: float) -> bool:
        return (
            self._fetched_at is not None
            and now - self._fetched_at < self._settings.psc_jwks_cache_seconds
        )

    async def _fetch(self) -> None:
        """Replace the cached keys with the JWKS served now; raise IdpUnavailable."""
        self.fetch_count += 1
        self._last_attempt = self._clock()
        try:
            response = await self._http().get(
                self._settings.psc_jwks_url, headers={"Accept": "application/json"}
            )
            response.raise_for_status()
            if len(response.content) > MAX_JWKS_BYTES:
                raise IdpUnavailable("JWKS document is too large")
            document = response.json()
        except (httpx.HTTPError, ssl.SSLError, ValueError, OSError) as error:
            raise IdpUnavailable(f"cannot fetch the JWKS: {type(error).__name__}") from error
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise IdpUnavailable("JWKS document has no keys list")
        usable: dict[str, Mapping[str, Any]] = {}
        for key in keys:
            # RFC 7517 §4.2: a key whose "use" is not "sig" is not for signatures.
            if isinstance(key, dict) and key.get("use", "sig") == "sig" and key.get("kty") != "oct":
                usable[str(key.get("kid", ""))] = key
        if not usable:
            raise IdpUnavailable("JWKS document holds no usable signing key")
        self._keys = usable
        self._fetched_at = self._last_attempt

    async def _refresh(self, *, because_unknown_kid: bool) -> None:
        async with self._lock:
            now = self._clock()
            if not because_unknown_kid and self._cache_fresh(now):
                return  # another task refreshed while this one waited
            if self._last_attempt is not None and now - self._last_attempt < MIN_REFETCH_SECONDS:
                if because_unknown_kid:
                    return  # the caller reports an unknown key
                if self._last_error is not None:
                    raise self._last_error
                return
            try:
                await self._fetch()
            except IdpUnavailable as error:
                self._last_error = error
                raise
            self._last_error = None

    async def _key_for(self, kid: str) -> Mapping[str, Any]:
        if not self._cache_fresh(self._clock()):
            await self._refresh(because_unknown_kid=False)
            if self._fetched_at is None:
                raise self._last_error or IdpUnavailable("JWKS not yet fetched")
        key = self._lookup(kid)
        if key is None:
            await self._refresh(because_unknown_kid=True)
            key = self._lookup(kid)
        if key is None:
            raise PscTokenError("unknown-key", "token signed with a key the IdP does not publish")
        return key

    def _lookup(self, kid: str) -> Mapping[str, Any] | None:
        if kid in self._keys:
            return self._keys[kid]
        if not kid and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return None

    async def verify(self, token: str) -> PscClaims:
        """Verify ``token``; raise PscTokenError (refused) or IdpUnavailable (retry later)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise PscTokenError("malformed-token", "token is not a JWS compact JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise PscTokenError("bad-algorithm", f"token algorithm {alg!r} is not accepted")
        kid = header.get("kid", "")
        if not isinstance(kid, str):
            raise PscTokenError("malformed-token", "token kid is not a string")
        jwk_data = await self._key_for(kid)
        jwk_alg = jwk_data.get("alg")
        if jwk_alg is not None and jwk_alg != alg:
            raise PscTokenError("bad-algorithm", "token algorithm differs from the key's")
        try:
            # Bind the key to the header's (already allow-listed) algorithm; PyJWK
            # refuses a key whose type does not fit it (an EC key for RS256...).
            key = jwt.PyJWK(dict(jwk_data), algorithm=alg)
        except jwt.PyJWTError:
            raise PscTokenError("bad-algorithm", "token algorithm does not fit the key") from None
        try:
            # Time-based claims are checked below against the injected clock; PyJWT
            # would use the real time. iss and aud are checked below too, so each
            # refusal gets its own audit code.
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise PscTokenError("bad-signature", "token signature does not verify") from None
        except jwt.PyJWTError:
            raise PscTokenError("malformed-token", "token cannot be decoded") from None
        return self._check_claims(claims)

    def _check_claims(self, claims: Mapping[str, Any]) -> PscClaims:
        settings = self._settings
        now = self._clock()
        leeway = settings.psc_leeway_seconds
        # RFC 7519 §4.1.1: iss compared as a case-sensitive string.
        issuer = claims.get("iss")
        if issuer != settings.psc_issuer:
            raise PscTokenError("wrong-issuer", "token issuer is not the configured PSC issuer")
        if settings.psc_audience:
            # RFC 7519 §4.1.3: aud is a string or an array of strings.
            audience = claims.get("aud")
            audiences = [audience] if isinstance(audience, str) else audience
            if not isinstance(audiences, list) or settings.psc_audience not in audiences:
                raise PscTokenError("wrong-audience", "token is not meant for this server")
        # RFC 7519 §4.1.4: reject on or after exp. An access token without exp
        # would be valid forever: refuse it.
        expires = claims.get("exp")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            raise PscTokenError("malformed-token", "token has no numeric exp")
        if now >= expires + leeway:
            raise PscTokenError("expired-token", "token has expired")
        # RFC 7519 §4.1.5: reject before nbf.
        not_before = claims.get("nbf")
        if not_before is not None:
            if not isinstance(not_before, (int, float)) or isinstance(not_before, bool):
                raise PscTokenError("malformed-token", "token nbf is not numeric")
            if now < not_before - leeway:
                raise PscTokenError("not-yet-valid", "token is not valid yet")
        subject = claims.get(SUBJECT_CLAIM)
        if not isinstance(subject, str):
            raise PscTokenError("bad-subject", f"token has no {SUBJECT_CLAIM} claim")
        try:
            check_idnat_ps(subject)
        except IdNatError:
            raise PscTokenError(
                "bad-subject", f"token {SUBJECT_CLAIM} is not an idNat_PS"
            ) from None
        return PscClaims(idnat_ps=subject, expires_at=float(expires), issuer=issuer)
