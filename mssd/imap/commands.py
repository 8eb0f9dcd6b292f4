"""The values the IMAP command reader produces: parsed commands and reader events.

This module owns the value types of the sans-I/O reader (`mssd.imap.protocol`): the
sequence-set (RFC 9051 §9, RFC 5182 "$"), one frozen dataclass of arguments per command
family, the search keys, and the events `Command`, `NeedContinuation`, `ProtocolError`,
`IdleDone` and `SaslResponse`. Values only: the grammar (`mssd.imap.grammar`) builds them,
the command handlers read them; nothing here parses or does I/O.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mssd.imap.fetchdata import SectionSpec

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
    """GETQUOTA quota-root (RFC 9208 §4.1.1)."""

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
