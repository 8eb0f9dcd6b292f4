"""Mailbox names on the wire: modified UTF-7 (RFC 3501 §5.1.3) or UTF-8 (RFC 6855 §3,
RFC 9051 §5.1).

This module owns the conversion between the names mssd stores (Unicode text) and the names
a client sends and receives. Pure functions: no I/O, no session state; the caller says
whether the session enabled UTF8=ACCEPT or IMAP4rev2.
"""

from __future__ import annotations

import base64
import unicodedata

_MUTF7_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,"
_MUTF7_SET = frozenset(_MUTF7_ALPHABET)


def _mutf7_chunk(chars: str) -> str:
    data = chars.encode("utf-16-be")  # lone surrogates raise UnicodeEncodeError (ValueError)
    return "&" + base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",") + "-"


def encode_mailbox_name(name: str, utf8: bool) -> str:
    """Render a mailbox name for the wire: UTF-8 as is when `utf8`, else modified UTF-7."""
    if utf8:
        return name
    out: list[str] = []
    pending: list[str] = []
    for ch in name:
        # RFC 3501 §5.1.3: printable US-ASCII represents itself, "&" is "&-".
        if 0x20 <= ord(ch) <= 0x7E:
            if pending:
                out.append(_mutf7_chunk("".join(pending)))
                pending.clear()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    if pending:
        out.append(_mutf7_chunk("".join(pending)))
    return "".join(out)


def decode_mailbox_name(name: bytes | str, utf8: bool) -> str:
    """Decode a mailbox name from the wire; raise ValueError when it is malformed.

    With `utf8` (UTF8=ACCEPT or IMAP4rev2) names are UTF-8; otherwise they are modified
    UTF-7 and are checked strictly (RFC 3501 §5.1.3: printable ASCII is never encoded,
    base64 runs are canonical and terminated).
    """
    if isinstance(name, bytes):
        if utf8:
            return name.decode("utf-8")
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("8-bit mailbox name without UTF8=ACCEPT") from None
    else:
        text = name
        if utf8:
            return text
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "&":
            if not 0x20 <= ord(ch) <= 0x7E:
                raise ValueError("mailbox name contains a non-printable or 8-bit character")
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise ValueError("unterminated modified UTF-7 sequence")
        chunk = text[i + 1 : end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        if not _MUTF7_SET.issuperset(chunk) or len(chunk) % 4 == 1:
            raise ValueError("invalid modified base64")
        data = base64.b64decode(chunk.replace(",", "/") + "=" * (-len(chunk) % 4))
        if len(data) % 2:
            raise ValueError("modified UTF-7 run is not UTF-16")
        decoded = data.decode("utf-16-be")  # unpaired surrogates raise
        if any(0x20 <= ord(c) <= 0x7E for c in decoded) or _mutf7_chunk(decoded)[1:-1] != chunk:
            raise ValueError("non-canonical modified UTF-7")
        out.append(decoded)
    return "".join(out)


def forbidden_character(name: str) -> str | None:
    """The first character RFC 9051 §5.1 forbids in a mailbox name, if any: controls
    (U+0000-U+001F, U+007F-U+009F), LINE SEPARATOR and PARAGRAPH SEPARATOR."""
    for ch in name:
        if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or ch in "\u2028\u2029":
            return ch
    return None


def denormalised(name: str) -> bool:
    """Whether a name is not in Unicode Normalization Form C, so not Net-Unicode
    (RFC 5198 §2). RFC 9051 §5.1: servers "MUST prohibit the creation of 8-bit
    mailbox names that do not comply with Net-Unicode", and MAY instead convert
    them to NFC, but then "MUST accept them in all IMAP commands that have a mailbox
    name parameter" and answer SELECT with an OLDNAME LIST response (§6.3.2,
    §6.3.9.7). mssd refuses them rather than converting: the store compares names
    exactly, so accepting the denormalised spelling everywhere would mean
    normalising every name a command carries, and folders stored before with
    such a name (they were accepted until now) would no longer be reachable by
    the name LIST gives for them."""
    return not unicodedata.is_normalized("NFC", name)


def normalise_inbox(name: str) -> str:
    # RFC 9051 §5.1: "INBOX" is case-insensitive; other names are not.
    return "INBOX" if name.upper() == "INBOX" else name
