"""The shared folder state (mssd.imap.index): advancing it by a store's changes
gives what a fresh snapshot would."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from mssd.imap.index import _advance
from mssd.imap.view import FolderState, SelectedView
from mssd.store.mailstore import FolderInfo, FolderSnapshot, MessageRow

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

    # A view sharing the old state adopts the new one as applying the changes
    # to its own copy would have made it, and tells the client the same.
    folder = FolderInfo(7, 1, "per@x.test", "INBOX", None, True, 7, 1, highest, "lrswipkxtea")
    followed, applied = SelectedView(folder, False, state), SelectedView(folder, False, state)
    update = followed.follow(result, changed, vanished, allow_expunge=True)
    assert update == applied.apply(changed, list(vanished), new_highest, allow_expunge=True)
    assert followed.shared
    for view in (followed, applied):
        assert list(view.uids) == sorted(after)
        assert [view.flags[u] for u in view.uids] == [after[u][0] for u in sorted(after)]
        assert [view.modseqs[u] for u in view.uids] == [after[u][1] for u in sorted(after)]
    assert (followed.highestmodseq, followed.uidnext) == (applied.highestmodseq, applied.uidnext)
    # Expunges it may not tell yet: the view keeps its own copy instead.
    withheld = SelectedView(folder, False, state).follow(
        result, changed, vanished, allow_expunge=False
    )
    assert (withheld is None) == bool(vanished)
