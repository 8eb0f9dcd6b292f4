"""The shared folder index follows this process's own writes from what each
write says it changed (``FolderDelta``), without reading the store, and falls
back to reading it when a change came from elsewhere: after every step of a
random mix of writes, the index equals a fresh snapshot of the folder."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import pytest
from conftest import PER, PkiBundle, seed, store_url_for
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.auth import Authenticator
from mssd.imap.facts import FactCache
from mssd.imap.heads import HeadCache
from mssd.imap.index import Indexes, _advance
from mssd.imap.session import Services, Session
from mssd.imap.view import FlagCodes, FolderState, SelectedView, ViewUpdate
from mssd.store import changes
from mssd.store.accounts import StoreAccounts
from mssd.store.changes import ChangeBus, FlagState, FolderChange
from mssd.store.delivery import GroupCommitter
from mssd.store.engine import create_engine
from mssd.store.mailstore import FolderInfo, FolderSnapshot, MailStore, MessageRow
from mssd.store.schema import folders, placements

FLAGS = ["\\Seen", "\\Flagged", "\\Deleted", "$label1"]


class CountingStore(MailStore):
    """The real store, counting the reads the index makes of it."""

    reads = 0

    async def changes(self, folder_id: int, modseq: int) -> tuple[list[MessageRow], list[int], int]:
        self.reads += 1
        return await super().changes(folder_id, modseq)


_TESTS: list[Callable[[frozenset[str]], bool]] = [
    lambda flags: "\\Seen" not in flags,
    lambda flags: "\\Deleted" in flags and "$label1" not in flags,
    lambda flags: True,
    lambda flags: not flags,
]


async def _folder_of_per(engine: AsyncEngine, store: MailStore, name: str) -> FolderInfo:
    """A folder of the seeded PER mailbox."""
    account = await StoreAccounts(engine).by_login(PER)
    assert account is not None
    folder = await store.folder(account.id, name)
    assert folder is not None
    return folder


def _coded_right(uids: Sequence[int], flags: list[frozenset[str]], codes: FlagCodes | None) -> None:
    """The flag codes (kept up to date step by step) say what the flags say."""
    if codes is None:
        return
    assert len(codes.codes) == len(uids)
    assert [codes.sets[code] for code in codes.codes] == flags
    for test in _TESTS:
        expected = [uid for uid, fl in zip(uids, flags, strict=True) if test(fl)]
        assert codes.where(uids, test) == expected
    assert codes.distinct() == set(flags)


def _same(index_state: FolderState, fresh: FolderState) -> None:
    assert list(index_state.uids) == list(fresh.uids)
    assert index_state.flags == fresh.flags
    assert list(index_state.modseqs) == list(fresh.modseqs)
    assert index_state.highestmodseq == fresh.highestmodseq
    _coded_right(index_state.uids, index_state.flags, index_state.codes)


async def test_index_follows_own_writes_without_reading_and_others_by_reading(
    store_url: str, test_pki: PkiBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(store_url, test_pki)
    engine = create_engine(store_url)
    bus = ChangeBus(engine)
    store = CountingStore(engine, on_change=bus.notify)
    indexes = Indexes(store, bus)
    rng = random.Random(20261122)
    # With PostgreSQL the index also re-reads once a second (other processes'
    # NOTIFY may be lost); this test is about what happens within that second.
    monkeypatch.setattr(changes, "SILENCE_TRUST_SECONDS", 3600.0)
    await bus.start()
    try:
        inbox = await _folder_of_per(engine, store, "INBOX")
        archive = await _folder_of_per(engine, store, "Archive")
        now = dt.datetime.now(dt.UTC)
        for n in range(20):
            await store.append(
                inbox.id, b"Subject: %d\r\n\r\nbody\r\n" % n, flags=frozenset(), internal_date=now
            )
        index = await indexes.acquire(inbox.id)

        async def current() -> list[int]:
            return list((await index.latest()).uids)

        own_steps = foreign_steps = 0
        for step in range(120):
            uids = await current()
            some: Sequence[int] = rng.sample(uids, min(len(uids), rng.randint(1, 4)))
            choice = rng.choice(
                ["append", "add", "remove", "set", "expunge", "copy", "move", "back", "foreign"]
            )
            reads = store.reads
            if choice == "append":
                batch = [
                    (b"Subject: a%d\r\n\r\nx\r\n" % step, frozenset(rng.sample(FLAGS, 1)), now)
                    for _ in range(rng.randint(1, 3))
                ]
                await store.append_many(inbox.id, batch)
            elif choice in ("add", "remove", "set") and some:
                mode = {"add": "add", "remove": "remove", "set": "set"}[choice]
                flags = frozenset(rng.sample(FLAGS, rng.randint(0, 2)))
                await store.store_flags(inbox.id, some, mode=mode, flags=flags)  # type: ignore[arg-type]
            elif choice == "expunge" and some:
                await store.store_flags(inbox.id, some, mode="add", flags=frozenset({"\\Deleted"}))
                await store.expunge(inbox.id, uids=some[:-1] or None)
            elif choice == "copy" and some:
                await store.copy(inbox.id, some, inbox.id)
            elif choice == "move" and some:
                await store.move(inbox.id, some, archive.id)
            elif choice == "back":
                back = list((await store.snapshot(archive.id)).messages)[:2]
                if back:
                    await store.move(archive.id, [uid for uid, _, _ in back], inbox.id)
            else:
                # Another process wrote: the change arrives without a delta (as
                # over NOTIFY), after a write this process never saw.
                async with engine.begin() as conn:
                    row = (
                        await conn.execute(
                            update(folders)
                            .where(folders.c.id == inbox.id)
                            .values(highestmodseq=folders.c.highestmodseq + 1)
                            .returning(folders.c.highestmodseq)
                        )
                    ).one()
                    if uids:
                        await conn.execute(
                            update(placements)
                            .where(placements.c.folder_id == inbox.id)
                            .where(placements.c.uid == uids[0])
                            .values(flags="$foreign", modseq=row[0])
                        )
                bus.publish_local(FolderChange(inbox.id, row[0], "flags"))
            if choice != "foreign" and rng.random() < 0.4:
                # More writes before the index looks: their deltas are one step.
                for _ in range(rng.randint(1, 3)):
                    some = rng.sample(uids, min(len(uids), 2)) if uids else []
                    flags = frozenset(rng.sample(FLAGS, rng.randint(0, 2)))
                    await store.store_flags(inbox.id, some, mode="set", flags=flags)
            state = await index.latest()
            _same(state, FolderState.from_snapshot(await store.snapshot(inbox.id)))
            if choice == "foreign":
                foreign_steps += 1
                assert store.reads == reads + 1, "a change from elsewhere is read from the store"
            else:
                own_steps += 1
                assert store.reads == reads, f"{choice}: an own write was read back"
        assert own_steps > 50 and foreign_steps > 5
        # A session a few steps behind is answered from the kept steps, as the
        # store would answer it; one whose modseq falls inside a step (several
        # writes applied at once), exactly as the store would too.
        assert any(s.until - s.since > 1 for s in index._history), "no step of several writes"
        for behind in (
            index._history[-6].since,
            *range(state.highestmodseq - 12, state.highestmodseq),
        ):
            reads = store.reads
            changed, vanished, highest = await index.changes_since(behind)
            if behind == index._history[-6].since:
                assert store.reads == reads
            stored_changed, stored_vanished, stored_highest = await store.changes(inbox.id, behind)
            assert [(r.uid, r.flags, r.modseq) for r in changed] == [
                (r.uid, r.flags, r.modseq) for r in stored_changed
            ]
            assert (vanished, highest) == (stored_vanished, stored_highest)
        indexes.release(index)
    finally:
        await bus.stop()
        await engine.dispose()


async def test_sessions_woken_together_all_get_the_change_being_read(
    store_url: str, test_pki: PkiBundle
) -> None:
    """A change from another process wakes every session on the folder at
    once: the first one's read of the store is in flight when the others ask,
    and they must wait for it rather than be answered the older state."""
    await seed(store_url, test_pki)
    engine = create_engine(store_url)
    bus = ChangeBus(engine)
    store = CountingStore(engine, on_change=bus.notify)
    indexes = Indexes(store, bus)
    await bus.start()
    try:
        account = await StoreAccounts(engine).by_login(PER)
        assert account is not None
        inbox = await store.folder(account.id, "INBOX")
        assert inbox is not None
        index = await indexes.acquire(inbox.id)
        # Written by "another process": this store has no change callback.
        other = MailStore(engine)
        await other.append(
            inbox.id,
            b"Subject: x\r\n\r\nx\r\n",
            flags=frozenset(),
            internal_date=dt.datetime.now(dt.UTC),
        )
        highest = (await other.snapshot(inbox.id)).highestmodseq
        bus.publish_local(FolderChange(inbox.id, highest, "exists"))
        states = await asyncio.gather(*(index.latest() for _ in range(5)))
        assert [state.highestmodseq for state in states] == [highest] * 5
        assert store.reads == 1
        indexes.release(index)
    finally:
        await bus.stop()
        await engine.dispose()


def _folder() -> FolderInfo:
    return FolderInfo(1, 1, "per@x.test", "INBOX", None, True, 1, 251, 250, "lrswipkxtea")


def test_flag_codes_past_one_octet() -> None:
    """More distinct flag sets than one octet numbers: the state goes without
    codes; a state whose codes overflow after a change is numbered afresh,
    dropping the sets no message has any more."""
    many = FolderSnapshot(
        1, 301, 300, tuple((uid, frozenset({f"$k{uid}"}), uid) for uid in range(1, 301))
    )
    assert FolderState.from_snapshot(many).codes is None

    few = tuple((uid, frozenset({f"$k{uid}"}), uid) for uid in range(1, 251))
    state = FolderState.from_snapshot(FolderSnapshot(1, 251, 250, few))
    assert state.codes is not None and len(state.codes.sets) == 250
    # 20 messages change to new sets (270 numbered, 250 in use), then 10 more appear.
    changed = [FlagState(uid, frozenset({f"$n{uid}"}), 250 + uid) for uid in range(1, 21)]
    changed += [FlagState(uid, frozenset({"\\Seen"}), 300 + uid) for uid in range(251, 261)]
    after = _advance(state, changed, [], 400)
    assert after.codes is not None and len(after.codes.sets) == 251
    _coded_right(after.uids, after.flags, after.codes)
    assert len(state.codes.codes) == 250, "the old state is unchanged"
    _coded_right(state.uids, state.flags, state.codes)

    # A view past one octet numbers afresh in the same way.
    view = SelectedView(_folder(), False, state)
    view.apply(changed, [], 400, allow_expunge=True)
    assert view.uids_where(lambda flags: "\\Seen" in flags) == list(range(251, 261))
    assert len(view.distinct_flags()) == 251


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    yield from store_url_for("postgresql", tmp_path)


async def test_another_process_writes_reach_the_index_through_notify_deltas(
    postgres_url: str, test_pki: PkiBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes on one PostgreSQL (each its engine, bus and store): the
    writes of one reach the other's folder index with their deltas in the
    NOTIFY payloads, and it follows them without reading the store; a change
    too large for a payload is read."""
    await seed(postgres_url, test_pki)
    monkeypatch.setattr(changes, "SILENCE_TRUST_SECONDS", 3600.0)
    writer_engine, reader_engine = create_engine(postgres_url), create_engine(postgres_url)
    writer_bus, reader_bus = ChangeBus(writer_engine), ChangeBus(reader_engine)
    writer = MailStore(writer_engine, on_change=writer_bus.notify)
    reader = CountingStore(reader_engine, on_change=reader_bus.notify)
    indexes = Indexes(reader, reader_bus)
    await writer_bus.start()
    await reader_bus.start()
    try:
        inbox = await _folder_of_per(writer_engine, writer, "INBOX")
        now = dt.datetime.now(dt.UTC)
        index = await indexes.acquire(inbox.id)

        heard = reader_bus.subscribe(inbox.id)  # to know when the NOTIFY arrived

        async def caught_up() -> FolderState:
            highest = (await writer.snapshot(inbox.id)).highestmodseq
            async with asyncio.timeout(2):
                while max((c.modseq for c in await heard.wait()), default=0) < highest:
                    pass
            state = await index.latest()
            assert state.highestmodseq == highest
            _same(state, FolderState.from_snapshot(await writer.snapshot(inbox.id)))
            return state

        reads = reader.reads
        uids = await writer.append_many(
            inbox.id, [(b"Subject: %d\r\n\r\nx\r\n" % n, frozenset(), now) for n in range(5)]
        )
        await caught_up()
        await writer.store_flags(inbox.id, uids[:3], mode="add", flags=frozenset({"\\Seen"}))
        await caught_up()
        await writer.store_flags(inbox.id, uids[1:2], mode="add", flags=frozenset({"\\Deleted"}))
        await writer.expunge(inbox.id)
        state = await caught_up()
        assert list(state.uids) == [uids[0], *uids[2:]]
        assert reader.reads == reads, "changes with deltas were read from the store"
        # 2,000 messages at once: no room in one payload, so the other process reads.
        big = [(b"Subject: b\r\n\r\nx\r\n", frozenset({"\\Seen"}), now)] * 2000
        await writer.append_many(inbox.id, big)
        await caught_up()
        assert reader.reads == reads + 1
        heard.close()
        indexes.release(index)
    finally:
        await writer_bus.stop()
        await reader_bus.stop()
        await writer_engine.dispose()
        await reader_engine.dispose()


async def test_own_writes_leave_the_view_sharing_the_index_state(
    store_url: str, test_pki: PkiBundle
) -> None:
    """A session's own STORE, APPEND and EXPUNGE, proven the only change, bring
    its view to the index's next state by adopting it (no copy of the folder's
    arrays): the view then is that state, as a fresh snapshot has it, and the
    client is told what apply() would tell. A view the index has gone past
    applies the write to its own arrays."""
    await seed(store_url, test_pki)
    engine = create_engine(store_url)
    bus = ChangeBus(engine)
    store = MailStore(engine, on_change=bus.notify)
    await bus.start()
    try:
        inbox = await _folder_of_per(engine, store, "INBOX")
        now = dt.datetime.now(dt.UTC)
        for n in range(12):
            await store.append(
                inbox.id, b"Subject: %d\r\n\r\nbody\r\n" % n, flags=frozenset(), internal_date=now
            )
        services = Services(
            cast(Authenticator, None), store, bus, cast(GroupCommitter, None), 1 << 20,
            HeadCache(0), FactCache(0),
        )  # fmt: skip
        sent: list[bytes] = []

        async def send(data: bytes) -> None:
            sent.append(data)

        def queue(data: bytes) -> bool:
            sent.append(data)
            return False  # never asks for a wait

        session = Session(
            services, send=send, queue=queue,
            remote_ip="127.0.0.1", tls=True, trusted=False,
            peer_certificate=lambda: None, starttls_available=False,
        )  # fmt: skip
        session.subscription = bus.subscribe(inbox.id)
        session.index = index = await services.indexes.acquire(inbox.id)
        session.view = view = SelectedView(inbox, False, index.state)

        async def same_as_store() -> None:
            assert view.shared and view._shared is index.state
            fresh = FolderState.from_snapshot(await store.snapshot(inbox.id))
            assert list(view.uids) == list(fresh.uids)
            assert [view.flags[u] for u in view.uids] == fresh.flags
            assert view.highestmodseq == fresh.highestmodseq

        result = await store.store_flags(
            inbox.id, list(view.uids[:3]), mode="add", flags=frozenset({"\\Seen"})
        )
        highest = session.own_change(len(result.updated))
        assert highest is not None
        update = await session.own_update(result.updated, [], highest, allow_expunge=False)
        assert update == ViewUpdate(flags=(1, 2, 3))
        await same_as_store()

        uids = await store.append_many(inbox.id, [(b"Subject: new\r\n\r\nx\r\n", frozenset(), now)])
        highest = session.own_change(len(uids))
        assert highest is not None
        rows = [MessageRow(uids[0], frozenset(), highest, now, 1, "")]
        update = await session.own_update(rows, [], highest, allow_expunge=False)
        assert update == ViewUpdate(exists=13)
        await same_as_store()

        doomed = list(view.uids[:2])
        await store.store_flags(inbox.id, doomed, mode="add", flags=frozenset({"\\Deleted"}))
        await session.sync(allow_expunge=True)
        gone = await store.expunge(inbox.id, uids=doomed)
        highest = session.own_change(len(gone))
        assert highest is not None
        update = await session.own_update([], gone, highest, allow_expunge=True)
        assert update == ViewUpdate(expunged=(2, 1), expunged_uids=tuple(doomed), exists=11)
        await same_as_store()

        # Two writes before the session looks: the first one's own update finds
        # the index past it, and the view applies it to its own arrays.
        before = view.flags[view.uids[1]]
        first = await store.store_flags(
            inbox.id, list(view.uids[:1]), mode="add", flags=frozenset({"$a"})
        )
        mark = view.highestmodseq + len(first.updated)
        await store.store_flags(inbox.id, list(view.uids[1:2]), mode="add", flags=frozenset({"$b"}))
        await index.latest()
        update = await session.own_update(first.updated, [], mark, allow_expunge=False)
        assert update == ViewUpdate(flags=(1,))
        assert not view.shared and view.highestmodseq == mark
        assert view.flags[view.uids[0]] == first.updated[0].flags == {"$a", "\\Seen"}
        assert view.flags[view.uids[1]] == before  # the second write is not the view's yet
        services.indexes.release(index)
        session.subscription.close()
    finally:
        await bus.stop()
        await engine.dispose()
