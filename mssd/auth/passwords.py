"""Password hashing with scrypt (RFC 7914), in a PHC-like string.

This module owns the stored password format
``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<key>`` (salt and key in standard
base64 without padding) and the comparison of a password with it. It must never
log or return a password, compare keys in variable time, or run scrypt on the
event loop thread (use the ``*_async`` functions from async code).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable

from mssd.config import AuthSettings

SALT_BYTES = 16
KEY_BYTES = 32

_FORMAT = re.compile(
    r"\$scrypt\$ln=(?P<ln>\d{1,2}),r=(?P<r>\d{1,3}),p=(?P<p>\d{1,2})"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<key>[A-Za-z0-9+/]+)"
)
# Bounds on parameters read back from storage, so a corrupted or hostile row
# cannot make one login allocate gigabytes.
_MAX_LN = 20
_MAX_R = 16
_MAX_P = 16


class PasswordHashError(ValueError):
    """A stored password hash is not in the format this module writes."""


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise PasswordHashError("stored password hash has invalid base64") from None


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # RFC 8265 §4.2 (OpaqueString): compare passwords in Unicode NFC, so the same
    # password typed on systems that decompose accents (macOS) still matches.
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    # RFC 7914 §2: scrypt needs 128·r·N bytes for V plus 256·r + 128·r·p for B and X;
    # hashlib refuses by default above 32 MiB, so state the real need with headroom.
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def hash_password(password: str, settings: AuthSettings) -> str:
    """Hash ``password`` with a fresh 16-byte salt and the parameters of ``settings``."""
    n, r, p = settings.scrypt_n, settings.scrypt_r, settings.scrypt_p
    if n < 2 or n & (n - 1):
        raise ValueError(f"scrypt N must be a power of two above 1, got {n}")
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, n, r, p, KEY_BYTES)
    ln = n.bit_length() - 1
    return f"$scrypt$ln={ln},r={r},p={p}${_b64encode(salt)}${_b64encode(key)}"


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored``.

    The scrypt parameters come from ``stored``, not from the settings, so hashes
    written before a change of settings still verify. Raises
    :class:`PasswordHashError` when ``stored`` is not a hash this module wrote.
    """
    match = _FORMAT.fullmatch(stored)
    if match is None:
        raise PasswordHashError("stored password hash is not in the $scrypt$ format")
    ln, r, p = int(match["ln"]), int(match["r"]), int(match["p"])
    if not (1 <= ln <= _MAX_LN and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise PasswordHashError("stored password hash has out-of-range scrypt parameters")
    salt, expected = _b64decode(match["salt"]), _b64decode(match["key"])
    if len(salt) < 8 or not 16 <= len(expected) <= 64:
        raise PasswordHashError("stored password hash has a bad salt or key length")
    actual = _scrypt(password, salt, 1 << ln, r, p, len(expected))
    return hmac.compare_digest(actual, expected)


async def hash_password_async(password: str, settings: AuthSettings) -> str:
    """:func:`hash_password` in a worker thread, so the event loop keeps running."""
    return await asyncio.to_thread(hash_password, password, settings)


async def verify_password_async(password: str, stored: str) -> bool:
    """:func:`verify_password` in a worker thread, so the event loop keeps running."""
    return await asyncio.to_thread(verify_password, password, stored)


class VerifiedPasswords:
    """Passwords recently found to match a stored hash, so that software which
    logs in again and again (a lab system polling its mailbox, a phone's
    short-lived connections) pays one scrypt per ``ttl`` seconds rather than one
    per login, as Dovecot's ``auth_cache`` does.

    Only successes are kept: a wrong password costs the full scrypt each time it
    is tried (tries of one password at the same moment share one, below). An
    entry is the HMAC-SHA-256, under a random key that never leaves this
    process, of the stored hash and the password: no password is kept, and a
    password change (a new stored hash, new salt) misses at once. ``ttl`` 0
    keeps nothing.

    Logins with the same password against the same hash at the same moment
    (a mail client opening its connections together, Thunderbird up to five,
    or every connection of a lab system coming back after a restart) share
    one scrypt: the later ones wait for the first one's answer, which is the
    answer they would compute. Each distinct password still costs its own."""

    def __init__(
        self, ttl: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._running: dict[bytes, asyncio.Future[bool]] = {}
        """Verifications under way, by digest."""

    def _digest(self, password: str, stored: str) -> bytes:
        secret = unicodedata.normalize("NFC", password).encode("utf-8")
        message = stored.encode("ascii", "replace") + b"\0" + secret
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _known(self, digest: bytes) -> bool:
        expires = self._entries.get(digest)
        if expires is None:
            return False
        if expires <= self._clock():
            del self._entries[digest]
            return False
        return True

    def _remember(self, digest: bytes) -> None:
        self._entries[digest] = self._clock() + self.ttl
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def verify(self, password: str, stored: str) -> bool:
        """:func:`verify_password_async`, skipped for a pair verified within
        ``ttl``, and run once for the same pair asked several times at once."""
        digest = self._digest(password, stored)
        if self.ttl > 0 and self._known(digest):
            return True
        running = self._running.get(digest)
        if running is None:
            running = asyncio.ensure_future(verify_password_async(password, stored))
            self._running[digest] = running
            running.add_done_callback(lambda done: self._finished(digest, done))
        # Shielded: a login given up (its client gone) does not cancel the
        # verification the others wait for.
        return await asyncio.shield(running)

    def _finished(self, digest: bytes, done: asyncio.Future[bool]) -> None:
        if self._running.get(digest) is done:
            del self._running[digest]
        if done.cancelled() or done.exception() is not None:
            return  # (exception() also marks it retrieved if nobody waits any more)
        if done.result() and self.ttl > 0:
            self._remember(digest)
