"""The shared folder state (mssd.imap.index): advancing it by a store's changes
gives what a fresh snapshot would."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from mssd.imap.index import _advance
from mssd.imap.view import FolderState
from mssd.store.mailstore import FolderSnapshot, MessageRow

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
FLAG_SETS = [
    frozenset(),
    frozenset({"\\Seen"}),
    frozenset({"\\Seen", "\\Flagged"}),
    frozenset({"$label1"}),
]


@settings(max_examples=200, deadline=None)
@given(
    uids=st.lists(st.integers(1, 300), unique=True, max_size=60).map(sorted),
    data=st.data(),
)
def test_advance_matches_a_fresh_snapshot(uids: list[int], data: st.DataObject) -> None:
    modseq = iter(range(1, 10_000))
    before = {uid: (data.draw(st.sampled_from(FLAG_SETS)), next(modseq)) for uid in uids}
    highest = max((m for _, m in before.values()), default=0)
    state = FolderState.from_snapshot(
        FolderSnapshot(
            7,
            (uids[-1] + 1) if uids else 1,
            highest,
            tuple((u, f, m) for u, (f, m) in before.items()),
        )
    )
    vanished = data.draw(st.lists(st.sampled_from(uids), unique=True)) if uids else []
    after = {u: v for u, v in before.items() if u not in vanished}
    changed: list[MessageRow] = []
    for uid in data.draw(st.lists(st.sampled_from(sorted(after)), unique=True)) if after else []:
        flags, stamp = data.draw(st.sampled_from(FLAG_SETS)), next(modseq)
        after[uid] = (flags, stamp)
        changed.append(MessageRow(uid, flags, stamp, EPOCH, 1, ""))
    top = max(uids, default=0)
    for uid in range(top + 1, top + 1 + data.draw(st.integers(0, 5))):
        flags, stamp = data.draw(st.sampled_from(FLAG_SETS)), next(modseq)
        after[uid] = (flags, stamp)
        changed.append(MessageRow(uid, flags, stamp, EPOCH, 1, ""))
    expunge_stamps = [next(modseq) for _ in vanished]
    new_highest = max([highest, *(r.modseq for r in changed), *expunge_stamps])

    result = _advance(state, list(reversed(changed)), vanished, new_highest)

    assert list(result.uids) == sorted(after)
    assert result.flags == [after[u][0] for u in sorted(after)]
    assert list(result.modseqs) == [after[u][1] for u in sorted(after)]
    assert result.highestmodseq == new_highest
    assert result.uidnext == max(state.uidnext, max(after, default=0) + 1)
    # The state it came from is untouched (sessions still hold it).
    assert list(state.uids) == uids
