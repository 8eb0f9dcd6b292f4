"""Converting a message with 8-bit bodies to 7 bits, for a peer that does not offer 8BITMIME.

RFC 6152 §3: a client holding 8-bit data for a server that does not offer 8BITMIME must
either convert the message to 7 bits or return it as undeliverable. This module does the
conversion the way RFC 6152 §3 points to (RFC 2045 §6): every leaf part whose body has
octets above 127 is re-encoded, ``quoted-printable`` for text (it stays readable) and
``base64`` otherwise, and its ``Content-Transfer-Encoding`` field says so; a multipart or
an embedded message that was labelled ``8bit`` is relabelled ``7bit`` once its parts are.
Everything else is kept byte for byte: parts that are already 7-bit, the delimiters, the
order and spelling of header fields.

It refuses (:class:`CannotConvert`) what no transfer encoding can fix: 8-bit octets in
a header field (RFC 6532 messages need SMTPUTF8, not this), in a multipart's preamble or
epilogue, or in a body that claims to be base64 or quoted-printable already.

Pure: bytes in, bytes out, no I/O (callers run large messages in a thread).
"""

from __future__ import annotations

import base64
import binascii

from mssd.mime.structure import Part, iter_fields, parse, unfold


class CannotConvert(Exception):
    """The message cannot be made 7-bit; the text says why."""


def to_seven_bit(raw: bytes) -> bytes:
    """``raw`` with every 8-bit body re-encoded (see the module docstring)."""
    if raw.isascii():
        return raw
    return _convert(raw, parse(raw))


def _convert(raw: bytes, part: Part) -> bytes:
    header = raw[part.start : part.body_start]
    if not header.isascii():
        raise CannotConvert("8-bit octets in a header field")
    if raw[part.body_start : part.end].isascii():
        return raw[part.start : part.end]
    if part.children:
        pieces = [_relabel(raw, part, b"7bit")]
        position = part.body_start
        for child in part.children:
            pieces += [_gap(raw, position, child.start), _convert(raw, child)]
            position = child.end
        pieces.append(_gap(raw, position, part.end))
        return b"".join(pieces)
    if part.message is not None:
        # RFC 2046 §5.2.1: an embedded message is 7bit, 8bit or binary, never encoded:
        # its own parts are converted instead.
        return _relabel(raw, part, b"7bit") + _convert(raw, part.message)
    if part.is_multipart or part.is_message:
        # RFC 2045 §6.4: never encoded either; these are the ones left undivided.
        raise CannotConvert(f"8-bit octets in a {part.maintype}/{part.subtype} not divided")
    if _transfer_encoding(raw, part) in (b"base64", b"quoted-printable"):
        raise CannotConvert("8-bit octets in a body that claims to be encoded already")
    body = raw[part.body_start : part.end]
    if part.maintype == "text":
        # RFC 2045 §6.7; istext keeps the line breaks as they are (CRLF in stored mail).
        encoded = binascii.b2a_qp(body, quotetabs=False, istext=True, header=False)
        return _relabel(raw, part, b"quoted-printable") + encoded
    # RFC 2045 §6.8: lines of 76 characters.
    encoded = base64.encodebytes(body).replace(b"\n", b"\r\n")
    return _relabel(raw, part, b"base64") + encoded


def _gap(raw: bytes, start: int, end: int) -> bytes:
    """Delimiters, preamble, epilogue: kept as they are, which needs them 7-bit."""
    gap = raw[start:end]
    if not gap.isascii():
        raise CannotConvert("8-bit octets outside the body parts of a multipart")
    return gap


def _transfer_encoding(raw: bytes, part: Part) -> bytes:
    for field in iter_fields(raw, part.start, part.body_start):
        if field.name.lower() == "content-transfer-encoding":
            return unfold(raw[field.value_start : field.value_end]).lower()
    return b"7bit"  # RFC 2045 §6.1: the default


def _relabel(raw: bytes, part: Part, encoding: bytes) -> bytes:
    """The part's header with ``Content-Transfer-Encoding: <encoding>``: the field
    replaced where it is, or added after the last field when there was none."""
    line = b"Content-Transfer-Encoding: " + encoding + b"\r\n"
    fields = list(iter_fields(raw, part.start, part.body_start))
    for field in fields:
        if field.name.lower() == "content-transfer-encoding":
            return raw[part.start : field.start] + line + raw[field.end : part.body_start]
    if encoding == b"7bit":
        return raw[part.start : part.body_start]  # already the default
    if part.body_start == part.start:
        return line + b"\r\n"  # no header at all: it needs its empty line too
    insert = fields[-1].end if fields else part.start
    return raw[part.start : insert] + line + raw[insert : part.body_start]
