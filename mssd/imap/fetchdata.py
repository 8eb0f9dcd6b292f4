"""FETCH data items computed from a stored message: ENVELOPE, BODY/BODYSTRUCTURE,
BODY[section], BINARY[section], RFC822.SIZE.

This module owns the *values* (RFC 3501 §7.4.2, RFC 9051 §7.5.2) as a small tree
of Python values (:data:`ImapValue`); the response encoder in
``mssd.imap.encode`` owns how they are written on the wire (quoted string or
literal, NIL, parentheses). It must never write protocol bytes itself, do I/O,
or raise on a malformed message: whatever the tree from
:func:`mssd.mime.structure.parse` says is reported as faithfully as the grammar
allows.

Dovecot compatibility (``tests/test_imap_dovecot.py`` compares our answers with
a real Dovecot 2.3 and lists, with the RFC clause, where they differ on purpose:
the CRLF before an outer boundary after an embedded message's close delimiter,
a garbage Content-Type, folded envelope strings, lenient base64):
- type, subtype, parameter names and values, disposition and encoding are
  reported with the case written in the message; nothing is upper-cased;
- a missing or unparsable Content-Type is reported ``"text" "plain"
  ("charset" "us-ascii")`` (``"message" "rfc822" NIL`` inside multipart/digest);
  any ``text/*`` part without a charset parameter gets ``"charset" "us-ascii"``
  appended to its parameter list; a missing Content-Transfer-Encoding is ``"7bit"``;
- RFC 2231 parameter continuations are merged but not decoded: an extended
  parameter is reported as ``"filename*" "utf-8''%C3%A9..."``;
- a multipart without any body part is reported with one empty text/plain part;
- line counts are the number of LF in the encoded body as stored; sizes are of
  the encoded body as stored;
- envelope strings are raw (RFC 2047 encoded words kept), unfolded; an absent
  field is NIL, a present but empty one ``""``; addresses without a domain get
  the host ``"MISSING_DOMAIN"`` and without a local part ``"MISSING_MAILBOX"``
  (NIL host is reserved for group syntax).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

from mssd.mime.structure import (
    Part,
    content_params,
    header_value,
    iter_fields,
    parse_content_type,
)

__all__ = [
    "Atom",
    "ImapValue",
    "Literal8",
    "SectionSpec",
    "binary",
    "binary_size",
    "body_text",
    "bodystructure",
    "envelope",
    "partial",
    "resolve_part",
    "rfc822_size",
    "section",
    "text_lines",
]


@dataclass(frozen=True)
class Atom:
    """A bare atom on the wire (flags, keywords): written without quotes."""

    value: str


@dataclass(frozen=True)
class Literal8:
    """Binary content sent as a ``~{n}`` literal8 (RFC 3516 §4.2, RFC 9051 §4.3)."""

    data: bytes


@dataclass(frozen=True)
class Run:
    """Values written one after the other with no separator: the ``1*address``
    of an address list and the ``1*body`` of a multipart (RFC 9051 §9 has no SP
    there, so ``((...)(...))``, not ``((...) (...))``)."""

    items: tuple[ImapValue, ...]


# None -> NIL; int -> number; str -> quoted string or literal (the encoder decides,
# e.g. for CR, LF, quote, backslash or 8-bit text); bytes -> literal;
# Atom -> bare atom; Literal8 -> ~{n}; list -> parenthesized list; Run -> juxtaposed.
ImapValue = None | int | str | bytes | Atom | Literal8 | Run | list["ImapValue"]


def _nstring(value: bytes | None) -> ImapValue:
    """NIL for absent; UTF-8 text (RFC 6532 headers) as str; other 8-bit bytes as a literal."""
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


# --- ENVELOPE --------------------------------------------------------------------------------

_ADDRESS_SPECIALS = b'<>,:;@"()'


def _address_tokens(value: bytes) -> list[tuple[str, bytes]]:
    """RFC 5322 §3.2 lexical tokens: ("q", quoted-string content), ("c", comment),
    ("s", one special), ("a", atom or dot-atom). Never fails; unterminated
    quotes and comments run to the end."""
    tokens: list[tuple[str, bytes]] = []
    pos, n = 0, len(value)
    while pos < n:
        c = value[pos]
        if c in b" \t\r\n":
            pos += 1
        elif c == 0x22:  # quoted-string, §3.2.4
            out = bytearray()
            pos += 1
            while pos < n and value[pos] != 0x22:
                if value[pos] == 0x5C and pos + 1 < n:
                    pos += 1
                out.append(value[pos])
                pos += 1
            pos += 1
            tokens.append(("q", bytes(out)))
        elif c == 0x28:  # comment, §3.2.2; nests
            depth, start = 0, pos
            while pos < n:
                if value[pos] == 0x5C:
                    pos += 1
                elif value[pos] == 0x28:
                    depth += 1
                elif value[pos] == 0x29:
                    depth -= 1
                    if depth == 0:
                        break
                pos += 1
            tokens.append(("c", value[start + 1 : pos].strip()))
            pos += 1
        elif c in _ADDRESS_SPECIALS:
            tokens.append(("s", bytes([c])))
            pos += 1
        else:
            start = pos
            while pos < n and value[pos] not in _ADDRESS_SPECIALS and value[pos] not in b" \t\r\n":
                pos += 1
            tokens.append(("a", value[start:pos]))
    return tokens


def _mailbox(
    phrase: list[bytes],
    angle: list[tuple[str, bytes]] | None,
    plain: list[tuple[str, bytes]],
    comment: bytes | None,
) -> ImapValue:
    """One (name adl mailbox host) address, RFC 3501 §7.4.2."""
    spec = angle if angle is not None else plain
    route: bytes | None = None
    if angle is not None:
        # obs-route, RFC 5322 §4.4: "<@a,@b:user@host>"
        for i, (kind, text) in enumerate(spec):
            if kind == "s" and text == b":":
                route = b"".join(t for _, t in spec[:i])
                spec = spec[i + 1 :]
                break
    at = max((i for i, (kind, text) in enumerate(spec) if kind == "s" and text == b"@"), default=-1)
    local_tokens = spec if at < 0 else spec[:at]
    local = b"".join(t for k, t in local_tokens if k in ("a", "q"))
    host = b"".join(t for k, t in spec[at + 1 :] if k in ("a", "q", "s")) if at >= 0 else b""
    name: bytes | None = b" ".join(phrase) if phrase else None
    if angle is None and name is None:
        name = comment  # "user@host (Full Name)", the RFC 822 habit
    return [
        _nstring(name or None),
        _nstring(route or None),
        _nstring(local or b"MISSING_MAILBOX"),
        _nstring(host or b"MISSING_DOMAIN"),
    ]


def address_list(value: bytes | None) -> ImapValue:
    """An address list as ``((name adl mailbox host) ...)``, groups as RFC 3501
    §7.4.2 writes them; NIL when there is no address at all."""
    if value is None:
        return None
    out: list[ImapValue] = []
    phrase: list[bytes] = []
    plain: list[tuple[str, bytes]] = []
    angle: list[tuple[str, bytes]] | None = None
    comment: bytes | None = None
    in_angle = in_group = False

    def flush() -> None:
        nonlocal phrase, plain, angle, comment
        if angle is not None or any(k != "c" for k, _ in plain):
            out.append(_mailbox(phrase, angle, plain, comment))
        phrase, plain, angle, comment = [], [], None, None

    for kind, text in _address_tokens(value):
        if kind == "c":
            comment = text or comment
            continue
        if in_angle:
            if kind == "s" and text == b">":
                in_angle = False
            elif angle is not None:
                angle.append((kind, text))
            continue
        if kind == "s" and text == b"<":
            in_angle = True
            phrase = [t for k, t in plain if k in ("a", "q")]
            plain, angle = [], []
        elif kind == "s" and text == b":" and not in_group and angle is None:
            name = b" ".join(t for k, t in plain if k in ("a", "q"))
            out.append([None, None, _nstring(name), None])  # group start
            phrase, plain, comment, in_group = [], [], None, True
        elif kind == "s" and text == b",":
            flush()
        elif kind == "s" and text == b";":
            flush()
            if in_group:
                out.append([None, None, None, None])  # group end
                in_group = False
        else:
            plain.append((kind, text))
    flush()
    if in_group:
        out.append([None, None, None, None])
    return out or None


def envelope(raw: bytes, part: Part) -> list[ImapValue]:
    """ENVELOPE of the message whose top entity is ``part`` (RFC 3501 §7.4.2,
    RFC 9051 §7.5.2). ``raw`` is accepted for symmetry with the other items."""
    del raw
    sender_from = address_list(header_value(part, "From"))

    def defaulted(name: str) -> ImapValue:
        # RFC 3501 §7.4.2: absent or empty Sender / Reply-To take the From value.
        value = address_list(header_value(part, name))
        return sender_from if value is None else value

    return [
        _nstring(header_value(part, "Date")),
        _nstring(header_value(part, "Subject")),
        sender_from,
        defaulted("Sender"),
        defaulted("Reply-To"),
        address_list(header_value(part, "To")),
        address_list(header_value(part, "Cc")),
        address_list(header_value(part, "Bcc")),
        _nstring(header_value(part, "In-Reply-To")),
        _nstring(header_value(part, "Message-ID")),
    ]


# --- BODY / BODYSTRUCTURE --------------------------------------------------------------------

_EMPTY_BODY: list[ImapValue] = ["text", "plain", ["charset", "us-ascii"], None, None, "7bit", 0, 0]


def _empty_body(extensible: bool) -> list[ImapValue]:
    """The stand-in for a missing body; in BODYSTRUCTURE it carries the four
    extension fields NIL like any other text part (as Dovecot writes it)."""
    return [*_EMPTY_BODY, None, None, None, None] if extensible else list(_EMPTY_BODY)


def text_lines(raw: bytes, part: Part) -> int:
    """Lines of the encoded body as stored: the number of LF (see module docstring)."""
    return raw.count(b"\n", part.body_start, part.end)


def _param_list(params: list[tuple[str, str]], *, default_charset: bool) -> ImapValue:
    out: list[ImapValue] = []
    for name, value in params:
        out.extend([name, value])
    if default_charset and not any(name.lower() == "charset" for name, _ in params):
        out.extend(["charset", "us-ascii"])
    return out or None


def _disposition(part: Part) -> ImapValue:
    """("type" (params) ) or NIL, RFC 2183 / RFC 3501 body-fld-dsp."""
    value = header_value(part, "Content-Disposition")
    if value is None:
        return None
    kind, params = content_params(value)
    if not kind:
        return None
    return [_nstring(kind), _param_list(params, default_charset=False)]


def _language(part: Part) -> ImapValue:
    """Content-Language (RFC 3282) as a list of tags, or NIL."""
    value = header_value(part, "Content-Language")
    if value is None:
        return None
    tags: list[ImapValue] = [_nstring(t.strip()) for t in value.split(b",") if t.strip()]
    return tags or None


def _extension(part: Part) -> list[ImapValue]:
    return [
        _disposition(part),
        _language(part),
        _nstring(header_value(part, "Content-Location")),
    ]


def bodystructure(raw: bytes, part: Part, *, extensible: bool) -> list[ImapValue]:
    """BODYSTRUCTURE (``extensible=True``) or BODY of ``part`` (RFC 3501 §7.4.2,
    RFC 9051 §7.5.2)."""
    if part.is_multipart:
        children: list[ImapValue] = [
            bodystructure(raw, child, extensible=extensible) for child in part.children
        ] or [_empty_body(extensible)]
        written = parse_content_type(header_value(part, "Content-Type") or b"")
        subtype, params = (written[1], written[2]) if written else (part.subtype, [])
        out = [*children, subtype]
        if extensible:
            out.append(_param_list(params, default_charset=False))
            out.extend(_extension(part))
        return out

    written = parse_content_type(header_value(part, "Content-Type") or b"")
    if written is None:
        maintype, subtype = part.maintype, part.subtype
        params = list(part.params)
    else:
        maintype, subtype, params = written
    is_text = part.maintype == "text"
    encoding_value = header_value(part, "Content-Transfer-Encoding")
    encoding = content_params(encoding_value)[0] if encoding_value else b""
    out = [
        maintype,
        subtype,
        _param_list(params, default_charset=is_text),
        _nstring(header_value(part, "Content-ID")),
        _nstring(header_value(part, "Content-Description")),
        _nstring(encoding or b"7bit"),
        part.end - part.body_start,
    ]
    if part.is_message:
        if part.message is not None:
            out.append(envelope(raw, part.message))
            out.append(bodystructure(raw, part.message, extensible=extensible))
        else:  # left opaque by the parser (encoded, or past the depth limit)
            out.append([None] * 10)
            out.append(_empty_body(extensible))
        out.append(text_lines(raw, part))
    elif is_text:
        out.append(text_lines(raw, part))
    if extensible:
        out.append(_nstring(header_value(part, "Content-MD5")))
        out.extend(_extension(part))
    return out


# --- BODY[section], BINARY[section] ----------------------------------------------------------

_TEXT_SPECS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})


@dataclass(frozen=True)
class SectionSpec:
    """A parsed section (RFC 3501 §6.4.5): part numbers, then an optional text
    specifier (upper-case), with field names for HEADER.FIELDS[.NOT]."""

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()


def resolve_part(root: Part, numbers: tuple[int, ...]) -> Part | None:
    """The entity a part number names (RFC 3501 §6.4.5), None when there is none.

    Part 1 of a non-multipart message is its body (the message entity itself);
    after a number naming a message/rfc822 part, the following numbers count in
    the embedded message."""
    node = root
    at_message = True
    for index, number in enumerate(numbers):
        if node.is_multipart:
            if not 1 <= number <= len(node.children):
                return None
            node = node.children[number - 1]
        elif not (at_message and number == 1):
            return None
        at_message = False
        if index + 1 < len(numbers) and node.is_message:
            if node.message is None:
                return None
            node, at_message = node.message, True
    return node


def _header_fields(raw: bytes, message: Part, names: tuple[str, ...], *, keep: bool) -> bytes:
    """The fields named (or, with keep=False, not named), as written, in message order,
    then the empty line (RFC 3501 §6.4.5 HEADER.FIELDS).

    RFC 9051 §6.4.5: the blank line is included in all header fetches "except in
    the case of a message which has no body and no blank line"."""
    wanted = {name.lower() for name in names}
    out = bytearray()
    for field in iter_fields(raw, message.start, message.end):
        if (field.name.lower() in wanted) == keep:
            chunk = raw[field.start : field.end]
            out += chunk
            if not chunk.endswith(b"\n"):
                out += b"\r\n"
    header = raw[message.start : message.body_start]
    has_blank_line = header.endswith((b"\n\n", b"\n\r\n")) or header in (b"\n", b"\r\n")
    if has_blank_line or message.body_start < message.end:
        out += b"\r\n"
    return bytes(out)


def section(raw: bytes, root: Part, spec: SectionSpec) -> bytes | None:
    """The bytes of BODY[section] (before any <partial>, see :func:`partial`).

    None when the section is malformed (part number 0, MIME without a part number,
    unknown text specifier, empty field list): the caller answers BAD.
    A part that does not exist, or HEADER/TEXT after a part number that is not
    message/rfc822, gives ``b""``: RFC 9051 §6.4.5 lets the server return an
    empty string rather than fail the whole FETCH."""
    if any(number < 1 for number in spec.part):
        return None
    if spec.text is not None and spec.text not in _TEXT_SPECS:
        return None
    if spec.text == "MIME" and not spec.part:
        return None
    if spec.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT") and not spec.fields:
        return None
    node = resolve_part(root, spec.part) if spec.part else root
    if node is None:
        return b""
    if spec.text is None:
        return raw[node.start : node.end] if not spec.part else raw[node.body_start : node.end]
    if spec.text == "MIME":
        return raw[node.start : node.body_start]
    if spec.part:
        if not node.is_message or node.message is None:
            return b""
        node = node.message
    if spec.text == "HEADER":
        return raw[node.start : node.body_start]
    if spec.text == "TEXT":
        return raw[node.body_start : node.end]
    return _header_fields(raw, node, spec.fields, keep=spec.text == "HEADER.FIELDS")


def partial(data: bytes, origin: int, count: int) -> bytes:
    """``<origin.count>`` (RFC 3501 §6.4.5): an origin past the end gives ``b""``."""
    if origin < 0 or count < 0:
        return b""
    return data[origin : origin + count]


def _decode_base64(body: bytes) -> bytes:
    """RFC 2045 §6.8: characters outside the alphabet are ignored; a final
    incomplete quantum is dropped rather than failing the FETCH."""
    alphabet = bytes(
        c for c in body if (65 <= c <= 90) or (97 <= c <= 122) or (48 <= c <= 57) or c in b"+/="
    )
    data = alphabet.split(b"=", 1)[0]
    usable = len(data) - (len(data) % 4 == 1)
    data = data[:usable]
    data += b"=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        return b""


def _decode(body: bytes, encoding: bytes) -> bytes | None:
    encoding = encoding.lower()
    if encoding in (b"", b"7bit", b"8bit", b"binary"):
        return body
    if encoding == b"base64":
        return _decode_base64(body)
    if encoding == b"quoted-printable":  # RFC 2045 §6.7
        return binascii.a2b_qp(body)
    return None


def binary(raw: bytes, root: Part, part_numbers: tuple[int, ...]) -> bytes | None:
    """BINARY[part] (RFC 3516 §4.2, RFC 9051 §6.4.5): the part's body with its
    Content-Transfer-Encoding removed. None when that encoding is unknown (the
    server answers NO [UNKNOWN-CTE]); ``b""`` for a part that does not exist;
    ``BINARY[]`` is the whole message as stored."""
    if not part_numbers:
        return raw[root.start : root.end]
    if any(number < 1 for number in part_numbers):
        return b""
    node = resolve_part(root, part_numbers)
    if node is None:
        return b""
    value = header_value(node, "Content-Transfer-Encoding")
    encoding = content_params(value)[0] if value else b""
    return _decode(raw[node.body_start : node.end], encoding)


def body_text(raw: bytes, part: Part) -> str:
    """The body of a leaf part as text, for SEARCH BODY and TEXT (RFC 9051 §6.4.4):
    transfer encoding removed (an unknown one leaves the bytes as stored), then
    decoded from the part's charset (UTF-8 when absent or unknown; undecodable
    bytes become U+FFFD)."""
    value = header_value(part, "Content-Transfer-Encoding")
    encoding = content_params(value)[0] if value else b""
    body = raw[part.body_start : part.end]
    data = _decode(body, encoding)
    if data is None:
        data = body
    charset = dict(part.params).get("charset", "utf-8") or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def binary_size(raw: bytes, root: Part, part_numbers: tuple[int, ...]) -> int | None:
    """BINARY.SIZE[part] (RFC 3516 §4.3): the decoded size, None for an unknown encoding."""
    data = binary(raw, root, part_numbers)
    return None if data is None else len(data)


def rfc822_size(raw: bytes) -> int:
    """RFC822.SIZE (RFC 3501 §7.4.2): the message size in octets as stored."""
    return len(raw)


# -- wire form ---------------------------------------------------------------------
# ``envelope`` and ``bodystructure`` return plain nested lists (easy to inspect and
# test); these two functions mark where the grammar juxtaposes list members.

_ADDRESS_FIELDS = range(2, 8)  # from, sender, reply-to, to, cc, bcc


def wire_envelope(value: list[ImapValue]) -> list[ImapValue]:
    """ENVELOPE as written: each address list's members juxtaposed."""
    out = list(value)
    for index in _ADDRESS_FIELDS:
        addresses = out[index] if index < len(out) else None
        if isinstance(addresses, list):
            out[index] = [Run(tuple(addresses))]
    return out


def wire_body(value: list[ImapValue]) -> list[ImapValue]:
    """BODY/BODYSTRUCTURE as written: a multipart's parts juxtaposed, recursively,
    and the envelope and body of a message/rfc822 part in wire form too."""
    if value and isinstance(value[0], list):
        count = 0
        while count < len(value) and isinstance(value[count], list):
            count += 1
        children = tuple(wire_body(child) for child in value[:count])  # type: ignore[arg-type]
        return [Run(children), *value[count:]]
    out = list(value)
    kind = [item.lower() if isinstance(item, str) else "" for item in out[:2]]
    if kind == ["message", "rfc822"] or kind == ["message", "global"]:
        if len(out) > 8 and isinstance(out[7], list) and isinstance(out[8], list):
            out[7] = wire_envelope(out[7])
            out[8] = wire_body(out[8])
    return out
