"""Token level of the IMAP command grammar: character classes and parser primitives.

This module owns the lexical part of RFC 9051 §9 (atom, astring, quoted, literal, number,
sequence-set, flag, date, date-time) and `Scanner`, the base of the recursive-descent
parser (`mssd.imap.grammar.Parser`): a cursor over one command's lines and the literals
between them. Malformed input raises `ParseError`, which the reader
(`mssd.imap.protocol.CommandReader`) turns into a `ProtocolError`. It never does I/O.

Invariants a newcomer would otherwise break:

- Scanning is linear in the input: no backtracking regular expressions, bounded digit runs.
- 8-bit text is accepted only inside literals, or in quoted strings once the session
  enabled UTF8=ACCEPT / IMAP4rev2 (RFC 6855 §3, RFC 9051 §4.3).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import Literal, NoReturn, TypeVar

from mssd.imap.commands import SequenceSet
from mssd.imap.names import decode_mailbox_name, normalise_inbox

# --------------------------------------------------------------------------------------
# Character classes (RFC 9051 §9: atom-specials, list-wildcards, quoted-specials,
# resp-specials). CHAR is 7-bit; CTL is %x00-1F / %x7F.

_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x20)) | {0x7F}
_ATOM_CHARS = bytes(c for c in range(0x01, 0x80) if c not in _ATOM_SPECIALS)


def _char_class(chars: bytes) -> bytes:
    return b"[" + b"".join(re.escape(bytes([c])) for c in chars) + b"]"


ATOM_RE = re.compile(_char_class(_ATOM_CHARS) + b"+")
_ASTRING_RE = re.compile(_char_class(_ATOM_CHARS + b"]") + b"+")
# tag = 1*<any ASTRING-CHAR except "+">
TAG_RE = re.compile(_char_class(bytes(c for c in _ATOM_CHARS + b"]" if c != ord("+"))) + b"+")
# list-char = ATOM-CHAR / list-wildcards / resp-specials
_LIST_CHAR_RE = re.compile(_char_class(_ATOM_CHARS + b"%*]") + b"+")
# quoted = DQUOTE *QUOTED-CHAR DQUOTE, QUOTED-CHAR = <any TEXT-CHAR except quoted-specials>
# / "\" quoted-specials (/ UTF8-2..4 with RFC 6855). Unrolled loop: linear, no backtracking.
_QUOTED_RE = re.compile(rb'"([^"\\\r\n\x00]*(?:\\["\\][^"\\\r\n\x00]*)*)"')
_UNESCAPE_RE = re.compile(rb'\\(["\\])')
_DIGITS_RE = re.compile(rb"[0-9]+")
_SEQ_RE = re.compile(rb"(?:[0-9]+|\*)(?::(?:[0-9]+|\*))?(?:,(?:[0-9]+|\*)(?::(?:[0-9]+|\*))?)*")
_DATE_RE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
# date-time = DQUOTE date-day-fixed "-" date-month "-" date-year SP time SP zone DQUOTE
_DATE_TIME_RE = re.compile(
    rb'"( [0-9]|[0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) '
    rb'([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"'
)

_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        (
            b"JAN",
            b"FEB",
            b"MAR",
            b"APR",
            b"MAY",
            b"JUN",
            b"JUL",
            b"AUG",
            b"SEP",
            b"OCT",
            b"NOV",
            b"DEC",
        )
    )
}

_MAX_NUMBER = 2**32 - 1  # number (RFC 9051 §9)
MAX_NUMBER64 = 2**63 - 1  # number64 (RFC 9051 §9), mod-sequence-value (RFC 7162 §7)

_T = TypeVar("_T")


class ParseError(Exception):
    def __init__(self, message: str, code: str | None = None, status: str = "BAD") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status: Literal["BAD", "NO"] = "NO" if status == "NO" else "BAD"


_SYSTEM_FLAGS = {
    f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")
}


class Scanner:
    """Token primitives of the recursive-descent parser over one command: its lines and the
    literals between them."""

    def __init__(self, lines: list[bytes], literals: list[tuple[bytes, bool]], utf8: bool) -> None:
        self._lines = lines
        self._literals = literals
        self._index = 0
        self._line = lines[0]
        self._pos = 0
        self.utf8 = utf8
        self.charset = "utf-8"
        self.tag: str | None = None
        self._depth = 0

    # -- primitives ------------------------------------------------------------------

    @staticmethod
    def fail(message: str) -> NoReturn:
        raise ParseError(message)

    def peek(self) -> int:
        return self._line[self._pos] if self._pos < len(self._line) else -1

    def done(self) -> bool:
        return self._pos == len(self._line) and self._index == len(self._lines) - 1

    def accept(self, token: bytes) -> bool:
        if self._line.startswith(token, self._pos):
            self._pos += len(token)
            return True
        return False

    def accept_word(self, word: bytes) -> bool:
        """Case-insensitively accept `word` when followed by SP, ")" or the end."""
        end = self._pos + len(word)
        if self._line[self._pos : end].upper() == word and (
            end == len(self._line) or self._line[end] in b" )"
        ):
            self._pos = end
            return True
        return False

    def expect(self, token: bytes, what: str) -> None:
        if not self.accept(token):
            self.fail(f"expected {what}")

    def sp(self) -> None:
        self.expect(b" ", "a space")

    def regex(self, pattern: re.Pattern[bytes], what: str) -> bytes:
        m = pattern.match(self._line, self._pos)
        if m is None:
            self.fail(f"expected {what}")
        self._pos = m.end()
        return m.group(0)

    def atom(self) -> bytes:
        return self.regex(ATOM_RE, "an atom")

    def keyword(self) -> str:
        return self.atom().decode("ascii").upper()

    def number(self, limit: int = _MAX_NUMBER, nonzero: bool = False) -> int:
        digits = self.regex(_DIGITS_RE, "a number")
        if len(digits) > 20 or int(digits) > limit or (nonzero and int(digits) == 0):
            self.fail("number out of range")
        return int(digits)

    def open_list(self) -> None:
        self.expect(b"(", '"("')

    def list_items(self, item: Callable[[], None], allow_empty: bool = True) -> None:
        """Parse `"(" [item *(SP item)] ")"`, calling `item` for each element."""
        self.open_list()
        if self.accept(b")"):
            if not allow_empty:
                self.fail("empty list")
            return
        item()
        while not self.accept(b")"):
            self.sp()
            item()

    def literal(self, allow_binary: bool = False) -> tuple[bytes, bool]:
        binary = self.accept(b"~")
        self.expect(b"{", "a literal")
        # The reader only frames a literal whose marker ends the line (RFC 9051 §4.3).
        end = self._line.find(b"}", self._pos)
        if end != len(self._line) - 1 or self._index >= len(self._literals):
            self.fail("literal must end the line")
        if binary and not allow_binary:
            self.fail("literal8 not allowed here")
        data, _ = self._literals[self._index]
        self._index += 1
        self._line = self._lines[self._index]
        self._pos = 0
        return data, binary

    def quoted(self) -> bytes:
        m = _QUOTED_RE.match(self._line, self._pos)
        if m is None:
            self.fail("malformed quoted string")
        self._pos = m.end()
        raw = m.group(1)
        if not raw.isascii() and not self.utf8:
            # RFC 9051 §4.3: 8-bit text goes in literals unless UTF8=ACCEPT (RFC 6855 §3).
            self.fail("8-bit characters in a quoted string")
        return _UNESCAPE_RE.sub(rb"\1", raw) if b"\\" in raw else raw

    def string(self) -> bytes:
        c = self.peek()
        if c == ord('"'):
            return self.quoted()
        if c == ord("{"):
            return self.literal()[0]
        self.fail("expected a string")

    def astring(self) -> bytes:
        c = self.peek()
        if c in (ord('"'), ord("{")):
            return self.string()
        if self._line.startswith(b"~{", self._pos):
            return self.literal()[0]  # reports literal8 where only literal is allowed
        return self.regex(_ASTRING_RE, "an astring")

    def nstring(self) -> bytes | None:
        if self.accept_word(b"NIL"):
            return None
        return self.string()

    def text(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except UnicodeDecodeError:
            self.fail(f"invalid {self.charset} text")

    def mailbox(self) -> str:
        return normalise_inbox(self.mailbox_name(self.astring()))

    def mailbox_name(self, raw: bytes) -> str:
        try:
            return decode_mailbox_name(raw, self.utf8)
        except ValueError as exc:
            self.fail(f"bad mailbox name: {exc}")

    def list_mailbox(self) -> str:
        c = self.peek()
        raw = self.string() if c in (ord('"'), ord("{")) else self.regex(_LIST_CHAR_RE, "a pattern")
        return self.mailbox_name(raw)

    def sequence_set(self) -> SequenceSet:
        if self.accept(b"$"):
            return SequenceSet((), saved=True)  # RFC 5182 §2.1
        text = self.regex(_SEQ_RE, "a sequence set").decode("ascii")

        def value(v: str) -> int | None:
            if v == "*":
                return None
            if len(v) > 10 or not 0 < int(v) <= _MAX_NUMBER:
                self.fail("sequence number out of range")
            return int(v)

        ranges: list[tuple[int | None, int | None]] = []
        for part in text.split(","):
            lo, _, hi = part.partition(":")
            first = value(lo)
            ranges.append((first, value(hi) if hi else first))
        return SequenceSet(tuple(ranges))

    def flag(self) -> str:
        backslash = self.accept(b"\\")
        name = self.atom().decode("ascii")
        if not backslash:
            return name
        flag = "\\" + name
        return _SYSTEM_FLAGS.get(flag.upper(), flag)

    def flag_list(self) -> tuple[str, ...]:
        flags: list[str] = []
        self.list_items(lambda: flags.append(self.flag()))
        return tuple(flags)

    def date(self) -> datetime.date:
        quoted = self.accept(b'"')
        m = self.regex(_DATE_RE, "a date (d-Mon-yyyy)")
        if quoted:
            self.expect(b'"', "a closing quote")
        parsed = _DATE_RE.fullmatch(m)
        assert parsed is not None
        day, month, year = parsed.groups()
        return self._make(lambda: datetime.date(int(year), _month(month), int(day)))

    def date_time(self) -> datetime.datetime:
        m = _DATE_TIME_RE.match(self._line, self._pos)
        if m is None:
            self.fail("expected a date-time")
        self._pos = m.end()
        day, month, year, hh, mm, ss, sign, zh, zm = m.groups()
        if int(zm) > 59:
            self.fail("bad time zone")
        offset = datetime.timedelta(hours=int(zh), minutes=int(zm)) * (-1 if sign == b"-" else 1)
        return self._make(
            lambda: datetime.datetime(
                int(year),
                _month(month),
                int(day),
                int(hh),
                int(mm),
                int(ss),
                tzinfo=datetime.timezone(offset),
            )
        )

    def _make(self, build: Callable[[], _T]) -> _T:
        try:
            return build()
        except (ValueError, KeyError):
            self.fail("invalid date")

    def mod_sequence(self, allow_zero: bool = False) -> int:
        return self.number(MAX_NUMBER64, nonzero=not allow_zero)


def _month(name: bytes) -> int:
    return _MONTHS[name.upper()]
