"""The shared folder state (mssd.imap.index): advancing it by a store's changes
gives what a fresh snapshot would."""

from __future__ import annotations

import datetime as dt
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from mssd.imap.index import _advance
from mssd.imap.view import FlagCodes, FolderState, SelectedView
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


FLAG_TESTS = [
    lambda flags: "\\Seen" not in flags,
    lambda flags: "\\Flagged" in flags,
    lambda flags: not flags,
    lambda flags: any(f.startswith("$k1") for f in flags),
]
KEYWORD_SETS = [frozenset({f"$k{i}"}) for i in range(400)]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_where_answers_what_a_scan_of_every_message_would(data: st.DataObject) -> None:
    """FolderState.where keeps its answers and derives the next states' from
    them; whichever states were searched, and when the flag sets are numbered
    afresh (past 256 of them) or cannot be numbered (over 256 at once), each
    answer is what testing every message gives."""
    uids = sorted(data.draw(st.lists(st.integers(1, 600), unique=True, max_size=300)))
    pool = FLAG_SETS + KEYWORD_SETS[: data.draw(st.sampled_from([0, 20, 400]))]
    flags = {uid: data.draw(st.sampled_from(pool)) for uid in uids}
    stamps = iter(range(1, 100_000))
    messages = tuple((uid, flags[uid], next(stamps)) for uid in uids)
    state = FolderState.from_snapshot(
        FolderSnapshot(7, (uids[-1] + 1) if uids else 1, len(uids), messages)
    )

    def check(state: FolderState, tests: list[object]) -> None:
        for test in tests:
            assert callable(test)
            expected = [uid for uid in state.uids if test(flags[uid])]
            assert state.where(test) == expected
            assert state.where(test) == expected  # the kept answer

    for _ in range(data.draw(st.integers(1, 6))):
        check(state, data.draw(st.lists(st.sampled_from(FLAG_TESTS), max_size=3)))
        present = list(state.uids)
        vanished = data.draw(st.lists(st.sampled_from(present), unique=True)) if present else []
        for uid in vanished:
            del flags[uid]
        kept = sorted(flags)
        changed: list[MessageRow] = []
        for uid in data.draw(st.lists(st.sampled_from(kept), unique=True)) if kept else []:
            flags[uid] = data.draw(st.sampled_from(pool))
            changed.append(MessageRow(uid, flags[uid], next(stamps), EPOCH, 1, ""))
        top = max([*present, state.uidnext - 1, 0])
        for uid in range(top + 1, top + 1 + data.draw(st.integers(0, 40))):
            flags[uid] = data.draw(st.sampled_from(pool))
            changed.append(MessageRow(uid, flags[uid], next(stamps), EPOCH, 1, ""))
        state = _advance(state, changed, vanished, next(stamps))
    check(state, FLAG_TESTS)


def test_where_does_not_derive_across_a_fresh_numbering() -> None:
    """Past 256 flag sets the index numbers them afresh: an answer kept under the
    old numbers must not be taken for a different test with the same verdicts."""
    uids = list(range(1, 257))
    flags = {uid: KEYWORD_SETS[uid - 1] for uid in uids}
    # After one message goes and one with a 257th set comes, the sets are
    # numbered as FlagCodes.of numbers them; the old numbers are those shifted
    # by one, so every number stands for another set than before.
    after = {u: f for u, f in flags.items() if u != 200} | {257: KEYWORD_SETS[300]}
    fresh = FlagCodes.of(list(after.values()))
    assert fresh is not None
    old_sets = [KEYWORD_SETS[199] if f == KEYWORD_SETS[300] else f for f in fresh.sets]
    old_sets = old_sets[1:] + old_sets[:1]
    numbers = {flag_set: code for code, flag_set in enumerate(old_sets)}
    state = FolderState(
        array("Q", uids),
        [flags[u] for u in uids],
        array("Q", uids),
        256,
        257,
        7,
        FlagCodes(bytearray(numbers[flags[u]] for u in uids), old_sets),
    )
    for position in range(8):  # answers kept under the old numbering
        wanted = old_sets[position]
        assert len(state.where(lambda f, wanted=wanted: f == wanted)) == 1
    new = _advance(state, [MessageRow(257, KEYWORD_SETS[300], 300, EPOCH, 1, "")], [200], 301)
    assert new.codes is not None and new.codes.sets == fresh.sets
    wanted = new.codes.sets[0]
    assert wanted != old_sets[0]
    assert new.where(lambda f: f == wanted) == [u for u in new.uids if after[u] == wanted]
