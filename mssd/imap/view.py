"""What one session knows of its selected folder: the sequence-number to UID
map, flags and mod-sequences, and how to bring it up to date (pure, no I/O).

RFC 9051 §2.3.1.2: sequence numbers are per session and only change when this
session is told (EXISTS, EXPUNGE). The view therefore changes only through
:meth:`SelectedView.apply`, whose result is the list of untagged responses the
session must send, in order, before any further sequence number is used.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator, MutableSequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from mssd.store.mailstore import FolderInfo, FolderSnapshot, MessageRow

T = TypeVar("T")


@dataclass(frozen=True)
class ViewUpdate:
    """What changed, for the untagged responses: expunged sequence numbers in
    the order to announce them, the new EXISTS count if it grew, and the
    sequence numbers whose flags changed."""

    expunged: tuple[int, ...] = ()
    expunged_uids: tuple[int, ...] = ()
    """The same messages by UID, for ``* VANISHED`` (RFC 7162 §3.2.10)."""
    exists: int | None = None
    flags: tuple[int, ...] = ()


_FLAG_SETS: dict[frozenset[str], frozenset[str]] = {}
"""One frozenset object per distinct set of flags, shared by every view."""


def shared_flags(flags: frozenset[str]) -> frozenset[str]:
    found = _FLAG_SETS.get(flags)
    if found is None:
        if len(_FLAG_SETS) >= 65536:
            _FLAG_SETS.clear()  # only sharing is lost, never a value
        found = _FLAG_SETS[flags] = flags
    return found


class ByUid(Generic[T]):
    """One column of a view (flags or modseqs), read and written by UID like a
    dict, stored as a sequence aligned with the view's UIDs."""

    def __init__(self, uids: array[int], values: MutableSequence[T]) -> None:
        self._uids = uids
        self._values = values

    def _index(self, uid: int) -> int | None:
        index = bisect.bisect_left(self._uids, uid)
        if index < len(self._uids) and self._uids[index] == uid:
            return index
        return None

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self._index(uid) is not None

    def __getitem__(self, uid: int) -> T:
        index = self._index(uid)
        if index is None:
            raise KeyError(uid)
        return self._values[index]

    def get(self, uid: int, default: T) -> T:
        index = self._index(uid)
        return default if index is None else self._values[index]

    def __setitem__(self, uid: int, value: T) -> None:
        index = self._index(uid)
        if index is None:
            raise KeyError(uid)
        self._values[index] = value

    def at(self, seq: int) -> T:
        """By sequence number (1-based), without a search."""
        return self._values[seq - 1]

    def values(self) -> Iterator[T]:
        return iter(self._values)


class SelectedView:
    """The sequence-number map and per-message state of one selected folder.

    Memory: three machine-word arrays aligned by sequence number (UIDs,
    modseqs, and references to shared flag sets), about 24 octets a message.
    """

    def __init__(
        self,
        folder: FolderInfo,
        readonly: bool,
        messages: Iterable[tuple[int, frozenset[str], int]],
        *,
        highestmodseq: int,
        uidnext: int,
        uidvalidity: int,
    ) -> None:
        self.folder = folder
        self.readonly = readonly
        self.uids: array[int] = array("Q")
        self._modseqs: array[int] = array("Q")
        self._flags: list[frozenset[str]] = []
        for uid, flags, modseq in messages:
            self.uids.append(uid)
            self._flags.append(shared_flags(flags))
            self._modseqs.append(modseq)
        self.flags: ByUid[frozenset[str]] = ByUid(self.uids, self._flags)
        self.modseqs: ByUid[int] = ByUid(self.uids, self._modseqs)
        self.highestmodseq = highestmodseq
        self.uidnext = uidnext
        self.uidvalidity = uidvalidity
        self.condstore = False
        self.saved: list[int] = []
        """The SEARCHRES ``$`` set (RFC 5182), as UIDs."""
        self.expunges_withheld = False
        """The last :meth:`apply` kept expunged messages it was not allowed to announce."""

    @classmethod
    def from_snapshot(
        cls, folder: FolderInfo, snapshot: FolderSnapshot, *, readonly: bool
    ) -> SelectedView:
        return cls(
            folder,
            readonly,
            snapshot.messages,
            highestmodseq=snapshot.highestmodseq,
            uidnext=snapshot.uidnext,
            uidvalidity=snapshot.uidvalidity,
        )

    @property
    def exists(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: int) -> int | None:
        index = bisect.bisect_left(self.uids, uid)
        if index < len(self.uids) and self.uids[index] == uid:
            return index + 1
        return None

    def uid_at(self, seq: int) -> int:
        return self.uids[seq - 1]

    def set_state(self, uid: int, flags: frozenset[str], modseq: int) -> None:
        """New flags and modseq of a message in the view (KeyError if it is not)."""
        self.flags[uid] = shared_flags(flags)
        self.modseqs[uid] = modseq

    def apply(
        self,
        changed: list[MessageRow],
        vanished: list[int],
        highestmodseq: int,
        *,
        allow_expunge: bool,
    ) -> ViewUpdate:
        """Fold changes read from the store into the view.

        Expunges are applied only when ``allow_expunge`` (RFC 9051 §7.5.1: not
        during FETCH, STORE or SEARCH); otherwise the expunged messages stay in
        the view until a later call allows it, and a fetch of them answers with
        what is known.
        """
        expunged: list[int] = []
        expunged_uids: list[int] = []
        if allow_expunge:
            # Announced from the highest sequence number down, so each number is
            # valid at the moment it is sent.
            for uid in sorted(set(vanished), reverse=True):
                seq = self.seq_of(uid)
                if seq is None:
                    continue
                expunged.append(seq)
                expunged_uids.append(uid)
                del self.uids[seq - 1]
                del self._flags[seq - 1]
                del self._modseqs[seq - 1]
        before = len(self.uids)
        flag_changes: list[int] = []
        for row in sorted(changed, key=lambda r: r.uid):
            seq = self.seq_of(row.uid)
            if seq is not None:
                if self._flags[seq - 1] != row.flags or self._modseqs[seq - 1] != row.modseq:
                    self._flags[seq - 1] = shared_flags(row.flags)
                    self._modseqs[seq - 1] = row.modseq
                    flag_changes.append(seq)
            elif not self.uids or row.uid > self.uids[-1]:
                # New UIDs are always above every UID already in the folder.
                self.uids.append(row.uid)
                self._flags.append(shared_flags(row.flags))
                self._modseqs.append(row.modseq)
        if allow_expunge or not vanished:
            self.highestmodseq = max(self.highestmodseq, highestmodseq)
        self.expunges_withheld = bool(vanished) and not allow_expunge
        if self.uids:
            self.uidnext = max(self.uidnext, self.uids[-1] + 1)
        return ViewUpdate(
            expunged=tuple(expunged),
            expunged_uids=tuple(sorted(expunged_uids)),
            exists=len(self.uids) if len(self.uids) != before or expunged else None,
            flags=tuple(flag_changes),
        )
