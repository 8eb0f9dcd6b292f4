"""The folders that sessions have selected, kept in memory once per process.

Every session that selects a folder starts from, and while it is up to date
shares, one :class:`~mssd.imap.view.FolderState` per folder: SELECT reads no
rows when the folder is already open elsewhere, a change is read from the
store once for all the sessions on the folder rather than once each, and a
thousand sessions idling on a large folder hold one copy of it.

Invariants:
- the store is the truth: a :class:`FolderIndex` is only a cache of it, made
  from one consistent snapshot and brought forward with
  ``MailStore.changes_since`` (one read, under a lock, shared by every waiting
  session) when the change bus announced a change, when the bus may have
  missed one, or, with several processes, when it was last read more than a
  second ago (``ChangeBus.silence_proves_nothing_changed``); a change written
  by this process carries exactly what it changed (``FolderDelta``), and the
  index applies it without reading, as long as the deltas follow each other
  without a gap from the index's HIGHESTMODSEQ (modseqs are allocated under
  the folder's lock, so a delta starting there is the only change since);
- a state, once made, never changes (sessions hold references to it);
- the changes between recent states are kept (:data:`_HISTORY_ROWS` rows at
  most), so a session catching up is answered from memory; a session further
  behind reads the store, as it would without the index;
- an index nobody uses is dropped after the :data:`_SPARE` most recently
  released ones.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

from mssd.imap.view import FolderState, carry, renumbered, shared_flags
from mssd.store.changes import ChangeBus, FlagRow, FolderChange, Subscription
from mssd.store.mailstore import MailStore

_HISTORY_ROWS = 20_000
"""Changed rows and expunged UIDs kept to answer sessions that are behind."""
_SPARE = 32
"""Indexes kept, with their subscriptions, after their last session left."""


@dataclass(frozen=True)
class _Step:
    """What changed from the state at ``since`` to the state at ``until``."""

    since: int
    until: int
    changed: tuple[FlagRow, ...]
    vanished: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.changed) + len(self.vanished) + 1


def _advance(
    state: FolderState, changed: Sequence[FlagRow], vanished: Sequence[int], highest: int
) -> FolderState:
    """The state after the changes (the store's order: expunges, then flag
    changes, then new messages, whose UIDs are above all others). The arrays
    (and flag codes) are copied whole (memory copies) and only the changed
    positions touched."""
    uids = array("Q", state.uids)
    flags = list(state.flags)
    modseqs = array("Q", state.modseqs)
    codes = None if state.codes is None else state.codes.copy()
    for uid in sorted(set(vanished), reverse=True):
        index = bisect.bisect_left(uids, uid)
        if index < len(uids) and uids[index] == uid:
            del uids[index], flags[index], modseqs[index]
            if codes is not None:
                del codes.codes[index]
    gone = set(vanished)
    for row in sorted(changed, key=lambda r: r.uid):
        if row.uid in gone:
            continue
        index = bisect.bisect_left(uids, row.uid)
        if index < len(uids) and uids[index] == row.uid:
            flags[index] = shared_flags(row.flags)
            modseqs[index] = row.modseq
            if codes is not None:
                codes.codes[index] = codes.number(row.flags)
        elif index == len(uids):
            uids.append(row.uid)
            flags.append(shared_flags(row.flags))
            modseqs.append(row.modseq)
            if codes is not None:
                codes.codes.append(codes.number(row.flags))
    last = uids[-1] if uids else 0
    numbered = renumbered(codes, flags)
    touched = chain(gone, (row.uid for row in changed))
    return FolderState(
        uids,
        flags,
        modseqs,
        max(state.highestmodseq, highest),
        max(state.uidnext, last + 1),
        state.uidvalidity,
        numbered,
        carried=carry(state, touched) if codes is not None and numbered is codes else None,
    )


class FolderIndex:
    """One folder's current state in this process, and how it got there."""

    def __init__(
        self,
        folder_id: int,
        state: FolderState,
        store: MailStore,
        bus: ChangeBus,
        subscription: Subscription,
    ) -> None:
        """``subscription`` must have been taken before ``state`` was read."""
        self.folder_id = folder_id
        self.state = state
        self.users = 0
        self._store = store
        self._bus = bus
        self._subscription: Subscription | None = subscription
        self._read_at = time.monotonic()
        self._lock = asyncio.Lock()
        self._history: deque[_Step] = deque()
        self._history_size = 0

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def _stale(self) -> bool:
        subscription = self._subscription
        return (
            subscription is None
            or subscription.pending() > 0
            or not self._bus.silence_proves_nothing_changed(self._read_at)
        )

    async def latest(self) -> FolderState:
        """The folder as the store holds it now (read only if it may have changed)."""
        if not self._lock.locked() and not self._stale():
            # (While a read is in flight the change that caused it is drained
            # already: wait for the read rather than answer the older state.)
            return self.state
        async with self._lock:
            if not self._stale():
                return self.state  # another session read it while this one waited
            subscription = self._subscription
            if subscription is not None:
                # Before the read: later changes stay pending.
                deltas = subscription.drain_deltas()
                if (
                    deltas is not None
                    and self._bus.silence_proves_nothing_changed(self._read_at)
                    and self._apply(deltas)
                ):
                    return self.state
            self._read_at = time.monotonic()
            changed, vanished, highest = await self._store.changes(
                self.folder_id, self.state.highestmodseq
            )
            self._step(changed, vanished, highest)
        return self.state

    def _step(self, changed: Sequence[FlagRow], vanished: Sequence[int], highest: int) -> None:
        before = self.state
        if changed or vanished:
            self.state = _advance(before, changed, vanished, highest)
            step = _Step(
                before.highestmodseq, self.state.highestmodseq, tuple(changed), tuple(vanished)
            )
            self._remember(step)

    def _apply(self, changes: list[FolderChange]) -> bool:
        """Bring the state forward by the deltas; False when they leave a gap
        (a change not told yet, or told without its delta), for the caller to
        read the store from where they stopped. A run of deltas that follow
        each other is applied as one step: the folder's arrays are copied once,
        not once per change."""
        since = until = self.state.highestmodseq
        rows: dict[int, FlagRow] = {}
        gone: set[int] = set()
        chained = True
        for change in sorted(changes, key=lambda c: c.modseq):
            delta = change.delta
            if change.modseq <= until:
                continue  # in the state already (read or applied before)
            if delta is None or delta.since != until:
                chained = False
                break
            gone.update(delta.vanished)
            for row in delta.changed:
                rows[row.uid] = row  # a later change of a message replaces an earlier one
            until = change.modseq
        if until > since:
            changed = [row for uid, row in rows.items() if uid not in gone]
            self._step(changed, sorted(gone), until)
        return chained

    def _remember(self, step: _Step) -> None:
        self._history.append(step)
        self._history_size += step.size
        while self._history_size > _HISTORY_ROWS and len(self._history) > 1:
            self._history_size -= self._history.popleft().size

    async def changes_since(self, modseq: int) -> tuple[list[FlagRow], list[int], int]:
        """What ``MailStore.changes_since`` would answer, and the folder's
        HIGHESTMODSEQ: from memory when the kept steps reach back to ``modseq``."""
        state = await self.latest()
        if modseq >= state.highestmodseq:
            return [], [], state.highestmodseq
        steps: list[_Step] = []
        for step in reversed(self._history):  # newest first: a session is rarely far behind
            if step.until <= modseq:
                break
            steps.append(step)
        steps.reverse()
        # A step of several writes (``_apply``) that ``modseq`` falls inside
        # cannot say which of its expunges came after ``modseq``: the store can.
        inside = bool(steps) and steps[0].since < modseq and bool(steps[0].vanished)
        if not steps or steps[0].since > modseq or inside:
            changed, vanished, highest = await self._store.changes(self.folder_id, modseq)
            return list(changed), vanished, highest
        latest_rows: dict[int, FlagRow] = {}
        gone: set[int] = set()
        for step in steps:
            gone.update(step.vanished)
            for row in step.changed:
                if row.modseq > modseq:
                    latest_rows[row.uid] = row
        rows = sorted(
            (row for uid, row in latest_rows.items() if uid not in gone), key=lambda r: r.uid
        )
        return rows, sorted(gone), steps[-1].until


class Indexes:
    """The process's folder indexes, by folder id."""

    def __init__(self, store: MailStore, bus: ChangeBus) -> None:
        self._store = store
        self._bus = bus
        self._open: dict[int, FolderIndex] = {}
        self._spare: OrderedDict[int, FolderIndex] = OrderedDict()
        self._loading: dict[int, asyncio.Lock] = {}

    async def acquire(self, folder_id: int) -> FolderIndex:
        """The folder's index, up to date, counted as used until :meth:`release`."""
        index = self._open.get(folder_id) or self._spare.pop(folder_id, None)
        if index is None:
            lock = self._loading.setdefault(folder_id, asyncio.Lock())
            async with lock:
                index = self._open.get(folder_id) or self._spare.pop(folder_id, None)
                if index is None:
                    # Subscribed before the snapshot: a change committed during
                    # the read is pending, and re-read by the first latest().
                    subscription = self._bus.subscribe(folder_id, deltas=True)
                    try:
                        snapshot = await self._store.snapshot(folder_id)
                    except BaseException:
                        subscription.close()
                        raise
                    state = FolderState.from_snapshot(snapshot)
                    index = FolderIndex(folder_id, state, self._store, self._bus, subscription)
            self._loading.pop(folder_id, None)
        self._open[folder_id] = index
        index.users += 1
        try:
            await index.latest()
        except BaseException:
            self.release(index)
            raise
        return index

    def release(self, index: FolderIndex) -> None:
        index.users -= 1
        if index.users > 0 or self._open.get(index.folder_id) is not index:
            return
        del self._open[index.folder_id]
        self._spare[index.folder_id] = index
        while len(self._spare) > _SPARE:
            _, dropped = self._spare.popitem(last=False)
            dropped.close()
