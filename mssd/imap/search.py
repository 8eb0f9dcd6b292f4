"""SEARCH (RFC 9051 §6.4.4, RFC 4731 ESEARCH, RFC 5182 SEARCHRES, RFC 7162 §3.1.5
MODSEQ): which messages of the selected folder a search key matches, and the
SEARCH or ESEARCH response that says so (always ESEARCH in IMAP4rev2).

Keys the session's view answers alone (flags, sets, modseqs) are tested
without a database round trip; the others read the stored rows, then the
header blocks (shared cache, ``heads``) or the whole messages, a batch at a
time. SORT and THREAD (``sort``) choose their messages with :func:`matching`.
Never writes to the store.
"""

from __future__ import annotations

import datetime as dt
import email.header
import email.utils
from collections.abc import Callable
from typing import Literal

from mssd.imap import encode
from mssd.imap.commands import (
    Command,
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
)
from mssd.imap.fetchdata import body_text
from mssd.imap.heads import Head, Loaded
from mssd.imap.messages import load, parsed, resolve, selected
from mssd.imap.session import Session, during_uid_command
from mssd.mime.structure import Part, header_value, unfold
from mssd.store.mailstore import MessageRow


class _Candidate:
    """One message under test, with what :func:`matching` read ahead for it
    (its header block, or its bytes) when the key needs them."""

    def __init__(
        self,
        session: Session,
        row: MessageRow,
        seq: int,
        predicates: dict[int, Predicate],
        content: bytes | Head | None = None,
    ) -> None:
        self.session = session
        self.row = row
        self.seq = seq
        self.predicates = predicates
        """View-only sub-keys compiled once per search (:func:`view_predicate`)."""
        self._content = content
        self._loaded: Loaded | None = None

    async def loaded(self) -> Loaded:
        if self._loaded is None:
            content = self._content
            if isinstance(content, bytes):
                self._loaded = await parsed(content)
            else:
                self._loaded = await load(self.session, self.row)
        return self._loaded

    async def header(self, name: str) -> str | None:
        if isinstance(self._content, Head):
            root = self._content.root
        else:
            root = (await self.loaded()).root
        value = header_value(root, name)
        return None if value is None else _decoded_header(value)

    async def text(self, *, headers: bool) -> str:
        """What BODY (``headers=False``) or TEXT searches (RFC 9051 §6.4.4): the
        text parts with transfer encoding and charset removed, the header fields
        of embedded messages, and for TEXT the message's own header fields, with
        RFC 2047 encoded words decoded."""
        loaded = await self.loaded()
        pieces: list[str] = []

        def walk(part: Part, top: bool) -> None:
            if headers or not top:
                pieces.extend(f"{n}: {_decoded_header(unfold(v))}" for n, v in part.headers)
            if part.is_multipart:
                for child in part.children:
                    walk(child, False)
            elif part.is_message and part.message is not None:
                walk(part.message, False)
            elif part.maintype in ("text", "message"):
                pieces.append(body_text(loaded.raw, part))

        walk(loaded.root, True)
        return "\n".join(pieces)


def _decoded_header(value: bytes) -> str:
    """An unfolded header value as text, RFC 2047 encoded words decoded."""
    text = value.decode("utf-8", "replace")
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


def _on_date(op: str, day: dt.date, target: dt.date) -> bool:
    if op == "BEFORE":
        return day < target
    if op == "ON":
        return day == target
    return day >= target


Predicate = Callable[[int, int, frozenset[str], int], bool]
"""A test on what the session's view holds of a message: uid, sequence number,
flags, modseq."""


def view_predicate(session: Session, key: SearchKey) -> Predicate:
    """A synchronous test for a key the view answers alone (flags, sets, modseqs;
    see :func:`_needs_rows`), with its sequence sets resolved once for the whole
    search rather than once per message."""
    view = selected(session)
    if isinstance(key, SearchAll):
        return lambda uid, seq, flags, modseq: True
    if isinstance(key, SearchFlag):
        if key.flag == "\\Recent":
            # mssd does not track \Recent (RFC 9051 dropped it).
            absent = not key.present
            return lambda uid, seq, flags, modseq: absent
        flag, present = key.flag, key.present
        return lambda uid, seq, flags, modseq: (flag in flags) is present
    if isinstance(key, SearchSet):
        if key.uid:
            uids = frozenset(resolve(session, key.sequence, True))
            return lambda uid, seq, flags, modseq: uid in uids
        saved = [s for s in (view.seq_of(u) for u in view.saved) if s is not None]
        seqs = frozenset(n for r in key.sequence.resolve(view.exists, saved) for n in r)
        return lambda uid, seq, flags, modseq: seq in seqs
    if isinstance(key, SearchModSeq):
        floor = key.modseq
        return lambda uid, seq, flags, modseq: modseq >= floor
    if isinstance(key, SearchNot):
        inner = view_predicate(session, key.key)
        return lambda uid, seq, flags, modseq: not inner(uid, seq, flags, modseq)
    if isinstance(key, SearchOr):
        left, right = view_predicate(session, key.left), view_predicate(session, key.right)
        return lambda uid, seq, flags, modseq: (
            left(uid, seq, flags, modseq) or right(uid, seq, flags, modseq)
        )
    if isinstance(key, SearchAnd):
        tests = [view_predicate(session, k) for k in key.keys]
        return lambda uid, seq, flags, modseq: all(t(uid, seq, flags, modseq) for t in tests)
    raise ValueError(f"search key {key!r} needs more than the view")


async def matches(key: SearchKey, c: _Candidate) -> bool:
    if not _needs_rows(key):
        test = c.predicates.get(id(key))
        if test is None:
            test = c.predicates[id(key)] = view_predicate(c.session, key)
        view = selected(c.session)
        return test(c.row.uid, c.seq, view.flags.at(c.seq), view.modseqs.at(c.seq))
    if isinstance(key, SearchSize):
        return c.row.size > key.size if key.op == "LARGER" else c.row.size < key.size
    if isinstance(key, SearchDate):
        if key.field == "INTERNAL":
            return _on_date(key.op, c.row.internal_date.date(), key.date)
        sent = await c.header("Date")
        if sent is None:
            return False
        try:
            day = email.utils.parsedate_to_datetime(sent).date()
        except (TypeError, ValueError, IndexError):
            return False
        return _on_date(key.op, day, key.date)
    if isinstance(key, SearchHeader):
        value = await c.header(key.field)
        return value is not None and key.value.casefold() in value.casefold()
    if isinstance(key, SearchText):
        text = await c.text(headers=key.scope == "TEXT")
        return key.value.casefold() in text.casefold()
    if isinstance(key, SearchNot):
        return not await matches(key.key, c)
    if isinstance(key, SearchOr):
        return await matches(key.left, c) or await matches(key.right, c)
    if isinstance(key, SearchAnd):
        for sub in key.keys:
            if not await matches(sub, c):
                return False
        return True
    return False


def _subkeys(key: SearchKey) -> tuple[SearchKey, ...]:
    """The keys NOT, OR and a parenthesised list combine; () for the others."""
    if isinstance(key, SearchNot):
        return (key.key,)
    if isinstance(key, SearchOr):
        return (key.left, key.right)
    if isinstance(key, SearchAnd):
        return key.keys
    return ()


def _needs_rows(key: SearchKey) -> bool:
    """Whether a search needs more than the view (size, dates, headers, text)."""
    if isinstance(key, (SearchNot, SearchOr, SearchAnd)):
        return any(_needs_rows(k) for k in _subkeys(key))
    return not isinstance(key, (SearchAll, SearchFlag, SearchSet, SearchModSeq))


def _flags_only(key: SearchKey) -> bool:
    """Whether a search tests nothing but flags (UNSEEN, DELETED, FLAGGED...)."""
    if isinstance(key, (SearchNot, SearchOr, SearchAnd)):
        return all(_flags_only(k) for k in _subkeys(key))
    return isinstance(key, (SearchAll, SearchFlag))


def has_modseq(key: SearchKey) -> bool:
    """Whether a key is or holds a MODSEQ criterion (RFC 7162 §3.1.5); SORT
    asks too (``sort``, RFC 7162 §3.1.9)."""
    return isinstance(key, SearchModSeq) or any(has_modseq(k) for k in _subkeys(key))


def modseq_of_result(session: Session, found: list[int], wanted: set[str] | None) -> int | None:
    """The MODSEQ a search with a MODSEQ criterion ends its answer with; None
    when nothing matched (the MODSEQ comes only with a non-empty result).

    RFC 7162 §3.1.6: the untagged SEARCH response ends with "the highest
    mod-sequence for all messages being returned". RFC 4731 §3.2 (RFC 7162
    §3.1.10) for ESEARCH (``wanted`` is its result options): with only MIN and/or
    MAX, the messages returned are those one or two; with ALL or COUNT, all the
    messages found."""
    if not found:
        return None
    modseqs = selected(session).modseqs
    if wanted and wanted <= {"MIN", "MAX"}:
        ends = ([found[0]] if "MIN" in wanted else []) + ([found[-1]] if "MAX" in wanted else [])
        return max(modseqs[uid] for uid in ends)
    return max(modseqs[uid] for uid in found)


def _tests_recent(key: SearchKey) -> bool:
    """Whether a key is or holds RECENT, NEW or OLD (the \\Recent flag)."""
    if isinstance(key, SearchFlag):
        return key.flag == "\\Recent"
    return any(_tests_recent(k) for k in _subkeys(key))


_SEARCH_HEADS = 500
"""Messages whose header blocks a header SEARCH reads per query."""
_SEARCH_BLOBS = 50
"""Messages whose bytes a BODY or TEXT SEARCH reads per query."""


async def matching(session: Session, key: SearchKey) -> list[tuple[int, MessageRow]]:
    """(sequence number, stored row) of every message of the view ``key`` matches.
    Header blocks or whole messages, when the key needs them, are read a batch
    at a time: one query per batch, memory bounded by the batch."""
    view = selected(session)
    uids = list(view.uids)
    services = session.services
    rows = {r.uid: r for r in await services.mailstore.messages(view.folder.id, uids)}
    needs = _needs_content(key)
    step = _SEARCH_HEADS if needs == "head" else _SEARCH_BLOBS
    predicates: dict[int, Predicate] = {}
    found: list[tuple[int, MessageRow]] = []
    for start in range(0, len(uids), step):
        batch = [
            (seq, rows[uid])
            for seq, uid in enumerate(uids[start : start + step], start=start + 1)
            if uid in rows
        ]
        contents: dict[str, bytes] | dict[str, Head] = {}
        if needs == "head":
            contents = await services.heads.heads(services.mailstore, [r for _, r in batch])
        elif needs == "whole":
            contents = await services.mailstore.blobs(
                [r.sha256 for _, r in batch], octets=sum(r.size for _, r in batch)
            )
        for seq, row in batch:
            candidate = _Candidate(session, row, seq, predicates, contents.get(row.sha256))
            if await matches(key, candidate):
                found.append((seq, row))
    return found


def _needs_content(key: SearchKey) -> Literal["head", "whole"] | None:
    """What of the messages a search key reads: their header blocks, all of
    them (BODY, TEXT), or nothing (the view and the stored rows answer)."""
    if isinstance(key, SearchText):
        return "whole"
    if isinstance(key, SearchHeader) or (isinstance(key, SearchDate) and key.field == "SENT"):
        return "head"
    needs = {_needs_content(k) for k in _subkeys(key)}
    return "whole" if "whole" in needs else "head" if "head" in needs else None


def saved_result(found: list[int], wanted: set[str]) -> list[int]:
    """What SAVE keeps of the UIDs found, ascending (RFC 9051 §6.4.4, RFC 5182):
    only the lowest and/or highest when MIN and/or MAX are the only other
    options, else all of them."""
    if not found or not wanted or not wanted <= {"MIN", "MAX"}:
        return found
    ends = {found[0]} if "MIN" in wanted else set()
    if "MAX" in wanted:
        ends.add(found[-1])
    return sorted(ends)


async def cmd_search(session: Session, command: Command) -> None:
    assert isinstance(command.args, SearchArgs)
    view = selected(session)
    key = command.args.key
    if session.rev2 and _tests_recent(key):
        # RFC 9051 §6.4.4 has no RECENT, NEW or OLD: \Recent is gone (Appendix E).
        await session.tagged(
            command, "BAD", "RECENT, NEW and OLD are not search keys in IMAP4rev2 (RFC 9051)"
        )
        return
    modseq_asked = has_modseq(key)
    if modseq_asked:
        view.condstore = True  # RFC 7162 §3.1: a CONDSTORE enabling command
    found: list[int] = []
    if _needs_rows(key):
        found = [row.uid for _, row in await matching(session, key)]
    elif _flags_only(key):
        test = view_predicate(session, key)
        found = view.uids_where(lambda flags: test(0, 0, flags, 0))
    else:
        # Flags, sets and modseqs are in the view: no database round trip, and
        # one synchronous test per message.
        test = view_predicate(session, key)
        states = zip(view.uids, view.flags.values(), view.modseqs.values(), strict=True)
        found = [
            uid
            for seq, (uid, flags, modseq) in enumerate(states, start=1)
            if test(uid, seq, flags, modseq)
        ]
    numbers = found if command.uid else [s for s in (view.seq_of(u) for u in found) if s]
    options = command.args.return_options
    if options is None and session.rev2:
        options = ("ALL",)  # RFC 9051 §6.4.4: ESEARCH always, as for RETURN (ALL)
    if options is None:
        # One %-format for all the numbers: a search of a large folder may answer
        # thousands, and str() and join per number cost three times as much.
        line = b"* SEARCH" + (b" %d" * len(numbers)) % tuple(numbers)
        modseq = modseq_of_result(session, found, None) if modseq_asked else None
        if modseq is not None:
            line += b" (MODSEQ %d)" % modseq  # RFC 7162 §3.1.6, search-sort-mod-seq (§7)
        await session.send(line + b"\r\n")
    else:
        wanted = set(options) - {"SAVE"} or ({"ALL"} if "SAVE" not in options else set())
        if "SAVE" in options:
            view.saved = saved_result(found, wanted)
        if wanted:
            await session.send(
                encode.esearch(
                    tag=command.tag,
                    uid=command.uid,
                    min=min(numbers) if "MIN" in wanted and numbers else None,
                    max=max(numbers) if "MAX" in wanted and numbers else None,
                    count=len(numbers) if "COUNT" in wanted else None,
                    all=numbers if "ALL" in wanted else None,
                    modseq=modseq_of_result(session, found, wanted) if modseq_asked else None,
                )
            )
    await session.sync(allow_expunge=during_uid_command(command))
    await session.tagged(command, "OK", "SEARCH completed")
