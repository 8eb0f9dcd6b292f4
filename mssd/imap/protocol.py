"""Sans-I/O IMAP command reader: bytes from the client in, typed commands out.

This module owns the IMAP client-command grammar (RFC 3501 §9, RFC 9051 §9 and the
extensions mssd implements) and the framing of command lines and literals. It never
touches a socket, the event loop, the store or the session state: the asyncio layer
feeds it bytes, gets `Command`, `NeedContinuation` or `ProtocolError` events out, and
decides what to answer. That keeps it exhaustively testable and fuzzable in-process.

Invariants a newcomer would otherwise break:

- Parsing is linear in the input: no backtracking regular expressions, bounded digit
  runs, bounded nesting of search keys. Any input yields an event, never an exception.
- After a `ProtocolError` the reader is usable again: it resynchronises at the next
  CRLF that is not inside a literal (non-synchronizing literals are skipped byte-exact).
- 8-bit text is accepted only inside literals, or in quoted strings once the session
  enabled UTF8=ACCEPT / IMAP4rev2 (RFC 6855 §3, RFC 9051 §4.3) — set `CommandReader.utf8`.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn, TypeVar

from mssd.imap.fetchdata import SectionSpec as SectionSpec

# --------------------------------------------------------------------------------------
# Character classes (RFC 9051 §9: atom-specials, list-wildcards, quoted-specials,
# resp-specials). CHAR is 7-bit; CTL is %x00-1F / %x7F.

_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x20)) | {0x7F}
_ATOM_CHARS = bytes(c for c in range(0x01, 0x80) if c not in _ATOM_SPECIALS)


def _char_class(chars: bytes) -> bytes:
    return b"[" + b"".join(re.escape(bytes([c])) for c in chars) + b"]"


_ATOM_RE = re.compile(_char_class(_ATOM_CHARS) + b"+")
_ASTRING_RE = re.compile(_char_class(_ATOM_CHARS + b"]") + b"+")
# tag = 1*<any ASTRING-CHAR except "+">
_TAG_RE = re.compile(_char_class(bytes(c for c in _ATOM_CHARS + b"]" if c != ord("+"))) + b"+")
# list-char = ATOM-CHAR / list-wildcards / resp-specials
_LIST_CHAR_RE = re.compile(_char_class(_ATOM_CHARS + b"%*]") + b"+")
# quoted = DQUOTE *QUOTED-CHAR DQUOTE, QUOTED-CHAR = <any TEXT-CHAR except quoted-specials>
# / "\" quoted-specials (/ UTF8-2..4 with RFC 6855). Unrolled loop: linear, no backtracking.
_QUOTED_RE = re.compile(rb'"([^"\\\r\n\x00]*(?:\\["\\][^"\\\r\n\x00]*)*)"')
_UNESCAPE_RE = re.compile(rb'\\(["\\])')
_DIGITS_RE = re.compile(rb"[0-9]+")
_FETCH_NAME_RE = re.compile(rb"[A-Za-z0-9.]+")
_SECTION_TEXT_RE = re.compile(rb"[A-Za-z]+(?:\.[A-Za-z]+)*")
_BASE64_RE = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
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
_MAX_NUMBER64 = 2**63 - 1  # number64 (RFC 9051 §9), mod-sequence-value (RFC 7162 §7)
_LITERAL_MINUS_MAX = 4096  # RFC 7888 §5
_MAX_SEARCH_DEPTH = 64

_T = TypeVar("_T")

# --------------------------------------------------------------------------------------
# Mailbox names: modified UTF-7 (RFC 3501 §5.1.3) or UTF-8 (RFC 6855 §3, RFC 9051 §5.1)

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


def _normalise_inbox(name: str) -> str:
    # RFC 9051 §5.1: "INBOX" is case-insensitive; other names are not.
    return "INBOX" if name.upper() == "INBOX" else name


# --------------------------------------------------------------------------------------
# Sequence sets (RFC 9051 §9 sequence-set, RFC 5182 "$")


def _span(lo: int | None, hi: int | None, max_value: int) -> tuple[int, int]:
    a = max_value if lo is None else lo
    b = max_value if hi is None else hi
    if a > b:
        a, b = b, a  # RFC 9051 §9: "4:2" is "2:4"
    return max(a, 1), min(b, max_value)


@dataclass(frozen=True)
class SequenceSet:
    """A sequence-set; `None` stands for "*", `saved` for "$" (RFC 5182 SEARCHRES)."""

    ranges: tuple[tuple[int | None, int | None], ...]
    saved: bool = False

    def resolve(self, max_value: int, saved: Sequence[int] | None = None) -> list[range]:
        """Sorted, merged, non-empty ranges of the numbers in 1..max_value this set names.

        "*" is `max_value` (the message count, or the highest UID in use). For "$",
        `saved` must give the numbers the last SEARCH ... RETURN (SAVE) stored.
        """
        if self.saved:
            if saved is None:
                raise ValueError("no saved search result")
            spans = [(n, n) for n in saved if 1 <= n <= max_value]
        else:
            spans = [_span(lo, hi, max_value) for lo, hi in self.ranges]
        spans = sorted(s for s in spans if s[0] <= s[1])
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return [range(a, b + 1) for a, b in merged]

    def contains(self, n: int, max_value: int, saved: Sequence[int] | None = None) -> bool:
        """Whether `n` is in this set when "*" is `max_value`."""
        if self.saved:
            if saved is None:
                raise ValueError("no saved search result")
            return 1 <= n <= max_value and n in saved
        for lo, hi in self.ranges:
            a, b = _span(lo, hi, max_value)
            if a <= n <= b:
                return True
        return False

    def __str__(self) -> str:
        if self.saved:
            return "$"

        def one(v: int | None) -> str:
            return "*" if v is None else str(v)

        return ",".join(one(lo) if lo == hi else f"{one(lo)}:{one(hi)}" for lo, hi in self.ranges)


# --------------------------------------------------------------------------------------
# Parsed arguments, one dataclass per command family


@dataclass(frozen=True)
class NoArgs:
    """CAPABILITY NOOP LOGOUT STARTTLS CHECK CLOSE UNSELECT IDLE NAMESPACE."""


@dataclass(frozen=True)
class LoginArgs:
    """LOGIN; non-UTF-8 bytes survive as surrogate escapes."""

    userid: str
    password: str


@dataclass(frozen=True)
class AuthenticateArgs:
    """AUTHENTICATE; `initial_response` is None when absent, b"" for "=" (RFC 4959)."""

    mechanism: str
    initial_response: bytes | None


@dataclass(frozen=True)
class EnableArgs:
    capabilities: tuple[str, ...]


@dataclass(frozen=True)
class IdArgs:
    """ID (RFC 2971); `params` is None for NIL."""

    params: tuple[tuple[str, str | None], ...] | None


@dataclass(frozen=True)
class QresyncParams:
    """SELECT ... (QRESYNC (uidvalidity modseq [known-uids [seq-match]])) (RFC 7162 §3.2.5)."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None
    seq_match: tuple[SequenceSet, SequenceSet] | None


@dataclass(frozen=True)
class SelectArgs:
    """SELECT and EXAMINE."""

    mailbox: str
    condstore: bool = False
    qresync: QresyncParams | None = None


@dataclass(frozen=True)
class MailboxArgs:
    """DELETE SUBSCRIBE UNSUBSCRIBE GETACL MYRIGHTS GETQUOTAROOT."""

    mailbox: str


@dataclass(frozen=True)
class CreateArgs:
    """CREATE with optional (USE (\\Special ...)) (RFC 6154 §3)."""

    mailbox: str
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True)
class RenameArgs:
    old: str
    new: str


@dataclass(frozen=True)
class StatusArgs:
    mailbox: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class ListArgs:
    """LIST (with RFC 5258 LIST-EXTENDED) and LSUB.

    `status_items` is set when RETURN (STATUS (...)) was given (RFC 5819).
    """

    reference: str
    patterns: tuple[str, ...]
    select_options: frozenset[str] = frozenset()
    return_options: frozenset[str] = frozenset()
    status_items: tuple[str, ...] | None = None
    extended: bool = False


@dataclass(frozen=True)
class AppendMessage:
    """One message of an APPEND / MULTIAPPEND (RFC 3502); `binary` for literal8 (RFC 3516),
    `utf8` for the RFC 6855 UTF8 (~{n}) form."""

    flags: tuple[str, ...]
    date_time: datetime.datetime | None
    data: bytes
    binary: bool = False
    utf8: bool = False


@dataclass(frozen=True)
class AppendArgs:
    mailbox: str
    messages: tuple[AppendMessage, ...]


@dataclass(frozen=True)
class FetchAttr:
    """One fetch-att. `name` is upper-case (FLAGS, BODY, BINARY, BINARY.SIZE, ...);
    `section` is set for BODY[...] and BINARY*[...]; `partial` is (offset, length)."""

    name: str
    section: SectionSpec | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False


@dataclass(frozen=True)
class FetchArgs:
    """FETCH; macros ALL FAST FULL are expanded (RFC 9051 §6.4.5)."""

    sequence: SequenceSet
    attrs: tuple[FetchAttr, ...]
    changed_since: int | None = None
    vanished: bool = False


@dataclass(frozen=True)
class StoreArgs:
    """STORE; `action` is replace for FLAGS, add for +FLAGS, remove for -FLAGS."""

    sequence: SequenceSet
    action: Literal["replace", "add", "remove"]
    silent: bool
    flags: tuple[str, ...]
    unchanged_since: int | None = None


@dataclass(frozen=True)
class CopyArgs:
    """COPY and MOVE (RFC 6851)."""

    sequence: SequenceSet
    mailbox: str


@dataclass(frozen=True)
class ExpungeArgs:
    """EXPUNGE; `sequence` is the UID set of UID EXPUNGE (RFC 4315 §2.1), else None."""

    sequence: SequenceSet | None = None


# Search keys (RFC 9051 §6.4.4, RFC 3501 §6.4.4, RFC 7162 §3.1.5)


@dataclass(frozen=True)
class SearchAll:
    pass


@dataclass(frozen=True)
class SearchFlag:
    """ANSWERED/UNANSWERED ... KEYWORD/UNKEYWORD: messages with (`present`) or without `flag`."""

    flag: str
    present: bool


@dataclass(frozen=True)
class SearchHeader:
    """BCC CC FROM SUBJECT TO, and HEADER field-name string; `field` upper-case."""

    field: str
    value: str


@dataclass(frozen=True)
class SearchText:
    scope: Literal["BODY", "TEXT"]
    value: str


@dataclass(frozen=True)
class SearchDate:
    """BEFORE ON SINCE (internal date) and SENTBEFORE SENTON SENTSINCE (Date: header)."""

    field: Literal["INTERNAL", "SENT"]
    op: Literal["BEFORE", "ON", "SINCE"]
    date: datetime.date


@dataclass(frozen=True)
class SearchSize:
    op: Literal["LARGER", "SMALLER"]
    size: int


@dataclass(frozen=True)
class SearchSet:
    """A bare sequence set, or UID set."""

    sequence: SequenceSet
    uid: bool


@dataclass(frozen=True)
class SearchModSeq:
    """MODSEQ [entry-name entry-type] value (RFC 7162 §3.1.5)."""

    modseq: int
    entry_name: str | None = None
    entry_type: str | None = None


@dataclass(frozen=True)
class SearchNot:
    key: SearchKey


@dataclass(frozen=True)
class SearchOr:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True)
class SearchAnd:
    keys: tuple[SearchKey, ...]


SearchKey = (
    SearchAll
    | SearchFlag
    | SearchHeader
    | SearchText
    | SearchDate
    | SearchSize
    | SearchSet
    | SearchModSeq
    | SearchNot
    | SearchOr
    | SearchAnd
)


@dataclass(frozen=True)
class SearchArgs:
    """SEARCH; `return_options` is None without RETURN, else the ESEARCH options (RFC 4731,
    RFC 5182 SAVE), with RETURN () meaning ALL."""

    key: SearchKey
    charset: str | None = None
    return_options: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SortCriterion:
    key: str
    reverse: bool = False


@dataclass(frozen=True)
class SortArgs:
    """SORT (RFC 5256 §3)."""

    criteria: tuple[SortCriterion, ...]
    charset: str
    key: SearchKey


@dataclass(frozen=True)
class ThreadArgs:
    """THREAD (RFC 5256 §3)."""

    algorithm: str
    charset: str
    key: SearchKey


@dataclass(frozen=True)
class AclArgs:
    """DELETEACL and LISTRIGHTS mailbox identifier (RFC 4314 §3)."""

    mailbox: str
    identifier: str


@dataclass(frozen=True)
class SetAclArgs:
    """SETACL (RFC 4314 §3.1): `action` from the optional +/- before the rights."""

    mailbox: str
    identifier: str
    action: Literal["replace", "add", "remove"]
    rights: str


@dataclass(frozen=True)
class QuotaRootArgs:
    """GETQUOTA quota-root (RFC 9208 §4.2)."""

    root: str


CommandArgs = (
    NoArgs
    | LoginArgs
    | AuthenticateArgs
    | EnableArgs
    | IdArgs
    | SelectArgs
    | MailboxArgs
    | CreateArgs
    | RenameArgs
    | StatusArgs
    | ListArgs
    | AppendArgs
    | FetchArgs
    | StoreArgs
    | CopyArgs
    | ExpungeArgs
    | SearchArgs
    | SortArgs
    | ThreadArgs
    | AclArgs
    | SetAclArgs
    | QuotaRootArgs
)


# --------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Command:
    """A complete client command. `name` is upper-case and without the UID prefix."""

    tag: str
    name: str
    uid: bool
    args: CommandArgs


@dataclass(frozen=True)
class NeedContinuation:
    """A synchronizing literal was announced (RFC 9051 §4.3): answer "+ ..." to get it,
    or refuse with a tagged NO/BAD and call `CommandReader.abort_literal()`."""

    tag: str
    command: str
    size: int
    binary: bool


@dataclass(frozen=True)
class ProtocolError:
    """Malformed or refused input: answer `<tag or *> <status> [code] message`."""

    tag: str | None
    message: str
    code: str | None = None
    status: Literal["BAD", "NO"] = "BAD"


@dataclass(frozen=True)
class IdleDone:
    """The client ended IDLE with DONE (RFC 2177 §3)."""


@dataclass(frozen=True)
class SaslResponse:
    """A client line during AUTHENTICATE (RFC 9051 §6.2.2): decoded data, or "*"."""

    data: bytes
    cancelled: bool = False


# --------------------------------------------------------------------------------------
# Grammar


class _ParseError(Exception):
    def __init__(self, message: str, code: str | None = None, status: str = "BAD") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status: Literal["BAD", "NO"] = "NO" if status == "NO" else "BAD"


_SYSTEM_FLAGS = {
    f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")
}
_SPECIAL_USE = {
    f.upper(): f
    for f in (
        "\\All",
        "\\Archive",
        "\\Drafts",
        "\\Flagged",
        "\\Junk",
        "\\Sent",
        "\\Trash",
        "\\Important",
    )
}
_STATUS_ITEMS = frozenset(
    {
        "MESSAGES",
        "UIDNEXT",
        "UIDVALIDITY",
        "UNSEEN",
        "DELETED",
        "SIZE",
        "RECENT",
        "HIGHESTMODSEQ",
        "APPENDLIMIT",
    }
)
_CHARSETS = {
    "US-ASCII": "ascii",
    "UTF-8": "utf-8",
    "ISO-8859-1": "latin-1",
    "ISO-8859-15": "iso8859-15",
    "WINDOWS-1252": "cp1252",
}
_SIMPLE_FETCH = frozenset(
    {
        "FLAGS",
        "UID",
        "INTERNALDATE",
        "RFC822.SIZE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.TEXT",
        "ENVELOPE",
        "BODYSTRUCTURE",
        "MODSEQ",
    }
)
_FETCH_MACROS = {
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SECTION_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})
_SORT_KEYS = frozenset(
    {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"}
)
_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "RECENT": ("\\Recent", True),
    "OLD": ("\\Recent", False),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_DATE_KEYS: dict[str, tuple[Literal["INTERNAL", "SENT"], Literal["BEFORE", "ON", "SINCE"]]] = {
    "BEFORE": ("INTERNAL", "BEFORE"),
    "ON": ("INTERNAL", "ON"),
    "SINCE": ("INTERNAL", "SINCE"),
    "SENTBEFORE": ("SENT", "BEFORE"),
    "SENTON": ("SENT", "ON"),
    "SENTSINCE": ("SENT", "SINCE"),
}
_HEADER_KEYS = frozenset({"BCC", "CC", "FROM", "SUBJECT", "TO"})
UID_COMMANDS = frozenset({"COPY", "MOVE", "FETCH", "SEARCH", "STORE", "EXPUNGE", "SORT", "THREAD"})


class _Parser:
    """Recursive-descent parser over one command: its lines and the literals between them."""

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
        raise _ParseError(message)

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
        return self.regex(_ATOM_RE, "an atom")

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
        return _normalise_inbox(self.mailbox_name(self.astring()))

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
        return self.number(_MAX_NUMBER64, nonzero=not allow_zero)

    # -- commands ----------------------------------------------------------------------

    def command(self) -> Command:
        tag = self.regex(_TAG_RE, "a tag").decode("ascii")
        self.tag = tag
        self.sp()
        name = self.keyword()
        uid = False
        if name == "UID":
            self.sp()
            name = self.keyword()
            uid = True
            if name not in UID_COMMANDS:
                self.fail(f"UID {name} is not a command")
        grammar = _GRAMMARS.get(name)
        if grammar is None:
            self.fail("unknown command")
        args = grammar(self, uid)
        if not self.done():
            self.fail(f"unexpected characters after {name} arguments")
        return Command(tag, name, uid, args)

    def no_args(self, uid: bool) -> CommandArgs:
        return NoArgs()

    def login(self, uid: bool) -> CommandArgs:
        self.sp()
        user = self.astring()
        self.sp()
        password = self.astring()
        return LoginArgs(
            user.decode("utf-8", "surrogateescape"), password.decode("utf-8", "surrogateescape")
        )

    def authenticate(self, uid: bool) -> CommandArgs:
        self.sp()
        mechanism = self.keyword()
        initial: bytes | None = None
        if self.accept(b" "):
            # RFC 4959 §3: "=" is an empty initial response.
            initial = b"" if self.accept(b"=") else _b64(self.regex(_BASE64_RE, "base64"))
        return AuthenticateArgs(mechanism, initial)

    def enable(self, uid: bool) -> CommandArgs:
        caps: list[str] = []
        while True:
            self.sp()
            caps.append(self.keyword())
            if self.peek() != ord(" "):
                return EnableArgs(tuple(caps))

    def id(self, uid: bool) -> CommandArgs:
        self.sp()
        if self.accept_word(b"NIL"):
            return IdArgs(None)
        params: list[tuple[str, str | None]] = []

        def pair() -> None:
            key = self.text(self.string())
            self.sp()
            value = self.nstring()
            params.append((key, None if value is None else self.text(value)))

        self.list_items(pair)
        return IdArgs(tuple(params))

    def select(self, uid: bool) -> CommandArgs:
        self.sp()
        mailbox = self.mailbox()
        condstore = False
        qresync: QresyncParams | None = None
        if self.accept(b" "):

            def param() -> None:
                nonlocal condstore, qresync
                name = self.keyword()
                if name == "CONDSTORE":  # RFC 7162 §3.1.8
                    condstore = True
                elif name == "QRESYNC":  # RFC 7162 §3.2.5
                    self.sp()
                    qresync = self.qresync()
                else:
                    self.fail(f"unknown SELECT parameter {name}")

            self.list_items(param, allow_empty=False)
        return SelectArgs(mailbox, condstore, qresync)

    def qresync(self) -> QresyncParams:
        self.open_list()
        uidvalidity = self.number(nonzero=True)
        self.sp()
        modseq = self.mod_sequence()
        known: SequenceSet | None = None
        match: tuple[SequenceSet, SequenceSet] | None = None
        if self.accept(b" ") and self.peek() != ord("("):
            known = self.sequence_set()
            self.accept(b" ")
        if self.accept(b"("):
            seqs = self.sequence_set()
            self.sp()
            match = (seqs, self.sequence_set())
            self.expect(b")", '")"')
        self.expect(b")", '")"')
        return QresyncParams(uidvalidity, modseq, known, match)

    def mailbox_only(self, uid: bool) -> CommandArgs:
        self.sp()
        return MailboxArgs(self.mailbox())

    def create(self, uid: bool) -> CommandArgs:
        self.sp()
        mailbox = self.mailbox()
        uses: list[str] = []
        if self.accept(b" "):

            def use_attr() -> None:
                self.expect(b"\\", "a special-use attribute")
                attr = "\\" + self.atom().decode("ascii")
                uses.append(_SPECIAL_USE.get(attr.upper(), attr))

            def param() -> None:
                if self.keyword() != "USE":  # RFC 6154 §3
                    self.fail("unknown CREATE parameter")
                self.sp()
                self.list_items(use_attr)

            self.list_items(param, allow_empty=False)
        return CreateArgs(mailbox, tuple(uses))

    def rename(self, uid: bool) -> CommandArgs:
        self.sp()
        old = self.mailbox()
        self.sp()
        return RenameArgs(old, self.mailbox())

    def status_items(self) -> tuple[str, ...]:
        items: list[str] = []

        def item() -> None:
            name = self.keyword()
            if name not in _STATUS_ITEMS:
                self.fail(f"unknown STATUS item {name}")
            items.append(name)

        self.list_items(item, allow_empty=False)
        return tuple(items)

    def status(self, uid: bool) -> CommandArgs:
        self.sp()
        mailbox = self.mailbox()
        self.sp()
        return StatusArgs(mailbox, self.status_items())

    def list(self, uid: bool) -> CommandArgs:
        # RFC 5258 §6: list = "LIST" [SP list-select-opts] SP mailbox SP mbox-or-pat
        #                     [SP list-return-opts]
        self.sp()
        select: set[str] = set()
        extended = False
        if self.peek() == ord("("):
            extended = True

            def select_opt() -> None:
                opt = self.keyword()
                if opt not in ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"):
                    self.fail(f"unknown LIST selection option {opt}")
                select.add(opt)

            self.list_items(select_opt)
            self.sp()
            if "RECURSIVEMATCH" in select and select <= {"RECURSIVEMATCH", "REMOTE"}:
                self.fail("RECURSIVEMATCH needs another selection option")  # RFC 5258 §3
        reference = self.mailbox_name(self.astring())
        self.sp()
        patterns: list[str] = []
        if self.peek() == ord("("):
            extended = True
            self.list_items(lambda: patterns.append(self.list_mailbox()), allow_empty=False)
        else:
            patterns.append(self.list_mailbox())
        returns: set[str] = set()
        status: tuple[str, ...] | None = None
        if self.accept(b" "):
            extended = True
            if self.keyword() != "RETURN":
                self.fail("expected RETURN")
            self.sp()

            def return_opt() -> None:
                nonlocal status
                opt = self.keyword()
                if opt == "STATUS":  # RFC 5819 §2
                    self.sp()
                    status = self.status_items()
                elif opt not in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                    self.fail(f"unknown LIST return option {opt}")
                returns.add(opt)

            self.list_items(return_opt)
        return ListArgs(
            reference, tuple(patterns), frozenset(select), frozenset(returns), status, extended
        )

    def lsub(self, uid: bool) -> CommandArgs:
        self.sp()
        reference = self.mailbox_name(self.astring())
        self.sp()
        return ListArgs(reference, (self.list_mailbox(),))

    def append(self, uid: bool) -> CommandArgs:
        # RFC 3502 §6: append = "APPEND" SP mailbox 1*append-message
        self.sp()
        mailbox = self.mailbox()
        messages: list[AppendMessage] = []
        while True:
            self.sp()
            flags: tuple[str, ...] = ()
            when: datetime.datetime | None = None
            if self.peek() == ord("("):
                flags = self.flag_list()
                self.sp()
            if self.peek() == ord('"'):
                when = self.date_time()
                self.sp()
            if self.accept_word(b"UTF8"):
                # RFC 6855 §4: append-data =/ "UTF8" SP "(" literal8 ")"
                self.sp()
                self.open_list()
                data, _ = self.literal(allow_binary=True)
                self.expect(b")", '")"')
                messages.append(AppendMessage(flags, when, data, binary=True, utf8=True))
            else:
                data, binary = self.literal(allow_binary=True)  # RFC 3516 §4.4 literal8
                messages.append(AppendMessage(flags, when, data, binary=binary))
            if self.done():
                return AppendArgs(mailbox, tuple(messages))

    def fetch(self, uid: bool) -> CommandArgs:
        self.sp()
        sequence = self.sequence_set()
        self.sp()
        attrs: list[FetchAttr] = []
        if self.peek() == ord("("):
            self.list_items(lambda: attrs.append(self.fetch_att()), allow_empty=False)
        else:
            start = self._pos
            name = self.regex(_FETCH_NAME_RE, "a fetch item").decode("ascii").upper()
            if name in _FETCH_MACROS and self.peek() in (-1, ord(" ")):
                attrs.extend(FetchAttr(n) for n in _FETCH_MACROS[name])
            else:
                self._pos = start
                attrs.append(self.fetch_att())
        changed_since: int | None = None
        vanished = False
        if self.accept(b" "):

            def modifier() -> None:
                nonlocal changed_since, vanished
                name = self.keyword()
                if name == "CHANGEDSINCE":  # RFC 7162 §3.1.4
                    self.sp()
                    changed_since = self.mod_sequence(allow_zero=True)
                elif name == "VANISHED":  # RFC 7162 §3.2.6
                    vanished = True
                else:
                    self.fail(f"unknown FETCH modifier {name}")

            self.list_items(modifier, allow_empty=False)
            if vanished and (not uid or changed_since is None):
                self.fail("VANISHED needs UID FETCH and CHANGEDSINCE")  # RFC 7162 §3.2.6
        return FetchArgs(sequence, tuple(attrs), changed_since, vanished)

    def fetch_att(self) -> FetchAttr:
        name = self.regex(_FETCH_NAME_RE, "a fetch item").decode("ascii").upper()
        if name in _SIMPLE_FETCH:
            return FetchAttr(name)
        peek = name.endswith(".PEEK")
        base = name.removesuffix(".PEEK")
        if base == "BODY" and not peek and self.peek() != ord("["):
            return FetchAttr("BODY")
        if base in ("BODY", "BINARY", "BINARY.SIZE") and not (peek and base == "BINARY.SIZE"):
            self.expect(b"[", '"["')
            section = self.section() if base == "BODY" else SectionSpec(self.section_part())
            self.expect(b"]", '"]"')
            partial: tuple[int, int] | None = None
            if base != "BINARY.SIZE" and self.accept(b"<"):
                offset = self.number()
                self.expect(b".", '"."')
                partial = (offset, self.number(nonzero=True))
                self.expect(b">", '">"')
            return FetchAttr(base, section, partial, peek)
        self.fail(f"unknown fetch item {name}")

    def section_part(self) -> tuple[int, ...]:
        parts: list[int] = []
        while self.peek() in range(ord("0"), ord("9") + 1):
            parts.append(self.number(nonzero=True))
            nxt = self._line[self._pos + 1 : self._pos + 2]
            if self.peek() == ord(".") and nxt.isdigit():
                self._pos += 1
            else:
                break
        return tuple(parts)

    def section(self) -> SectionSpec:
        # RFC 9051 §9: section-spec = section-msgtext / (section-part ["." section-text])
        part = self.section_part()
        if part:
            if not self.accept(b"."):
                return SectionSpec(part)
        elif self.peek() == ord("]"):
            return SectionSpec()
        text = self.regex(_SECTION_TEXT_RE, "a section").decode("ascii").upper()
        if text not in _SECTION_TEXTS or (text == "MIME" and not part):
            self.fail(f"unknown section {text}")
        fields: list[str] = []
        if text.startswith("HEADER.FIELDS"):
            self.sp()
            self.list_items(
                lambda: fields.append(self.text(self.astring()).upper()), allow_empty=False
            )
        return SectionSpec(part, text, tuple(fields))

    def store(self, uid: bool) -> CommandArgs:
        self.sp()
        sequence = self.sequence_set()
        self.sp()
        unchanged: int | None = None
        if self.peek() == ord("("):

            def modifier() -> None:
                nonlocal unchanged
                if self.keyword() != "UNCHANGEDSINCE":  # RFC 7162 §3.1.3
                    self.fail("unknown STORE modifier")
                self.sp()
                unchanged = self.mod_sequence(allow_zero=True)

            self.list_items(modifier, allow_empty=False)
            self.sp()
        action: Literal["replace", "add", "remove"] = "replace"
        if self.accept(b"+"):
            action = "add"
        elif self.accept(b"-"):
            action = "remove"
        item = self.keyword()
        if item not in ("FLAGS", "FLAGS.SILENT"):
            self.fail("expected FLAGS, +FLAGS or -FLAGS")
        self.sp()
        if self.peek() == ord("("):
            flags = self.flag_list()
        else:
            single = [self.flag()]
            while self.accept(b" "):
                single.append(self.flag())
            flags = tuple(single)
        return StoreArgs(sequence, action, item.endswith(".SILENT"), flags, unchanged)

    def copy(self, uid: bool) -> CommandArgs:
        self.sp()
        sequence = self.sequence_set()
        self.sp()
        return CopyArgs(sequence, self.mailbox())

    def expunge(self, uid: bool) -> CommandArgs:
        if not uid:
            return ExpungeArgs()
        self.sp()
        return ExpungeArgs(self.sequence_set())

    def search(self, uid: bool) -> CommandArgs:
        self.sp()
        returns: tuple[str, ...] | None = None
        if self.accept_word(b"RETURN"):
            # RFC 4731 §3.1, RFC 5182 §2.1
            opts: list[str] = []

            def opt() -> None:
                name = self.keyword()
                if name not in ("MIN", "MAX", "ALL", "COUNT", "SAVE"):
                    self.fail(f"unknown SEARCH return option {name}")
                opts.append(name)

            self.sp()
            self.list_items(opt)
            returns = tuple(opts) or ("ALL",)
            self.sp()
        charset: str | None = None
        if self.accept_word(b"CHARSET"):
            self.sp()
            charset = self.charset_name()
            self.sp()
        return SearchArgs(self.search_keys(), charset, returns)

    def charset_name(self) -> str:
        raw = self.quoted() if self.peek() == ord('"') else self.atom()
        name = raw.decode("ascii", "replace").upper()
        codec = _CHARSETS.get(name)
        if codec is None:
            supported = " ".join(_CHARSETS)
            raise _ParseError("unsupported charset", f"BADCHARSET ({supported})", "NO")
        self.charset = codec
        return name

    def search_keys(self) -> SearchKey:
        keys = [self.search_key()]
        while self.accept(b" "):
            keys.append(self.search_key())
        return keys[0] if len(keys) == 1 else SearchAnd(tuple(keys))

    def search_key(self) -> SearchKey:
        self._depth += 1
        if self._depth > _MAX_SEARCH_DEPTH:
            self.fail("search keys nested too deeply")
        try:
            return self._search_key()
        finally:
            self._depth -= 1

    def _search_key(self) -> SearchKey:
        c = self.peek()
        if c == ord("("):
            keys: list[SearchKey] = []
            self.list_items(lambda: keys.append(self.search_key()), allow_empty=False)
            return keys[0] if len(keys) == 1 else SearchAnd(tuple(keys))
        if c in b"0123456789*$":
            return SearchSet(self.sequence_set(), uid=False)
        key = self.keyword()
        if key == "ALL":
            return SearchAll()
        if key in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[key]
            return SearchFlag(flag, present)
        if key == "NEW":  # RFC 3501 §6.4.4: RECENT UNSEEN
            return SearchAnd((SearchFlag("\\Recent", True), SearchFlag("\\Seen", False)))
        self.sp()
        if key in ("KEYWORD", "UNKEYWORD"):
            return SearchFlag(self.flag(), key == "KEYWORD")
        if key in _HEADER_KEYS:
            return SearchHeader(key, self.text(self.astring()))
        if key == "HEADER":
            name = self.text(self.astring()).upper()
            self.sp()
            return SearchHeader(name, self.text(self.astring()))
        if key in ("BODY", "TEXT"):
            return SearchText("BODY" if key == "BODY" else "TEXT", self.text(self.astring()))
        if key in _DATE_KEYS:
            where, op = _DATE_KEYS[key]
            return SearchDate(where, op, self.date())
        if key in ("LARGER", "SMALLER"):
            return SearchSize(
                "LARGER" if key == "LARGER" else "SMALLER", self.number(_MAX_NUMBER64)
            )
        if key == "UID":
            return SearchSet(self.sequence_set(), uid=True)
        if key == "NOT":
            return SearchNot(self.search_key())
        if key == "OR":
            left = self.search_key()
            self.sp()
            return SearchOr(left, self.search_key())
        if key == "MODSEQ":  # RFC 7162 §3.1.5
            if self.peek() == ord('"'):
                entry = self.text(self.quoted())
                self.sp()
                entry_type = self.keyword().lower()
                if entry_type not in ("priv", "shared", "all"):
                    self.fail("bad MODSEQ entry type")
                self.sp()
                return SearchModSeq(self.mod_sequence(allow_zero=True), entry, entry_type)
            return SearchModSeq(self.mod_sequence(allow_zero=True))
        self.fail(f"unknown search key {key}")

    def sort(self, uid: bool) -> CommandArgs:
        # RFC 5256 §5: sort = ["UID" SP] "SORT" SP sort-criteria SP search-criteria
        self.sp()
        criteria: list[SortCriterion] = []

        def criterion() -> None:
            reverse = self.accept_word(b"REVERSE")
            if reverse:
                self.sp()
            key = self.keyword()
            if key not in _SORT_KEYS:
                self.fail(f"unknown sort key {key}")
            criteria.append(SortCriterion(key, reverse))

        self.list_items(criterion, allow_empty=False)
        self.sp()
        charset = self.charset_name()
        self.sp()
        return SortArgs(tuple(criteria), charset, self.search_keys())

    def thread(self, uid: bool) -> CommandArgs:
        self.sp()
        algorithm = self.keyword()
        if algorithm not in ("REFERENCES", "ORDEREDSUBJECT"):
            self.fail(f"unknown THREAD algorithm {algorithm}")
        self.sp()
        charset = self.charset_name()
        self.sp()
        return ThreadArgs(algorithm, charset, self.search_keys())

    def setacl(self, uid: bool) -> CommandArgs:
        self.sp()
        mailbox = self.mailbox()
        self.sp()
        identifier = self.text(self.astring())
        self.sp()
        rights = self.text(self.astring())
        action: Literal["replace", "add", "remove"] = "replace"
        if rights[:1] in ("+", "-"):  # RFC 4314 §3.1 mod-rights
            action = "add" if rights[0] == "+" else "remove"
            rights = rights[1:]
        return SetAclArgs(mailbox, identifier, action, rights)

    def acl_identifier(self, uid: bool) -> CommandArgs:
        self.sp()
        mailbox = self.mailbox()
        self.sp()
        return AclArgs(mailbox, self.text(self.astring()))

    def getquota(self, uid: bool) -> CommandArgs:
        self.sp()
        return QuotaRootArgs(self.text(self.astring()))


def _month(name: bytes) -> int:
    return _MONTHS[name.upper()]


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise _ParseError("invalid base64") from None


_Grammar = Callable[[_Parser, bool], CommandArgs]
_GRAMMARS: dict[str, _Grammar] = {
    **{
        name: _Parser.no_args
        for name in (
            "CAPABILITY",
            "NOOP",
            "LOGOUT",
            "STARTTLS",
            "CHECK",
            "CLOSE",
            "UNSELECT",
            "IDLE",
            "NAMESPACE",
        )
    },
    "LOGIN": _Parser.login,
    "AUTHENTICATE": _Parser.authenticate,
    "ENABLE": _Parser.enable,
    "ID": _Parser.id,
    "SELECT": _Parser.select,
    "EXAMINE": _Parser.select,
    "CREATE": _Parser.create,
    "DELETE": _Parser.mailbox_only,
    "SUBSCRIBE": _Parser.mailbox_only,
    "UNSUBSCRIBE": _Parser.mailbox_only,
    "RENAME": _Parser.rename,
    "STATUS": _Parser.status,
    "LIST": _Parser.list,
    "LSUB": _Parser.lsub,
    "APPEND": _Parser.append,
    "FETCH": _Parser.fetch,
    "STORE": _Parser.store,
    "COPY": _Parser.copy,
    "MOVE": _Parser.copy,
    "EXPUNGE": _Parser.expunge,
    "SEARCH": _Parser.search,
    "SORT": _Parser.sort,
    "THREAD": _Parser.thread,
    "GETACL": _Parser.mailbox_only,
    "MYRIGHTS": _Parser.mailbox_only,
    "SETACL": _Parser.setacl,
    "DELETEACL": _Parser.acl_identifier,
    "LISTRIGHTS": _Parser.acl_identifier,
    "GETQUOTA": _Parser.getquota,
    "GETQUOTAROOT": _Parser.mailbox_only,
}


# --------------------------------------------------------------------------------------
# Framing: lines and literals


def _literal_marker(line: bytes) -> tuple[int, bool, bool] | None:
    """(size, non-synchronizing, literal8) when `line` ends with {n}, {n+}, ~{n} or ~{n+}."""
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{", max(0, len(line) - 32))
    if start < 0:
        return None
    inner = line[start + 1 : -1]
    nonsync = inner.endswith(b"+")  # RFC 7888 §3
    if nonsync:
        inner = inner[:-1]
    if not inner or not inner.isdigit():
        return None
    size = int(inner) if len(inner) <= 20 else 10**20
    return size, nonsync, line[start - 1 : start] == b"~"


def _head(line: bytes) -> tuple[str | None, str | None]:
    """Tag and command name (UID prefix skipped) of a command's first line, when valid."""
    m = _TAG_RE.match(line)
    if m is None or line[m.end() : m.end() + 1] != b" ":
        return None, None
    tag = m.group(0).decode("ascii")
    n = _ATOM_RE.match(line, m.end() + 1)
    if n is None:
        return tag, None
    name = n.group(0).decode("ascii").upper()
    if name == "UID" and line[n.end() : n.end() + 1] == b" ":
        u = _ATOM_RE.match(line, n.end() + 1)
        return tag, None if u is None else u.group(0).decode("ascii").upper()
    return tag, name


class CommandReader:
    """Feed bytes from the client; get complete commands out. Never does I/O.

    `max_line` bounds each line and the total non-literal text of one command;
    `max_literal` bounds the sum of the literals of one command. With `literal_plus`
    the server advertises LITERAL+ (RFC 7888 §3); without it, LITERAL- (RFC 7888 §5:
    non-synchronizing literals of at most 4096 octets). Set `utf8` once the client
    enabled UTF8=ACCEPT or IMAP4rev2. Lines end with CRLF; a bare LF is tolerated.
    """

    def __init__(
        self,
        *,
        max_line: int = 65536,
        max_literal: int = 64 * 1024 * 1024,
        literal_plus: bool = True,
    ) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self.literal_plus = literal_plus
        self.utf8 = False
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed bytes in _buf
        self._scan = 0  # where the search for the next LF resumes
        self._overlong: bytes | None = None  # head of a line being discarded as too long
        self._overlong_tail = b""
        self._reset()

    def _reset(self) -> None:
        self._lines: list[bytes] = []
        self._literals: list[tuple[bytes, bool]] = []
        self._text_size = 0
        self._literal_size = 0
        self._in_literal = False
        self._literal_binary = False
        self._remaining = 0
        self._chunks: list[bytes] = []
        # Once set, the rest of the command is skipped; `_reported` says whether the
        # error already went out.
        self._error: ProtocolError | None = None
        self._reported = False
        self._tag: str | None = None
        self._name: str | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes received from the client."""
        if self._pos:
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def abort_literal(self) -> None:
        """The server refused the synchronizing literal: the client will not send it, nor
        the rest of the command (RFC 9051 §7.5)."""
        self._reset()

    def next(self) -> Command | NeedContinuation | ProtocolError | None:
        """The next event, or None when more bytes are needed."""
        while True:
            if self._in_literal:
                if not self._read_literal():
                    return None
                continue
            taken = self._take_line()
            if taken is None:
                return None
            event = self._on_line(*taken)
            if event is not None:
                return event

    def next_line(self) -> bytes | ProtocolError | None:
        """Raw mode: the next line without its CRLF (for IDLE and AUTHENTICATE)."""
        taken = self._take_line()
        if taken is None:
            return None
        line, too_long = taken
        if too_long:
            return ProtocolError(None, "line too long")
        return line

    def next_idle_done(self) -> IdleDone | ProtocolError | None:
        """During IDLE: IdleDone for "DONE" (RFC 2177 §3), ProtocolError for anything else."""
        line = self.next_line()
        if isinstance(line, bytes):
            return IdleDone() if line.upper() == b"DONE" else ProtocolError(None, "expected DONE")
        return line

    def next_sasl_response(self) -> SaslResponse | ProtocolError | None:
        """During AUTHENTICATE: a base64 line, or "*" to cancel (RFC 9051 §6.2.2)."""
        line = self.next_line()
        if not isinstance(line, bytes):
            return line
        if line == b"*":
            return SaslResponse(b"", cancelled=True)
        try:
            return SaslResponse(base64.b64decode(line, validate=True))
        except binascii.Error:
            return ProtocolError(None, "invalid base64 in SASL response")

    # -- internals -------------------------------------------------------------------

    def _read_literal(self) -> bool:
        take = min(self._remaining, len(self._buf) - self._pos)
        if take and self._error is None:
            self._chunks.append(bytes(self._buf[self._pos : self._pos + take]))
        self._pos += take
        self._scan = self._pos
        self._remaining -= take
        if self._remaining:
            return False
        self._in_literal = False
        if self._error is None:
            self._literals.append((b"".join(self._chunks), self._literal_binary))
            self._chunks = []
        return True

    def _take_line(self) -> tuple[bytes, bool] | None:
        end = self._buf.find(b"\n", max(self._scan, self._pos))
        if end < 0:
            pending = len(self._buf) - self._pos
            if pending > self.max_line + 1:
                # Keep only what resynchronisation needs: the head (for the tag) and the
                # tail (for a literal announcement); drop the rest now.
                chunk = bytes(self._buf[self._pos :])
                if self._overlong is None:
                    self._overlong = chunk[:1024]
                self._overlong_tail = (self._overlong_tail + chunk)[-32:]
                self._pos = len(self._buf)
            self._scan = len(self._buf)
            return None
        line = bytes(self._buf[self._pos : end])
        self._pos = self._scan = end + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._overlong is not None:
            # NUL cannot be part of a tag: a tag cut short is no tag at all.
            line = self._overlong + b"\x00" + (self._overlong_tail + line)[-32:]
            self._overlong = None
            self._overlong_tail = b""
            return line, True
        return line, len(line) > self.max_line

    def _on_line(
        self, line: bytes, too_long: bool
    ) -> Command | NeedContinuation | ProtocolError | None:
        first = not self._lines and self._error is None
        if first and not line and not too_long:
            return ProtocolError(None, "empty command line")
        if first:
            self._tag, self._name = _head(line)
        tag, name = self._tag, self._name
        self._text_size += len(line)
        if self._error is None and (too_long or self._text_size > self.max_line):
            self._error = ProtocolError(tag, "command line too long")
        marker = _literal_marker(line)
        if self._error is None:
            self._lines.append(line)
            if marker is not None and (tag is None or name is None):
                self._error = ProtocolError(tag, "malformed command")
        if marker is None:
            return self._finish()
        size, nonsync, binary = marker
        if self._error is None:
            too_big = self._literal_size + size > self.max_literal or (
                nonsync and not self.literal_plus and size > _LITERAL_MINUS_MAX
            )
            if too_big:
                self._error = ProtocolError(tag, "literal too big", "TOOBIG")
        if self._error is not None:
            if not nonsync:
                # The client waits for a continuation that will not come: the command
                # ends here.
                return self._finish()
            self._start_literal(size, binary)
            if self._reported:
                return None
            self._reported = True  # answer now; the literal is skipped as it arrives
            return self._error
        self._literal_size += size
        self._start_literal(size, binary)
        if nonsync:
            return None
        assert tag is not None and name is not None
        return NeedContinuation(tag, name, size, binary)

    def _start_literal(self, size: int, binary: bool) -> None:
        self._in_literal = True
        self._remaining = size
        self._literal_binary = binary
        self._chunks = []

    def _finish(self) -> Command | ProtocolError | None:
        error, reported = self._error, self._reported
        lines, literals = self._lines, self._literals
        self._reset()
        if error is not None:
            return None if reported else error
        parser = _Parser(lines, literals, self.utf8)
        try:
            return parser.command()
        except _ParseError as exc:
            return ProtocolError(parser.tag, exc.message, exc.code, exc.status)
