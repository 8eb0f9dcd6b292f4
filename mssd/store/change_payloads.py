"""What a folder change is, and how it is written down to travel between
processes (NOTIFY payloads on PostgreSQL, frames between the processes of one
SQLite file): ``folder_id:modseq:kind:origin[:delta]``, see ``mssd.store.changes``.

Pure values and text, no I/O.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

from mssd.store.delivery import StoredMessage

log = logging.getLogger(__name__)

ChangeKind = Literal["exists", "flags", "expunge", "resync"]
"""``exists``: messages were added; ``flags``: flags changed; ``expunge``: messages
were removed; ``resync``: anything may have changed (folder deleted or renamed,
notifications possibly lost); re-read everything."""

_KINDS: frozenset[str] = frozenset(get_args(ChangeKind))


class FlagRow(Protocol):
    """A message's UID, flags and modseq (``FlagState``, ``MessageRow``)."""

    @property
    def uid(self) -> int: ...
    @property
    def flags(self) -> frozenset[str]: ...
    @property
    def modseq(self) -> int: ...


@dataclass(frozen=True)
class FlagState:
    uid: int
    flags: frozenset[str]
    modseq: int


@dataclass(frozen=True)
class FolderDelta:
    """Exactly what one committed transaction changed in a folder, taking it
    from HIGHESTMODSEQ ``since`` to the change's ``modseq``: the messages it
    added or whose flags it changed (with their whole new flags), and the UIDs
    it expunged. The folder's modseqs are allocated under its lock, so nothing
    else changed the folder between ``since`` and ``modseq``. NOTIFY carries it
    to the other processes when it fits in a payload (:func:`encode_payload`)."""

    since: int
    changed: tuple[FlagState, ...] = ()
    vanished: tuple[int, ...] = ()


@dataclass(frozen=True)
class FolderChange:
    folder_id: int
    modseq: int
    """The folder's HIGHESTMODSEQ after the change (0 when unknown: ``resync``)."""
    kind: ChangeKind
    delta: FolderDelta | None = field(default=None, compare=False, repr=False)
    """What the change was (``FolderDelta``), when the writer said so: always in
    the writer's process, over NOTIFY when it fitted in the payload."""


def changes_from_stored(results: Sequence[StoredMessage]) -> list[FolderChange]:
    """What a group-committed batch of deliveries changed: one ``exists`` per
    INBOX, at the highest modseq the batch gave it. For ``GroupCommitter(on_commit=...)``."""
    added: dict[int, list[FlagState]] = {}
    for stored in results:
        for placement in stored.placements:
            state = FlagState(placement.uid, frozenset(), placement.modseq)
            added.setdefault(placement.folder_id, []).append(state)
    changes = []
    for folder, states in sorted(added.items()):
        # One transaction gave the folder consecutive modseqs (delivery.py).
        states.sort(key=lambda s: s.modseq)
        delta = FolderDelta(states[0].modseq - 1, tuple(states))
        changes.append(FolderChange(folder, states[-1].modseq, "exists", delta))
    return changes


_MAX_PAYLOAD = 7900
"""Octets of a NOTIFY payload at most (PostgreSQL refuses 8000 or more): a
longer delta is left out, and the receivers read the store instead."""


def encode_payload(change: FolderChange, origin: str) -> str:
    """``folder_id:modseq:kind:origin``, then ``:`` and the change's delta as
    JSON ``[since, [[uid, "flags", modseq], ...], [vanished uid, ...]]`` when it
    has one that fits (flags are IMAP atoms: no spaces, RFC 9051 §9 ``flag``)."""
    head = f"{change.folder_id}:{change.modseq}:{change.kind}:{origin}"
    delta = change.delta
    if delta is None:
        return head
    body = json.dumps(
        [
            delta.since,
            [[row.uid, " ".join(sorted(row.flags)), row.modseq] for row in delta.changed],
            list(delta.vanished),
        ],
        separators=(",", ":"),
    )
    payload = f"{head}:{body}"
    return payload if len(payload.encode()) <= _MAX_PAYLOAD else head


def _decode_delta(body: str) -> FolderDelta | None:
    """The delta of a payload; None if it is not exactly the shape written."""
    try:
        since, changed, vanished = json.loads(body)
        rows = tuple(
            FlagState(uid, frozenset(flags.split()), modseq) for uid, flags, modseq in changed
        )
    except (ValueError, TypeError, AttributeError):
        return None
    numbers = [since, *vanished, *(n for row in rows for n in (row.uid, row.modseq))]
    if not all(type(n) is int and n >= 0 for n in numbers):
        return None
    return FolderDelta(since, rows, tuple(vanished))


def decode_payload(payload: str) -> tuple[FolderChange, str | None] | None:
    """The change and its origin, or None for a payload that is not ours. A
    delta that cannot be read leaves the change without one (still a hint)."""
    parts = payload.split(":", 4)
    if len(parts) not in (3, 4, 5) or parts[2] not in _KINDS:
        return None
    try:
        folder_id, modseq = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    kind: ChangeKind = parts[2]  # type: ignore[assignment]
    delta = _decode_delta(parts[4]) if len(parts) == 5 else None
    if len(parts) == 5 and delta is None:
        log.warning("change notification with an unreadable delta: %r", payload[:200])
    origin = parts[3] if len(parts) >= 4 else None
    return FolderChange(folder_id, modseq, kind, delta), origin
