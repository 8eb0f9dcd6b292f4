"""The MIME tree of a stored message, as byte offsets into the message.

This module owns one thing: finding where each part's header and body start and
end (RFC 2045, RFC 2046), with the Content-Type facts IMAP needs (type, subtype,
parameters). Everything else (ENVELOPE, BODYSTRUCTURE, BODY[section]) is built
from these offsets by slicing the original bytes.

It must never:
- raise on any input: stored mail is whatever a peer sent, so malformed MIME
  (missing or stray boundaries, bare LF, no blank line, 8-bit header bytes,
  garbage Content-Type) gives a best-effort tree, not an error;
- decode a body (no base64, no quoted-printable, no charset conversion here);
- use regular expressions on message bytes: boundaries are found with
  ``bytes.find``, so the cost stays linear in the size of the message for a
  bounded nesting depth;
- do I/O.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "Field",
    "Part",
    "content_params",
    "decode_2231",
    "header_value",
    "iter_fields",
    "merge_2231",
    "parse",
    "parse_content_type",
    "section_bytes",
    "unfold",
]

_WSP = b" \t"
# RFC 2045 §5.1 tspecials, plus WSP and CTLs, end a token.
_TSPECIALS = frozenset(b'()<>@,;:\\"/[]?= \t\r\n')


@dataclass(frozen=True)
class Part:
    """One MIME entity: offsets into the message bytes and its content type.

    ``headers`` holds (field name as written, raw value bytes) with the value
    exactly as in the message after the colon, folding kept.
    """

    start: int
    body_start: int
    end: int
    headers: tuple[tuple[str, bytes], ...]
    maintype: str
    subtype: str
    params: tuple[tuple[str, str], ...]
    children: tuple[Part, ...] = ()
    message: Part | None = None

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart"

    @property
    def is_message(self) -> bool:
        """message/rfc822, or message/global (RFC 6532 §3.5), which embed a message."""
        return self.maintype == "message" and self.subtype in ("rfc822", "global")


# --- header fields ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One header field's place in the message: the whole field (``start``..``end``,
    line break included) and its value (after the colon, final line break excluded)."""

    name: str
    start: int
    value_start: int
    value_end: int
    end: int


def _line_end(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    """(end of the line's content, start of the next line) for the line at ``pos``.
    Accepts CRLF and bare LF (RFC 5322 §2.3 says CRLF; stored mail has both)."""
    nl = raw.find(b"\n", pos, end)
    if nl < 0:
        return end, end
    content_end = nl - 1 if nl > pos and raw[nl - 1] == 0x0D else nl
    return content_end, nl + 1


def _field_name(line: bytes) -> str | None:
    """The field name if ``line`` opens a header field (RFC 5322 §2.2: printable
    US-ASCII except colon; obsolete WSP before the colon tolerated, §4.5)."""
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(_WSP)
    if not name or any(c < 33 or c > 126 for c in name):
        return None
    return name.decode("ascii")


def iter_fields(raw: bytes, start: int, end: int) -> Iterator[Field]:
    """The header fields of the header block that begins at ``start``.

    Stops at the empty line, at ``end``, or at the first line that is neither a
    field nor a continuation (which then begins the body, as Python's ``email``
    package also decides)."""
    current: tuple[str, int, int] | None = None  # name, field start, value start
    pos = start
    last_end = start
    while pos < end:
        content_end, next_pos = _line_end(raw, pos, end)
        line = raw[pos:content_end]
        if line[:1] in (b" ", b"\t") and current is not None:
            # RFC 5322 §2.2.3: a line beginning with WSP continues the field.
            last_end = content_end
            pos = next_pos
            continue
        if current is not None:
            yield Field(current[0], current[1], current[2], last_end, pos)
            current = None
        name = _field_name(line) if line else None
        if name is None:
            return
        current = (name, pos, pos + line.find(b":") + 1)
        last_end = content_end
        pos = next_pos
    if current is not None:
        yield Field(current[0], current[1], current[2], last_end, pos)


def _header_end(raw: bytes, start: int, end: int, last_field_end: int) -> int:
    """Where the body starts: after the empty line that ends the header, or at the
    first non-header line, or at ``end`` when there is neither."""
    pos = last_field_end
    if pos >= end:
        return end
    content_end, next_pos = _line_end(raw, pos, end)
    if content_end == pos:  # the empty line (RFC 5322 §2.1) belongs to the header
        return next_pos
    return pos


def header_end(raw: bytes) -> int | None:
    """Where the body starts when ``raw`` (possibly only the beginning of a
    message) holds the whole header block ended by its empty line; None when
    the header may go on past ``raw``, or ends without an empty line (the first
    non-field line then starts the body, and only the whole message tells)."""
    fields = list(iter_fields(raw, 0, len(raw)))
    last = fields[-1].end if fields else 0
    if last >= len(raw):
        return None
    content_end, next_pos = _line_end(raw, last, len(raw))
    if content_end == last and next_pos > last:
        return next_pos
    return None


def unfold(value: bytes) -> bytes:
    """RFC 5322 §2.2.3 unfolding: remove each CRLF (or bare LF) that precedes WSP,
    then trim the surrounding WSP of the whole value."""
    if b"\n" in value:
        value = value.replace(b"\r\n", b"\n").replace(b"\n", b"")
    return value.strip(b" \t\r")


def header_value(part: Part, name: str) -> bytes | None:
    """The first field called ``name`` (case-insensitive, RFC 5322 §1.2.2), unfolded."""
    wanted = name.lower()
    for field_name, value in part.headers:
        if field_name.lower() == wanted:
            return unfold(value)
    return None


# --- Content-Type ----------------------------------------------------------------------------


class _Lexer:
    """RFC 2045 §5.1 tokens over an unfolded field value, comments skipped (RFC 5322 §3.2.2)."""

    def __init__(self, value: bytes) -> None:
        self.value = value
        self.pos = 0

    def skip_cfws(self) -> None:
        value, n = self.value, len(self.value)
        while self.pos < n:
            c = value[self.pos]
            if c in b" \t\r\n":
                self.pos += 1
            elif c == 0x28:  # "(" opens a comment; comments nest
                depth = 0
                while self.pos < n:
                    c = value[self.pos]
                    if c == 0x5C:
                        self.pos += 1
                    elif c == 0x28:
                        depth += 1
                    elif c == 0x29:
                        depth -= 1
                        if depth == 0:
                            self.pos += 1
                            break
                    self.pos += 1
            else:
                return

    def peek(self) -> int | None:
        self.skip_cfws()
        return self.value[self.pos] if self.pos < len(self.value) else None

    def token(self) -> bytes:
        self.skip_cfws()
        start = self.pos
        while self.pos < len(self.value) and self.value[self.pos] not in _TSPECIALS:
            self.pos += 1
        return self.value[start : self.pos]

    def quoted(self) -> bytes:
        """A quoted-string (RFC 5322 §3.2.4) without its quotes and backslashes;
        an unterminated one runs to the end of the value."""
        out = bytearray()
        self.pos += 1
        value, n = self.value, len(self.value)
        while self.pos < n:
            c = value[self.pos]
            self.pos += 1
            if c == 0x22:
                break
            if c == 0x5C and self.pos < n:
                c = value[self.pos]
                self.pos += 1
            if c in b"\r\n":
                continue
            out.append(c)
        return bytes(out)

    def value_or_token(self) -> bytes:
        if self.peek() == 0x22:
            return self.quoted()
        # Tolerate the common unquoted value containing tspecials ("name=a/b.pdf"):
        # take everything up to the next ";" or WSP.
        self.skip_cfws()
        start = self.pos
        while self.pos < len(self.value) and self.value[self.pos] not in b"; \t\r\n":
            self.pos += 1
        return self.value[start : self.pos]


def _params_as_written(lexer: _Lexer) -> list[tuple[bytes, bytes]]:
    """``; name=value`` pairs, names and values as written (quotes removed)."""
    params: list[tuple[bytes, bytes]] = []
    while True:
        c = lexer.peek()
        if c is None:
            return params
        if c != 0x3B:  # ";": skip garbage up to the next one
            nxt = lexer.value.find(b";", lexer.pos)
            if nxt < 0:
                return params
            lexer.pos = nxt
        lexer.pos += 1
        name = lexer.token()
        if lexer.peek() != 0x3D:  # "="
            continue
        lexer.pos += 1
        value = lexer.value_or_token()
        if name:
            params.append((name, value))


def _text(value: bytes) -> str:
    """Header bytes as text: UTF-8 (RFC 6532), else Latin-1 so no byte is lost."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def parse_content_type(value: bytes) -> tuple[str, str, list[tuple[str, str]]] | None:
    """type, subtype and parameters of a Content-Type value, case as written,
    RFC 2231 continuations merged but not decoded (see :func:`merge_2231`).
    None when the value has no ``type/subtype`` (RFC 2045 §5.2: then the default applies)."""
    lexer = _Lexer(value)
    maintype = lexer.token()
    if not maintype or lexer.peek() != 0x2F:  # "/"
        return None
    lexer.pos += 1
    subtype = lexer.token()
    if not subtype:
        return None
    params = merge_2231(_params_as_written(lexer))
    return maintype.decode("ascii", "replace"), subtype.decode("ascii", "replace"), params


def content_params(value: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """For fields like Content-Disposition (RFC 2183): the leading token and the
    parameters, continuations merged, not decoded."""
    lexer = _Lexer(value)
    first = lexer.token()
    return first, merge_2231(_params_as_written(lexer))


def merge_2231(params: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """RFC 2231 §3: join ``name*0``, ``name*1*``... into one ``name`` (or ``name*``
    when the first section is extended, i.e. ``charset'language'%XX``). Values are
    not percent-decoded here, which is how Dovecot reports them in BODYSTRUCTURE."""
    out: list[tuple[str, str]] = []
    sections: dict[str, list[tuple[int, bool, str]]] = {}
    order: list[str] = []
    for raw_name, raw_value in params:
        name = _text(raw_name)
        value = _text(raw_value)
        star = name.find("*")
        if star > 0 and star + 1 < len(name) and name[star + 1 : star + 2].isdigit():
            base = name[:star]
            rest = name[star + 1 :]
            extended = rest.endswith("*")
            digits = rest.rstrip("*")
            if digits.isdigit() and len(digits) < 6:
                key = base.lower()
                if key not in sections:
                    sections[key] = []
                    order.append(base)
                    out.append((base, ""))  # placeholder keeps the field order
                sections[key].append((int(digits), extended, value))
                continue
        out.append((name, value))
    for base in order:
        pieces = sorted(sections[base.lower()], key=lambda item: item[0])
        extended_first = pieces[0][0] == 0 and pieces[0][1]
        joined = "".join(
            value if extended or not extended_first else urllib.parse.quote(value, safe="")
            for _, extended, value in pieces
        )
        index = out.index((base, ""))
        out[index] = (base + "*" if extended_first else base, joined)
    return out


def decode_2231(params: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Parameters with lower-cased names and RFC 2231 §4 ``charset'lang'%XX``
    values decoded to text (unknown charsets fall back to UTF-8, then Latin-1)."""
    decoded: list[tuple[str, str]] = []
    for name, value in params:
        if name.endswith("*"):
            charset, _, rest = value.partition("'")
            _, _, encoded = rest.partition("'")
            data = urllib.parse.unquote_to_bytes(encoded)
            try:
                value = data.decode(charset or "us-ascii")
            except (LookupError, ValueError):  # unknown or unusable charset name
                value = _text(data)
            name = name[:-1]
        decoded.append((name.lower(), value))
    return tuple(decoded)


# --- the tree --------------------------------------------------------------------------------


class _Budget:
    def __init__(self, max_parts: int) -> None:
        self.left = max_parts


def _find_delimiter(raw: bytes, marker: bytes, pos: int, body_start: int, end: int) -> int:
    """The next boundary delimiter line at or after ``pos``: ``--boundary`` at the
    beginning of a line followed by ``--`` or only transport padding (RFC 2046 §5.1.1).
    -1 when there is none."""
    while True:
        found = raw.find(marker, pos, end)
        if found < 0:
            return -1
        at_line_start = found == body_start or raw[found - 1] == 0x0A
        after = found + len(marker)
        if at_line_start:
            if raw[after : after + 2] == b"--":
                return found
            content_end, _ = _line_end(raw, after, end)
            if not raw[after:content_end].strip(b" \t\r"):
                return found
        pos = found + 1


def _split_multipart(raw: bytes, boundary: bytes, start: int, end: int) -> list[tuple[int, int]]:
    """(start, end) of each body part between the delimiters of one multipart body.

    The line break before a delimiter belongs to the delimiter (RFC 2046 §5.1.1).
    A missing close delimiter ends the last part at the end of the body."""
    marker = b"--" + boundary
    ranges: list[tuple[int, int]] = []
    pos = _find_delimiter(raw, marker, start, start, end)
    while pos >= 0:
        after = pos + len(marker)
        if raw[after : after + 2] == b"--":  # close delimiter: the epilogue follows
            return ranges
        _, part_start = _line_end(raw, after, end)
        nxt = _find_delimiter(raw, marker, part_start, start, end)
        if nxt < 0:
            ranges.append((part_start, end))
            return ranges
        part_end = nxt
        if part_end > part_start and raw[part_end - 1] == 0x0A:
            part_end -= 1
            if part_end > part_start and raw[part_end - 1] == 0x0D:
                part_end -= 1
        ranges.append((part_start, part_end))
        pos = nxt
    return ranges


def _parse_part(
    raw: bytes, start: int, end: int, digest: bool, depth: int, budget: _Budget
) -> Part:
    budget.left -= 1
    fields = list(iter_fields(raw, start, end))
    last = fields[-1].end if fields else start
    body_start = _header_end(raw, start, end, last)
    headers = tuple((f.name, raw[f.value_start : f.value_end]) for f in fields)

    content_type = None
    transfer_encoding = b""
    for f in fields:
        lname = f.name.lower()
        if lname == "content-type" and content_type is None:
            content_type = parse_content_type(unfold(raw[f.value_start : f.value_end]))
        elif lname == "content-transfer-encoding" and not transfer_encoding:
            transfer_encoding = unfold(raw[f.value_start : f.value_end]).lower()

    params: tuple[tuple[str, str], ...]
    if content_type is None:
        # RFC 2046 §5.1.5: in a digest the default is message/rfc822;
        # elsewhere RFC 2045 §5.2: text/plain; charset=us-ascii.
        if digest:
            maintype, subtype, params = "message", "rfc822", ()
        else:
            maintype, subtype, params = "text", "plain", (("charset", "us-ascii"),)
        raw_params: list[tuple[str, str]] = []
    else:
        maintype, subtype = content_type[0].lower(), content_type[1].lower()
        raw_params = content_type[2]
        params = decode_2231(raw_params)

    children: tuple[Part, ...] = ()
    message: Part | None = None
    if depth > 0 and budget.left > 0:
        if maintype == "multipart":
            boundary = dict(params).get("boundary", "").encode("utf-8", "replace")
            if boundary:
                found: list[Part] = []
                for part_start, part_end in _split_multipart(raw, boundary, body_start, end):
                    if budget.left <= 0:
                        break
                    found.append(
                        _parse_part(
                            raw, part_start, part_end, subtype == "digest", depth - 1, budget
                        )
                    )
                children = tuple(found)
        elif (
            maintype == "message"
            and subtype in ("rfc822", "global")
            # Offsets into base64 or quoted-printable text would be meaningless:
            # such an embedded message stays opaque (RFC 2046 §5.2.1 forbids it for rfc822).
            and transfer_encoding in (b"", b"7bit", b"8bit", b"binary")
        ):
            message = _parse_part(raw, body_start, end, False, depth - 1, budget)
    return Part(start, body_start, end, headers, maintype, subtype, params, children, message)


def parse(raw: bytes, *, max_depth: int = 64, max_parts: int = 10_000) -> Part:
    """The MIME tree of ``raw``. Never raises; past ``max_depth`` nested entities or
    ``max_parts`` entities in all, the remaining parts are left undivided."""
    return _parse_part(raw, 0, len(raw), False, max_depth, _Budget(max_parts))


# --- sections --------------------------------------------------------------------------------


def section_bytes(raw: bytes, part: Part, spec: str) -> bytes:
    """Slices of one part: ``""`` the whole entity, ``"HEADER"`` its header (empty
    line included), ``"TEXT"`` its body. Unknown specs give the whole entity."""
    upper = spec.upper()
    if upper == "HEADER" or upper == "MIME":
        return raw[part.start : part.body_start]
    if upper == "TEXT":
        return raw[part.body_start : part.end]
    return raw[part.start : part.end]
