"""Message header blocks, parsed once and shared by every session.

FETCH of ENVELOPE, RFC822.HEADER and BODY[HEADER], BODY[HEADER.FIELDS (...)]
(what clients ask for to list a folder), SEARCH on header fields, SORT and
THREAD need a message's header block only. It is read from the start of the
blob (the body never leaves the database), parsed, and kept in a cache bounded
in octets, least recently used first out.

Invariants:
- a blob never changes (content addressing, SHA-256): a cached header block
  can never be stale, and it is never shared across different content;
- a :class:`Head` answers exactly what the whole message would for the items
  above: it is the header block up to and including the empty line that ends
  it. A message whose header ends otherwise (no empty line, RFC 5322 §2.1
  broken) is kept whole, so :mod:`mssd.imap.fetchdata` sees the same bytes.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from mssd.mime.structure import Part, header_end, parse
from mssd.store.mailstore import MailStore, MessageRow

HEAD_BYTES = 8192
"""Octets read from the start of a blob; a longer header block reads the whole blob."""
FIELD_LISTS = 4
"""HEADER.FIELDS answers kept per header block (distinct field lists)."""
_OVERHEAD = 400 + FIELD_LISTS * 300
"""Rough octets of Python objects per cached entry, on top of the header bytes
(its HEADER.FIELDS answers included)."""


@dataclass
class Loaded:
    """A message (or its header block) as FETCH and SEARCH use it."""

    raw: bytes
    root: Part
    fields: dict[tuple[str, tuple[str, ...]], bytes] | None = None
    """HEADER.FIELDS answers already made for this message (``Head.fields``)."""


@dataclass(frozen=True)
class Head:
    raw: bytes
    """The header block, empty line included (or the whole message, see above)."""
    root: Part
    """``parse(raw)``: its ``headers`` are the message's."""
    fields: dict[tuple[str, tuple[str, ...]], bytes] = field(default_factory=dict, compare=False)
    """BODY[HEADER.FIELDS (...)] answers by field list, at most :data:`FIELD_LISTS`."""

    @functools.cached_property
    def loaded(self) -> Loaded:
        """The header block as FETCH reads it (made once, not once per FETCH)."""
        return Loaded(self.raw, self.root, self.fields)


def head_of(prefix: bytes, *, whole: bool) -> Head | None:
    """The Head from the first octets of a message, or None when they are not
    enough to know; ``whole`` says ``prefix`` is the entire message."""
    end = header_end(prefix)
    if end is None and not whole:
        return None
    block = prefix if end is None else prefix[:end]
    return Head(block, parse(block))


class HeadCache:
    """Header blocks by blob digest; at most ``max_bytes`` (0: keep none)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Head] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _keep(self, digest: str, head: Head) -> None:
        cost = len(head.raw) + _OVERHEAD
        if cost > self.max_bytes or digest in self._entries:
            return
        self._entries[digest] = head
        self._size += cost
        while self._size > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._size -= len(dropped.raw) + _OVERHEAD

    async def heads(self, store: MailStore, rows: Iterable[MessageRow]) -> dict[str, Head]:
        """The Head of each row's message, by digest: from the cache, else one
        query for the first :data:`HEAD_BYTES` of every missing message, and one
        for the whole of those whose header is longer."""
        found: dict[str, Head] = {}
        missing: dict[str, int] = {}
        for row in rows:
            if row.sha256 in found or row.sha256 in missing:
                continue
            head = self._entries.get(row.sha256)
            if head is None:
                missing[row.sha256] = row.size
            else:
                self._entries.move_to_end(row.sha256)
                found[row.sha256] = head
        if not missing:
            return found
        longer: list[str] = []
        for digest, prefix in (await store.blob_heads(list(missing), HEAD_BYTES)).items():
            head = head_of(prefix, whole=len(prefix) >= missing[digest])
            if head is None:
                longer.append(digest)
            else:
                found[digest] = head
        if longer:
            for digest, raw in (await store.blobs(longer)).items():
                head = head_of(raw, whole=True)
                assert head is not None  # the whole message: always a Head
                found[digest] = head
        for digest in missing:
            if digest in found:
                self._keep(digest, found[digest])
        return found
