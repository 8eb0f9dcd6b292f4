"""What one session knows of its selected folder: the sequence-number to UID
map, flags and mod-sequences, and how to bring it up to date (pure, no I/O).

RFC 9051 §2.3.1.2: sequence numbers are per session and only change when this
session is told (EXISTS, EXPUNGE). The view therefore changes only through
:meth:`SelectedView.apply`, whose result is the list of untagged responses the
session must send, in order, before any further sequence number is used.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from mssd.store.mailstore import FolderInfo, FolderSnapshot, MessageRow


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


@dataclass
class SelectedView:
    folder: FolderInfo
    readonly: bool
    uids: list[int]
    flags: dict[int, frozenset[str]]
    modseqs: dict[int, int]
    highestmodseq: int
    uidnext: int
    uidvalidity: int
    condstore: bool = False
    saved: list[int] = field(default_factory=list)
    """The SEARCHRES ``$`` set (RFC 5182), as UIDs."""
    expunges_withheld: bool = False
    """The last :meth:`apply` kept expunged messages it was not allowed to announce."""

    @classmethod
    def from_snapshot(
        cls, folder: FolderInfo, snapshot: FolderSnapshot, *, readonly: bool
    ) -> SelectedView:
        return cls(
            folder=folder,
            readonly=readonly,
            uids=[uid for uid, _, _ in snapshot.messages],
            flags={uid: flags for uid, flags, _ in snapshot.messages},
            modseqs={uid: modseq for uid, _, modseq in snapshot.messages},
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
                self.flags.pop(uid, None)
                self.modseqs.pop(uid, None)
        before = len(self.uids)
        flag_changes: list[int] = []
        for row in sorted(changed, key=lambda r: r.uid):
            if row.uid in self.flags:
                if self.flags[row.uid] != row.flags or self.modseqs[row.uid] != row.modseq:
                    self.flags[row.uid] = row.flags
                    self.modseqs[row.uid] = row.modseq
                    seq = self.seq_of(row.uid)
                    if seq is not None:
                        flag_changes.append(seq)
            elif not self.uids or row.uid > self.uids[-1]:
                # New UIDs are always above every UID already in the folder.
                self.uids.append(row.uid)
                self.flags[row.uid] = row.flags
                self.modseqs[row.uid] = row.modseq
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
