"""Parsing of SASL client messages: pure functions over bytes, no I/O, no state.

This module owns the wire formats of PLAIN, LOGIN, XOAUTH2, OAUTHBEARER and
EXTERNAL client responses and of the server's bearer error challenges. It must
never look up accounts, check a credential or decide whether a login is allowed:
it only says what the client sent, or raises :class:`SaslMalformed`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


class SaslMalformed(ValueError):
    """The client's response does not follow the mechanism's syntax; the message
    says why and never repeats the secret."""


@dataclass(frozen=True)
class PlainResponse:
    authzid: str
    authcid: str
    password: str


@dataclass(frozen=True)
class BearerResponse:
    """A bearer token presented by XOAUTH2 or OAUTHBEARER."""

    user: str
    """XOAUTH2 ``user=`` or OAUTHBEARER gs2 ``a=`` authzid; empty when absent."""
    token: str


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslMalformed(f"{what} is not valid UTF-8") from None


def parse_plain(message: bytes) -> PlainResponse:
    """RFC 4616 §2: ``[authzid] NUL authcid NUL passwd``, each UTF-8 without NUL."""
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SaslMalformed("PLAIN response must hold exactly two NUL separators")
    authzid, authcid, password = (_utf8(part, "PLAIN response") for part in parts)
    # RFC 4616 §2: authcid and passwd are 1*SAFE: both must be non-empty.
    if not authcid or not password:
        raise SaslMalformed("PLAIN response has an empty login or password")
    return PlainResponse(authzid=authzid, authcid=authcid, password=password)


def parse_login_field(message: bytes, what: str) -> str:
    """One answer of the LOGIN mechanism (draft-murchison-sasl-login): UTF-8, no NUL."""
    text = _utf8(message, what)
    if "\x00" in text:
        raise SaslMalformed(f"{what} contains NUL")
    if not text:
        raise SaslMalformed(f"{what} is empty")
    return text


def parse_external(message: bytes) -> str:
    """RFC 4422 Appendix A.1: the EXTERNAL response is an optional authzid."""
    text = _utf8(message, "EXTERNAL authorization identity")
    if "\x00" in text:
        raise SaslMalformed("EXTERNAL authorization identity contains NUL")
    return text


# RFC 7628 §3.1: key = 1*(ALPHA); value = *(VCHAR / SP / HTAB / CR / LF).
_KEY = re.compile(r"[A-Za-z]+")
_VALUE = re.compile(r"[\x21-\x7e \t\r\n]*")
# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=".
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")


def _kvpairs(text: str, what: str) -> dict[str, str]:
    """``kvpair *( kvsep kvpair ) kvsep kvsep``-style list: pairs each closed by 0x01,
    then a final 0x01 (RFC 7628 §3.1)."""
    if not text.endswith("\x01\x01"):
        raise SaslMalformed(f"{what} must end with two 0x01 separators")
    pairs: dict[str, str] = {}
    for item in text[:-2].split("\x01"):
        key, sep, value = item.partition("=")
        if not sep or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
            raise SaslMalformed(f"{what} holds a malformed key=value pair")
        if key in pairs:
            raise SaslMalformed(f"{what} repeats the key {key!r}")
        pairs[key] = value
    return pairs


def _bearer_token(pairs: dict[str, str], what: str) -> str:
    match = _BEARER.fullmatch(pairs.get("auth", ""))
    if match is None:
        raise SaslMalformed(f"{what} has no auth=Bearer <token>")
    return match.group(1)


def parse_xoauth2(message: bytes) -> BearerResponse:
    """Google's XOAUTH2: ``user=<login>^Aauth=Bearer <token>^A^A``."""
    pairs = _kvpairs(_utf8(message, "XOAUTH2 response"), "XOAUTH2 response")
    user = pairs.get("user", "")
    if not user:
        raise SaslMalformed("XOAUTH2 response has no user=")
    return BearerResponse(user=user, token=_bearer_token(pairs, "XOAUTH2 response"))


def _decode_saslname(value: str) -> str:
    """RFC 5801 §4: in a GS2 authzid, ``=2C`` stands for ``,`` and ``=3D`` for ``=``;
    any other ``=`` is an error."""
    out: list[str] = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == ",":
            raise SaslMalformed("OAUTHBEARER authzid contains an unescaped comma")
        if char == "=":
            escape = value[index + 1 : index + 3]
            if escape == "2C":
                out.append(",")
            elif escape == "3D":
                out.append("=")
            else:
                raise SaslMalformed("OAUTHBEARER authzid contains a bad = escape")
            index += 3
            continue
        out.append(char)
        index += 1
    return "".join(out)


def parse_oauthbearer(message: bytes) -> BearerResponse:
    """RFC 7628 §3.1: ``gs2-header kvsep *kvpair kvsep``, the gs2 header being
    ``n,a=<authzid>,`` or ``n,,``."""
    text = _utf8(message, "OAUTHBEARER response")
    flag, sep, rest = text.partition(",")
    # RFC 7628 §3.1: channel binding is not supported, so "p=" is refused; "y"
    # (client could bind but believes the server cannot) is acceptable.
    if not sep or flag not in ("n", "y"):
        raise SaslMalformed("OAUTHBEARER response must start with the gs2 header n,")
    authzid_field, sep, rest = rest.partition(",")
    if not sep:
        raise SaslMalformed("OAUTHBEARER gs2 header is not closed by a comma")
    user = ""
    if authzid_field:
        if not authzid_field.startswith("a="):
            raise SaslMalformed("OAUTHBEARER gs2 header has an unknown field")
        user = _decode_saslname(authzid_field[2:])
    if not rest.startswith("\x01"):
        raise SaslMalformed("OAUTHBEARER gs2 header must be followed by 0x01")
    pairs = _kvpairs(rest[1:], "OAUTHBEARER response")
    return BearerResponse(user=user, token=_bearer_token(pairs, "OAUTHBEARER response"))


def bearer_error_challenge(*, xoauth2: bool, scope: str, openid_configuration: str) -> bytes:
    """The JSON the server sends before failing a bearer exchange.

    OAUTHBEARER: RFC 7628 §3.2.2 (``status`` is an RFC 6750 error code). XOAUTH2
    follows Google's variant, whose ``status`` is the HTTP status code.
    """
    error: dict[str, str] = {
        "status": "401" if xoauth2 else "invalid_token",
        "schemes": "bearer",
        "scope": scope,
    }
    if openid_configuration and not xoauth2:
        error["openid-configuration"] = openid_configuration
    return json.dumps(error, separators=(",", ":")).encode("ascii")
