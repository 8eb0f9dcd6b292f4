"""Time-based one-time codes: RFC 6238 TOTP over RFC 4226 HOTP (SHA-1, 30 s, 6 digits).

This module owns code computation, secret generation, the ``otpauth://`` URI
that authenticator apps scan, and the convention by which a mail client carries
the code: the password field holds the password immediately followed by the
current 6-digit code (``s3cret123456``), because standard IMAP/SMTP clients have
no second field. It must never remember which codes were used: replay is
prevented by :meth:`mssd.auth.model.AccountLookup.claim_totp_step`, in the store,
so it holds across processes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from urllib.parse import quote, urlencode

STEP_SECONDS = 30
DIGITS = 6
SECRET_BYTES = 20
"""RFC 4226 §4 R6: at least 128 bits; 160 bits matches the SHA-1 block output."""


def decode_secret(secret_b32: str) -> bytes:
    """Decode a base32 secret, tolerating lower case, spaces and missing padding
    as authenticator apps display it. Raises ValueError when it is not base32."""
    cleaned = secret_b32.replace(" ", "").upper()
    try:
        key = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except binascii.Error:
        raise ValueError("TOTP secret is not base32") from None
    if not key:
        raise ValueError("TOTP secret is empty")
    return key


def hotp(key: bytes, counter: int, digits: int = DIGITS) -> str:
    """RFC 4226 §5.3: HMAC-SHA-1 of the 8-byte counter, dynamic truncation, modulo 10^digits."""
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def time_step(at: float) -> int:
    """RFC 6238 §4.2: T = floor((unix time - T0) / X), with T0 = 0 and X = 30."""
    return int(at // STEP_SECONDS)


def totp_code(secret_b32: str, at: float) -> str:
    """The 6-digit code valid at epoch second ``at``."""
    return hotp(decode_secret(secret_b32), time_step(at))


def generate_totp_secret() -> str:
    """A fresh random secret, base32 without padding (32 characters)."""
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii").rstrip("=")


def provisioning_uri(secret: str, account_name: str, issuer: str = "mssd") -> str:
    """The ``otpauth://totp/...`` URI (authenticator apps' Key Uri Format), shown as a QR code."""
    label = quote(f"{issuer}:{account_name}", safe=":@")
    query = urlencode(
        {
            "secret": secret,
            "issuer": issuer,
            "algorithm": "SHA1",
            "digits": DIGITS,
            "period": STEP_SECONDS,
        },
        quote_via=quote,
    )
    return f"otpauth://totp/{label}?{query}"


def split_password_and_code(secret: str) -> tuple[str, str] | None:
    """Split ``password + 6 digits`` into its parts; None when the last six
    characters are not ASCII digits or nothing precedes them."""
    password, code = secret[:-DIGITS], secret[-DIGITS:]
    if not password or len(code) != DIGITS or not all("0" <= c <= "9" for c in code):
        return None
    return password, code


def matching_step(secret_b32: str, code: str, at: float, window: int) -> int | None:
    """The time step within ±``window`` steps of ``at`` whose code is ``code``, or None.

    RFC 6238 §5.2 recommends accepting at most one step of drift either side (the
    ``totp_window`` setting). Every candidate is compared, in constant time, so the
    timing does not depend on which step matched.
    """
    key = decode_secret(secret_b32)
    now = time_step(at)
    found: int | None = None
    for step in range(now - window, now + window + 1):
        if hmac.compare_digest(hotp(key, step), code) and found is None:
            found = step
    return found
