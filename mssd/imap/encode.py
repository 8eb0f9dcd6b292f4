"""IMAP response encoder: values and status lines in, wire bytes out (RFC 9051 §7, §9).

This module owns how server responses are written: NIL, numbers, quoted strings versus
literals, parenthesised lists, status responses with response codes, FETCH and ESEARCH
responses. It never does I/O and never decides *what* to answer; command handlers do.
Values come as the `ImapValue` tree of `mssd.imap.fetchdata`.

Invariants: every line it returns ends with CRLF and contains no other CR or LF outside
literals; human-readable text is sanitised so a client-controlled string can never
inject a response line.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Iterable, Sequence

from mssd.imap.fetchdata import Atom as Atom
from mssd.imap.fetchdata import ImapValue as ImapValue
from mssd.imap.fetchdata import Literal8 as Literal8
from mssd.imap.fetchdata import Run as Run

CRLF = b"\r\n"
_MAX_QUOTED = 1024  # longer strings go as literals: cheaper for clients to read
_STATUSES = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})


def _quotable(text: str, utf8: bool) -> bool:
    # RFC 9051 §9: QUOTED-CHAR is any TEXT-CHAR (no CR, LF, NUL), 8-bit only as UTF-8
    # when the client enabled it (RFC 6855 §3).
    if len(text) > _MAX_QUOTED or "\r" in text or "\n" in text or "\0" in text:
        return False
    return utf8 or text.isascii()


def quote(text: str, *, utf8: bool = False) -> str:
    """`text` as a quoted string; ValueError when it can only be sent as a literal."""
    if not _quotable(text, utf8):
        raise ValueError("string cannot be quoted")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_into(out: bytearray, value: ImapValue, utf8: bool) -> None:
    """Append one value's wire form to ``out`` (see :func:`encode`)."""
    if value is None:
        out += b"NIL"
    elif isinstance(value, bool):
        raise TypeError("booleans have no IMAP form")
    elif isinstance(value, int):
        if value < 0:
            raise ValueError("IMAP numbers are unsigned")
        out += b"%d" % value
    elif isinstance(value, str):
        if _quotable(value, utf8):
            out += quote(value, utf8=True).encode("utf-8")
        else:
            data = value.encode("utf-8")
            out += b"{%d}\r\n" % len(data)
            out += data
    elif isinstance(value, bytes):
        out += b"{%d}\r\n" % len(value)
        out += value
    elif isinstance(value, Atom):
        out += value.value.encode("utf-8" if utf8 else "ascii")
    elif isinstance(value, Literal8):
        out += b"~{%d}\r\n" % len(value.data)  # RFC 3516 §4.2
        out += value.data
    elif isinstance(value, Run):
        for item in value.items:
            encode_into(out, item, utf8)
    elif isinstance(value, list):
        out += b"("
        for i, item in enumerate(value):
            if i:
                out += b" "
            encode_into(out, item, utf8)
        out += b")"
    else:
        raise TypeError(f"not an IMAP value: {type(value).__name__}")


def encode(value: ImapValue, *, utf8: bool) -> bytes:
    """One value on the wire: NIL, number, quoted string or literal, atom, list."""
    out = bytearray()
    encode_into(out, value, utf8)
    return bytes(out)


def sanitise(text: str, *, utf8: bool = False) -> str:
    """Human-readable text made safe for a response line: no CTLs, 7-bit unless `utf8`."""
    if text.isascii() and text.isprintable():
        return text.strip()  # the usual case: nothing to replace
    cleaned = "".join(
        " " if ord(c) < 0x20 or ord(c) == 0x7F else c if utf8 or c.isascii() else "?" for c in text
    )
    return cleaned.strip()


def _resp_text(code: str | None, text: str, utf8: bool) -> bytes:
    # RFC 9051 §9: resp-text = ["[" resp-text-code "]" SP] [text]
    parts: list[str] = []
    if code:
        parts.append("[" + sanitise(code).replace("]", "") + "]")
    body = sanitise(text, utf8=utf8)
    if body or not parts:
        parts.append(body or "-")
    return " ".join(parts).encode("utf-8")


def tagged(tag: str, status: str, code: str | None, text: str, *, utf8: bool = False) -> bytes:
    """`a1 OK [READ-WRITE] SELECT completed` (RFC 9051 §7.1)."""
    if status not in ("OK", "NO", "BAD"):
        raise ValueError(f"not a tagged status: {status}")
    return tag.encode("ascii") + b" " + status.encode() + b" " + _resp_text(code, text, utf8) + CRLF


def untagged_status(status: str, code: str | None, text: str, *, utf8: bool = False) -> bytes:
    """`* OK [UIDVALIDITY 3857529045] UIDs valid`, `* BYE ...` (RFC 9051 §7.1)."""
    if status not in _STATUSES:
        raise ValueError(f"not a status: {status}")
    return b"* " + status.encode() + b" " + _resp_text(code, text, utf8) + CRLF


def untagged(*parts: ImapValue, utf8: bool = False) -> bytes:
    """`* ` then each value, space-separated: untagged(23, Atom("EXISTS")) is `* 23 EXISTS`."""
    out = bytearray(b"*")
    for part in parts:
        out += b" "
        encode_into(out, part, utf8)
    return bytes(out + CRLF)


def continuation(payload: str | bytes = "") -> bytes:
    """`+ text`, or `+ base64` for a SASL challenge given as bytes (RFC 9051 §7.6)."""
    if isinstance(payload, bytes):
        return b"+ " + base64.b64encode(payload) + CRLF
    return b"+ " + _resp_text(None, payload or "OK", False) + CRLF


def flag_list(flags: Iterable[str]) -> list[ImapValue]:
    """A flag-list value: (\\Seen $Forwarded)."""
    return [Atom(f) for f in flags]


@functools.lru_cache(maxsize=4096)
def message_flags(flags: frozenset[str]) -> Atom:
    """A message's flags as a flag-list, sorted, made once per distinct set (a
    folder has few): FETCH FLAGS writes it as it is (flags are atoms, RFC 9051 §9)."""
    return Atom("(" + " ".join(sorted(flags)) + ")")


@functools.lru_cache(maxsize=4096)
def message_flags_wire(flags: frozenset[str]) -> bytes:
    """:func:`message_flags` on the wire."""
    return message_flags(flags).value.encode("utf-8")


def fetch_response(
    seq: int, items: Sequence[tuple[str, ImapValue]], *, utf8: bool = False
) -> bytes:
    """`* 12 FETCH (FLAGS (\\Seen) UID 4 ...)` (RFC 9051 §7.5.2); names go out as given."""
    out = bytearray(b"* %d FETCH (" % seq)
    for i, (name, value) in enumerate(items):
        if i:
            out += b" "
        out += name.encode("ascii") + b" "
        encode_into(out, value, utf8)
    return bytes(out + b")" + CRLF)


def compress_uids(uids: Iterable[int]) -> str:
    """A sequence-set for `uids`, runs of consecutive ascending numbers as ranges: 1:3,5.

    Order is kept (COPYUID pairs source and destination sets by position, RFC 4315 §3);
    pass sorted numbers for the canonical form.
    """
    runs: list[list[int]] = []
    for n in uids:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in runs)


def appenduid(uidvalidity: int, uids: Iterable[int]) -> str:
    """Response code `APPENDUID 38505 3955` (RFC 4315 §3; a set for MULTIAPPEND)."""
    return f"APPENDUID {uidvalidity} {compress_uids(uids)}"


def copyuid(uidvalidity: int, source: Iterable[int], dest: Iterable[int]) -> str:
    """Response code `COPYUID 38505 304,319:320 3956:3958` (RFC 4315 §3)."""
    return f"COPYUID {uidvalidity} {compress_uids(source)} {compress_uids(dest)}"


def esearch(
    *,
    tag: str | None,
    uid: bool,
    min: int | None = None,
    max: int | None = None,
    count: int | None = None,
    all: Sequence[int] | None = None,
    modseq: int | None = None,
) -> bytes:
    """`* ESEARCH (TAG "A282") UID MIN 2 COUNT 3` (RFC 4731 §3.1, RFC 7162 §3.1.5).

    MIN, MAX and ALL are left out when None or empty (no match); COUNT 0 is kept.
    """
    out = bytearray(b"* ESEARCH")
    if tag is not None:
        out += b" (TAG " + quote(tag).encode("ascii") + b")"
    if uid:
        out += b" UID"
    if min is not None:
        out += b" MIN %d" % min
    if max is not None:
        out += b" MAX %d" % max
    if count is not None:
        out += b" COUNT %d" % count
    if all:
        out += b" ALL " + compress_uids(sorted(set(all))).encode("ascii")
    if modseq is not None:
        out += b" MODSEQ %d" % modseq
    return bytes(out + CRLF)
