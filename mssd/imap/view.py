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
from collections.abc import Callable, Iterable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Generic, TypeVar

from mssd.store.changes import FlagRow
from mssd.store.mailstore import FolderInfo, FolderSnapshot

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

    def __init__(self, view: SelectedView, column: str) -> None:
        self._view = view
        self._column = column

    def _values(self) -> MutableSequence[T]:
        values: MutableSequence[T] = getattr(self._view, self._column)
        return values

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self._view.seq_of(uid) is not None

    def __getitem__(self, uid: int) -> T:
        seq = self._view.seq_of(uid)
        if seq is None:
            raise KeyError(uid)
        return self._values()[seq - 1]

    def get(self, uid: int, default: T) -> T:
        seq = self._view.seq_of(uid)
        return default if seq is None else self._values()[seq - 1]

    def at(self, seq: int) -> T:
        """By sequence number (1-based), without a search."""
        return self._values()[seq - 1]

    def values(self) -> Iterator[T]:
        return iter(self._values())


_MAX_CODES = 256
"""Distinct flag sets a :class:`FlagCodes` numbers (one octet each)."""


class FlagCodes:
    """Each message's flag set as a one-octet number, aligned with the UIDs of a
    state or view, and the set each number stands for: a test on flags is then
    asked once per set and applied to every message at C speed
    (:meth:`where`). Numbers of sets no message has any more stay until
    :meth:`of` numbers afresh."""

    __slots__ = ("_numbers", "codes", "sets")

    def __init__(self, codes: bytearray, sets: list[frozenset[str]]) -> None:
        self.codes = codes
        self.sets = sets
        self._numbers = {flag_set: code for code, flag_set in enumerate(sets)}

    @classmethod
    def of(cls, flags: Sequence[frozenset[str]]) -> FlagCodes | None:
        """Numbered afresh; None past :data:`_MAX_CODES` distinct sets."""
        distinct = list(set(flags))
        if len(distinct) > _MAX_CODES:
            return None
        numbers = {flag_set: code for code, flag_set in enumerate(distinct)}
        return cls(bytearray(map(numbers.__getitem__, flags)), distinct)

    def copy(self) -> FlagCodes:
        return FlagCodes(bytearray(self.codes), list(self.sets))

    def number(self, flag_set: frozenset[str]) -> int:
        """The set's number, a new one if needed (past one octet, reduced
        modulo 256 until the caller sees :attr:`full` and numbers afresh)."""
        code = self._numbers.get(flag_set)
        if code is None:
            code = self._numbers[flag_set] = len(self.sets)
            self.sets.append(flag_set)
        return code % _MAX_CODES

    @property
    def full(self) -> bool:
        return len(self.sets) > _MAX_CODES

    def verdicts(self, test: Callable[[frozenset[str]], bool]) -> bytes:
        """``test`` of each numbered set, one octet (1 or 0) per number."""
        verdicts = bytearray(_MAX_CODES)
        for code, flag_set in enumerate(self.sets):
            verdicts[code] = 1 if test(flag_set) else 0
        return bytes(verdicts)

    def where(self, uids: Sequence[int], test: Callable[[frozenset[str]], bool]) -> list[int]:
        return self.passing(uids, self.verdicts(test))

    def passing(self, uids: Sequence[int], verdicts: bytes) -> list[int]:
        return list(compress(uids, self.codes.translate(verdicts)))

    def distinct(self) -> set[frozenset[str]]:
        """The sets some message has: one ``memchr`` over the codes per number."""
        codes = self.codes
        return {flag_set for code, flag_set in enumerate(self.sets) if bytes((code,)) in codes}


def renumbered(codes: FlagCodes | None, flags: Sequence[frozenset[str]]) -> FlagCodes | None:
    """``codes`` after changes, numbered afresh if they ran past one octet."""
    return FlagCodes.of(flags) if codes is not None and codes.full else codes


def _uids_where(
    uids: Sequence[int], flags: Sequence[frozenset[str]], test: Callable[[frozenset[str]], bool]
) -> list[int]:
    verdict = {flag_set: test(flag_set) for flag_set in set(flags)}
    return list(compress(uids, map(verdict.__getitem__, flags)))


@dataclass(frozen=True, eq=False)
class FolderState:
    """A folder's messages at one HIGHESTMODSEQ, shared by every view of it that
    is up to date (``mssd.imap.index``). Never changed once made: a newer state
    is a new object (its ``codes`` included; None past 256 distinct flag sets)."""

    uids: array[int]
    flags: list[frozenset[str]]
    modseqs: array[int]
    highestmodseq: int
    uidnext: int
    uidvalidity: int
    codes: FlagCodes | None = None
    found: dict[bytes, list[int]] = field(default_factory=dict, repr=False)
    """:meth:`where` answers by verdicts (``FlagCodes.verdicts``), at most
    :data:`_FOUND_KEPT`: the state never changes, so neither do they."""
    carried: Carried | None = field(default=None, repr=False)
    """An earlier state's answers and the UIDs changed since, from which
    :meth:`where` derives this state's (``mssd.imap.index``)."""

    def has(self, uid: int) -> bool:
        index = bisect.bisect_left(self.uids, uid)
        return index < len(self.uids) and self.uids[index] == uid

    def where(self, test: Callable[[frozenset[str]], bool]) -> list[int]:
        """The UIDs whose flags pass ``test``. A folder searched as often as it
        changes (``UID SEARCH UNSEEN`` between flag changes on a shared
        mailbox) would run over every message each time: the answer is kept,
        and the next state's is made from it by looking again only at the
        messages that changed in between."""
        codes = self.codes
        if codes is None:
            return _uids_where(self.uids, self.flags, test)
        verdicts = codes.verdicts(test)
        found = self.found.get(verdicts)
        if found is None:
            found = self._derived(codes, verdicts)
            if found is None:
                found = codes.passing(self.uids, verdicts)
            if len(self.found) >= _FOUND_KEPT:
                self.found.clear()
            self.found[verdicts] = found
        return list(found)

    def _derived(self, codes: FlagCodes, verdicts: bytes) -> list[int] | None:
        """The answer from the earlier state's, when it has one for the same
        verdicts. Its numbering is this state's (``index._advance`` carries
        nothing across a fresh numbering), so a message
        not changed since has the same number, and the same verdict, in both;
        a number added since is a message changed since. Only the changed
        messages are looked up, in both sorted lists."""
        carried = self.carried
        earlier = None if carried is None else carried.found.get(verdicts)
        if carried is None or earlier is None:
            return None
        found = list(earlier)
        uids, numbers = self.uids, codes.codes
        for uid in carried.touched:
            at = bisect.bisect_left(found, uid)
            listed = at < len(found) and found[at] == uid
            index = bisect.bisect_left(uids, uid)
            passes = index < len(uids) and uids[index] == uid and verdicts[numbers[index]]
            if listed and not passes:
                del found[at]
            elif passes and not listed:
                found.insert(at, uid)
        return found

    @classmethod
    def from_snapshot(cls, snapshot: FolderSnapshot) -> FolderState:
        uids: array[int] = array("Q")
        modseqs: array[int] = array("Q")
        flags: list[frozenset[str]] = []
        for uid, message_flags, modseq in snapshot.messages:
            uids.append(uid)
            flags.append(shared_flags(message_flags))
            modseqs.append(modseq)
        return cls(
            uids,
            flags,
            modseqs,
            snapshot.highestmodseq,
            snapshot.uidnext,
            snapshot.uidvalidity,
            FlagCodes.of(flags),
        )


_FOUND_KEPT = 8
"""Answers of :meth:`FolderState.where` kept per state (distinct flag tests)."""
_TOUCHED_KEPT = 128
"""UIDs changed since an earlier state's answers past which a scan of every
message is cheaper than updating them one by one."""


@dataclass(frozen=True)
class Carried:
    """What a state inherits to answer :meth:`FolderState.where` quickly."""

    found: dict[bytes, list[int]]
    touched: frozenset[int]
    """UIDs expunged, added or whose flags changed since ``found``'s state."""


def carry(before: FolderState, touched: Iterable[int]) -> Carried | None:
    """What a state made from ``before`` by changing ``touched`` inherits, its
    flag sets numbered as in ``before`` (a state numbered afresh inherits
    nothing: equal verdicts would not mean the same test): the answers of
    ``before`` or, when it has none yet, what ``before`` inherited."""
    if before.found:
        found, merged = before.found, frozenset(touched)
    elif before.carried is not None:
        found, merged = before.carried.found, before.carried.touched.union(touched)
    else:
        return None
    return None if len(merged) > _TOUCHED_KEPT else Carried(found, merged)


class SelectedView:
    """The sequence-number map and per-message state of one selected folder.

    Memory: while the view is at the folder's current state (every change told
    to the client), it shares that :class:`FolderState` with every other session
    in the same position, so an idle session costs nothing per message. Its own
    changes, or changes it may not announce yet, give it private copies of the
    three arrays (UIDs, modseqs, references to shared flag sets: about 24 octets
    a message) until :meth:`share` finds it current again.
    """

    def __init__(self, folder: FolderInfo, readonly: bool, state: FolderState) -> None:
        self.folder = folder
        self.readonly = readonly
        self._uids = state.uids
        self._flags = state.flags
        self._modseqs = state.modseqs
        self._codes = state.codes
        self._shared: FolderState | None = state
        self.flags: ByUid[frozenset[str]] = ByUid(self, "_flags")
        self.modseqs: ByUid[int] = ByUid(self, "_modseqs")
        self.highestmodseq = state.highestmodseq
        self.uidnext = state.uidnext
        self.uidvalidity = state.uidvalidity
        self.condstore = False
        self.saved: list[int] = []
        """The SEARCHRES ``$`` set (RFC 5182), as UIDs."""
        self.expunges_withheld = False
        """The last :meth:`apply` kept expunged messages it was not allowed to announce."""

    @property
    def uids(self) -> Sequence[int]:
        """Ascending; read-only (the view changes through its methods)."""
        return self._uids

    @property
    def shared(self) -> bool:
        return self._shared is not None

    def _own(self) -> None:
        """Private copies of the arrays before a change (copy on write)."""
        if self._shared is not None:
            self._uids = array("Q", self._uids)
            self._flags = list(self._flags)
            self._modseqs = array("Q", self._modseqs)
            self._codes = None if self._codes is None else self._codes.copy()
            self._shared = None

    def share(self, state: FolderState) -> bool:
        """Adopt ``state`` if the view is exactly it: every change up to its
        HIGHESTMODSEQ applied and told, none withheld. Modseqs make that check
        cheap: a view brought up to date to modseq M holds the folder as it was
        at M (RFC 7162 §3.1: every change takes a new, higher modseq)."""
        if self._shared is state:
            return True
        if (
            self.expunges_withheld
            or self.highestmodseq != state.highestmodseq
            or len(self._uids) != len(state.uids)
            or self.uidvalidity != state.uidvalidity
        ):
            return False
        self._adopt(state)
        return True

    def _adopt(self, state: FolderState) -> None:
        """Share ``state``'s arrays from now on (copy on write, :meth:`_own`)."""
        self._uids, self._flags, self._modseqs = state.uids, state.flags, state.modseqs
        self._codes = state.codes
        self._shared = state
        self.uidnext = max(self.uidnext, state.uidnext)

    @property
    def exists(self) -> int:
        return len(self._uids)

    def seq_of(self, uid: int) -> int | None:
        index = bisect.bisect_left(self._uids, uid)
        if index < len(self._uids) and self._uids[index] == uid:
            return index + 1
        return None

    def uids_where(self, test: Callable[[frozenset[str]], bool]) -> list[int]:
        """The UIDs whose flags pass ``test``, asked once per distinct set of
        flags (a folder holds few), the rest at C speed."""
        if self._shared is not None:
            return self._shared.where(test)
        if self._codes is not None:
            return self._codes.where(self._uids, test)
        return _uids_where(self._uids, self._flags, test)

    def distinct_flags(self) -> set[frozenset[str]]:
        """The flag sets the view's messages have (each once)."""
        return set(self._flags) if self._codes is None else self._codes.distinct()

    def uid_at(self, seq: int) -> int:
        return self._uids[seq - 1]

    def set_state(self, uid: int, flags: frozenset[str], modseq: int) -> None:
        """New flags and modseq of a message in the view (KeyError if it is not)."""
        seq = self.seq_of(uid)
        if seq is None:
            raise KeyError(uid)
        if self._flags[seq - 1] == flags and self._modseqs[seq - 1] == modseq:
            return
        self._own()
        self._flags[seq - 1] = shared_flags(flags)
        self._modseqs[seq - 1] = modseq
        if self._codes is not None:
            self._codes.codes[seq - 1] = self._codes.number(flags)
            self._codes = renumbered(self._codes, self._flags)

    def follow(
        self,
        state: FolderState,
        changed: Sequence[FlagRow],
        vanished: Sequence[int],
        *,
        allow_expunge: bool,
    ) -> ViewUpdate | None:
        """:meth:`apply` for a view that shares a state and catches up with the
        index's newer ``state``, which is that state plus these changes (the
        index answered them from its own history): the view adopts ``state``
        without copying its arrays. None when it cannot (the view holds its own
        arrays, or must keep expunged messages it may not announce yet); then
        the caller applies the changes the ordinary way."""
        old = self._shared
        if (
            old is None
            or self.highestmodseq != old.highestmodseq
            or self.uidvalidity != state.uidvalidity
            or (vanished and not allow_expunge)
        ):
            return None
        # Highest first, each number valid when told: deleting a higher message
        # leaves the lower ones where they were.
        expunged: list[int] = []
        expunged_uids: list[int] = []
        for uid in sorted(set(vanished), reverse=True):
            index = bisect.bisect_left(old.uids, uid)
            if index < len(old.uids) and old.uids[index] == uid:
                expunged.append(index + 1)
                expunged_uids.append(uid)
        kept = len(old.uids) - len(expunged)
        flag_changes: list[int] = []
        for row in sorted(changed, key=lambda r: r.uid):
            index = bisect.bisect_left(state.uids, row.uid)
            if index < kept and state.uids[index] == row.uid:
                flag_changes.append(index + 1)
        self._adopt(state)
        self.highestmodseq = max(self.highestmodseq, state.highestmodseq)
        self.expunges_withheld = False
        grew = len(state.uids) != len(old.uids)
        return ViewUpdate(
            expunged=tuple(expunged),
            expunged_uids=tuple(sorted(expunged_uids)),
            exists=len(state.uids) if grew or expunged else None,
            flags=tuple(flag_changes),
        )

    def catch_up(
        self,
        state: FolderState,
        changed: Sequence[FlagRow],
        vanished: Sequence[int],
        highestmodseq: int,
        *,
        allow_expunge: bool,
    ) -> ViewUpdate:
        """The view brought to ``highestmodseq`` by the changes: by adopting
        the folder index's ``state`` when it is the folder at that modseq and
        :meth:`follow` can (no copy), else by :meth:`apply`."""
        if state.highestmodseq == highestmodseq:
            update = self.follow(state, changed, vanished, allow_expunge=allow_expunge)
            if update is not None:
                return update
        return self.apply(changed, vanished, highestmodseq, allow_expunge=allow_expunge)

    def apply(
        self,
        changed: Sequence[FlagRow],
        vanished: Sequence[int],
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
        if not changed and not vanished:
            self.highestmodseq = max(self.highestmodseq, highestmodseq)
            self.expunges_withheld = False
            return ViewUpdate()
        self._own()
        codes = self._codes
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
                del self._uids[seq - 1]
                del self._flags[seq - 1]
                del self._modseqs[seq - 1]
                if codes is not None:
                    del codes.codes[seq - 1]
        before = len(self._uids)
        flag_changes: list[int] = []
        for row in sorted(changed, key=lambda r: r.uid):
            seq = self.seq_of(row.uid)
            if seq is not None:
                if self._flags[seq - 1] != row.flags or self._modseqs[seq - 1] != row.modseq:
                    self._flags[seq - 1] = shared_flags(row.flags)
                    self._modseqs[seq - 1] = row.modseq
                    if codes is not None:
                        codes.codes[seq - 1] = codes.number(row.flags)
                    flag_changes.append(seq)
            elif not self._uids or row.uid > self._uids[-1]:
                # New UIDs are always above every UID already in the folder.
                self._uids.append(row.uid)
                self._flags.append(shared_flags(row.flags))
                self._modseqs.append(row.modseq)
                if codes is not None:
                    codes.codes.append(codes.number(row.flags))
        self._codes = renumbered(codes, self._flags)
        # Expunges of messages this view never had withhold nothing.
        withheld = not allow_expunge and any(self.seq_of(uid) is not None for uid in vanished)
        if not withheld:
            self.highestmodseq = max(self.highestmodseq, highestmodseq)
        self.expunges_withheld = withheld
        if self._uids:
            self.uidnext = max(self.uidnext, self._uids[-1] + 1)
        return ViewUpdate(
            expunged=tuple(expunged),
            expunged_uids=tuple(sorted(expunged_uids)),
            exists=len(self._uids) if len(self._uids) != before or expunged else None,
            flags=tuple(flag_changes),
        )
