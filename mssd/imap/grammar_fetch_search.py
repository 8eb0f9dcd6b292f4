"""FETCH items and SEARCH, SORT and THREAD criteria of the IMAP command grammar.

`FetchSearchGrammar` extends the `Scanner` primitives with the arguments of the message
queries: fetch-att and section-spec (RFC 9051 §6.4.5, RFC 3516 BINARY), the CHANGEDSINCE
and VANISHED modifiers (RFC 7162), search keys (RFC 9051 §6.4.4, RFC 7162 §3.1.5 MODSEQ),
SEARCH RETURN (RFC 4731, RFC 5182), SORT and THREAD (RFC 5256). `mssd.imap.grammar.Parser`
dispatches to it. It never does I/O.

Invariant: search keys nest at most `_MAX_SEARCH_DEPTH` deep, so that parsing stays bounded.
"""

from __future__ import annotations

import re
from typing import Literal

from mssd.imap.commands import (
    CommandArgs,
    FetchArgs,
    FetchAttr,
    SearchAll,
    SearchAnd,
    SearchArgs,
    SearchDate,
    SearchFlag,
    SearchHeader,
    SearchKey,
    SearchModSeq,
    SearchNot,
    SearchOr,
    SearchSet,
    SearchSize,
    SearchText,
    SortArgs,
    SortCriterion,
    ThreadArgs,
)
from mssd.imap.fetchdata import SectionSpec
from mssd.imap.scanner import MAX_NUMBER64, ParseError, Scanner

_FETCH_NAME_RE = re.compile(rb"[A-Za-z0-9.]+")
_SECTION_TEXT_RE = re.compile(rb"[A-Za-z]+(?:\.[A-Za-z]+)*")

_MAX_SEARCH_DEPTH = 64

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


class FetchSearchGrammar(Scanner):
    """FETCH items and SEARCH, SORT and THREAD criteria, over the `Scanner` primitives."""

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
            raise ParseError("unsupported charset", f"BADCHARSET ({supported})", "NO")
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
        if c == -1:
            self.fail("a search key is missing")
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
            return SearchSize("LARGER" if key == "LARGER" else "SMALLER", self.number(MAX_NUMBER64))
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
