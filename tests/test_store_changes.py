"""Change notifications (mssd.store.changes): local fan-out, coalescing, and
LISTEN/NOTIFY between processes sharing one PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import asyncpg
import pytest
from conftest import PER, PER2, PkiBundle, _asyncpg_dsn, seed, store_url_for
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store import changes as changes_module
from mssd.store.accounts import StoreAccounts
from mssd.store.changes import (
    APPLICATION_NAME,
    ChangeBus,
    FlagState,
    FolderChange,
    FolderDelta,
    changes_from_stored,
    decode_payload,
    encode_payload,
)
from mssd.store.delivery import GroupCommitter, NewMessage, RecipientRecord, new_envelope_id
from mssd.store.engine import create_engine, upgrade
from mssd.store.mailstore import MailStore


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    yield from store_url_for("postgresql", tmp_path)


@pytest.fixture
async def postgres_engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url)
    await upgrade(engine)
    yield engine
    await engine.dispose()


def sqlite_engine(tmp_path: Path) -> AsyncEngine:
    return create_engine(f"sqlite+aiosqlite:///{tmp_path / 'mssd.db'}")


async def test_subscribers_of_a_folder_hear_its_changes_only(tmp_path: Path) -> None:
    engine = sqlite_engine(tmp_path)
    bus = ChangeBus(engine)
    await bus.start()
    try:
        with bus.subscribe(1) as one, bus.subscribe(2) as two:
            await bus.publish([FolderChange(1, 5, "exists")])
            assert await asyncio.wait_for(one.get(), 1) == FolderChange(1, 5, "exists")
            assert two.pending() == 0
        bus.publish_local(FolderChange(1, 6, "exists"))
        assert one.closed and one.pending() == 0
    finally:
        await bus.stop()
        await engine.dispose()


async def test_a_slow_subscriber_gets_one_change_per_kind_at_the_highest_modseq(
    tmp_path: Path,
) -> None:
    engine = sqlite_engine(tmp_path)
    bus = ChangeBus(engine)
    subscription = bus.subscribe(7)
    for modseq in range(1, 10_001):
        bus.publish_local(FolderChange(7, modseq, "flags" if modseq % 3 else "exists"))
    bus.publish_local(FolderChange(7, 10_001, "expunge"))
    assert subscription.pending() == 3
    assert await subscription.wait() == [
        FolderChange(7, 10_000, "flags"),
        FolderChange(7, 9_999, "exists"),
        FolderChange(7, 10_001, "expunge"),
    ]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await subscription.wait()
    subscription.close()
    assert await subscription.wait() == []
    assert [change async for change in subscription] == []
    await engine.dispose()


async def test_mailstore_writes_wake_an_idle_session(tmp_path: Path, test_pki: PkiBundle) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'mssd.db'}"
    await seed(url, test_pki)
    engine = create_engine(url)
    bus = ChangeBus(engine)
    store = MailStore(engine, on_change=bus.notify)
    try:
        account = await StoreAccounts(engine).by_login(PER)
        assert account is not None
        inbox = await store.folder(account.id, "INBOX")
        assert inbox is not None
        with bus.subscribe(inbox.id) as idle:
            waiter = asyncio.create_task(idle.wait())
            uid = await store.append(
                inbox.id,
                b"Subject: x\r\n\r\nx\r\n",
                flags=frozenset(),
                internal_date=dt.datetime.now(dt.UTC),
            )
            changes = await asyncio.wait_for(waiter, 1)
        assert changes == [FolderChange(inbox.id, inbox.highestmodseq + 1, "exists")]
        assert uid == 1
    finally:
        await engine.dispose()


async def test_group_committed_deliveries_are_published(
    tmp_path: Path, test_pki: PkiBundle
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'mssd.db'}"
    await seed(url, test_pki)
    engine = create_engine(url)
    bus = ChangeBus(engine)
    committer = GroupCommitter(engine, on_commit=bus.notify_stored)
    committer.start()
    try:
        mailbox = await StoreAccounts(engine).local_mailbox(PER2)
        assert mailbox is not None
        inbox = await MailStore(engine).folder(await _account(engine, PER2), "INBOX")
        assert inbox is not None
        body = b"Subject: livraison\r\n\r\nbonjour\r\n"
        with bus.subscribe(inbox.id) as idle:
            stored = await committer.store(
                NewMessage(
                    envelope_id=new_envelope_id(),
                    content=body,
                    sha256=hashlib.sha256(body).hexdigest(),
                    mail_from=PER,
                    recipients=(RecipientRecord(PER2, mailbox.id),),
                    source="submission",
                    remote="127.0.0.1",
                    received_at=dt.datetime.now(dt.UTC),
                )
            )
            assert await asyncio.wait_for(idle.get(), 1) == FolderChange(
                inbox.id, stored.placements[0].modseq, "exists"
            )
        assert changes_from_stored([stored, stored]) == [
            FolderChange(inbox.id, stored.placements[0].modseq, "exists")
        ]
    finally:
        await committer.stop()
        await engine.dispose()


async def _account(engine: AsyncEngine, login: str) -> int:
    account = await StoreAccounts(engine).by_login(login)
    assert account is not None
    return account.id


def test_payloads_round_trip_and_garbage_is_ignored() -> None:
    change = FolderChange(12, 345, "expunge")
    assert decode_payload(encode_payload(change, "abc")) == (change, "abc")
    assert decode_payload("12:345:flags") == (FolderChange(12, 345, "flags"), None)
    for garbage in ("", "x:1:exists", "1:2:unknown", "1:2"):
        assert decode_payload(garbage) is None


def test_deltas_travel_in_payloads_when_they_fit() -> None:
    delta = FolderDelta(
        7,
        (FlagState(3, frozenset({"\\Seen", "$Label:1"}), 8), FlagState(9, frozenset(), 9)),
        (4, 5),
    )
    change = FolderChange(12, 9, "flags", delta)
    decoded = decode_payload(encode_payload(change, "abc"))
    assert decoded is not None and decoded[1] == "abc"
    assert decoded[0] == change and decoded[0].delta == delta
    # Too large for one NOTIFY (PostgreSQL refuses 8000 octets): sent without it.
    many = FolderDelta(7, tuple(FlagState(uid, frozenset({"\\Seen"}), 8) for uid in range(2000)))
    payload = encode_payload(FolderChange(12, 8, "exists", many), "abc")
    assert len(payload) < 8000
    assert decode_payload(payload) == (FolderChange(12, 8, "exists"), "abc")
    # A delta not of the shape written is dropped; the change stays a hint.
    for body in (
        "{",
        "[1,2]",
        '[1,[[1,"a"]],[]]',
        "[1,[[1,2,3]],[]]",
        "[-1,[],[]]",
        '[1,[],["x"]]',
    ):
        decoded = decode_payload(f"12:8:flags:abc:{body}")
        assert decoded is not None and decoded[0].delta is None
        assert decoded[0] == FolderChange(12, 8, "flags")


async def test_a_change_reaches_another_process_within_a_second(
    postgres_url: str, postgres_engine: AsyncEngine
) -> None:
    other_engine = create_engine(postgres_url)  # another process: its own pool and listener
    first, second = ChangeBus(postgres_engine), ChangeBus(other_engine)
    await first.start()
    await second.start()
    try:
        with second.subscribe(42) as remote, first.subscribe(42) as local:
            await first.publish([FolderChange(42, 9, "exists")])
            assert await asyncio.wait_for(remote.get(), 1) == FolderChange(42, 9, "exists")
            first.notify(FolderChange(42, 10, "flags"))  # the synchronous form
            assert await asyncio.wait_for(remote.get(), 1) == FolderChange(42, 10, "flags")
            # The publisher's own subscribers hear it once, not again through NOTIFY.
            assert await local.wait() == [
                FolderChange(42, 9, "exists"),
                FolderChange(42, 10, "flags"),
            ]
            await asyncio.sleep(0.2)
            assert local.pending() == 0
            # What a change did travels with it.
            delta = FolderDelta(10, (FlagState(7, frozenset({"\\Seen"}), 11),), (3,))
            await first.publish([FolderChange(42, 11, "flags", delta)])
            heard = await asyncio.wait_for(remote.get(), 1)
            assert heard == FolderChange(42, 11, "flags") and heard.delta == delta
    finally:
        await first.stop()
        await second.stop()
        await other_engine.dispose()


async def test_changes_close_in_time_share_one_notify(
    postgres_url: str, postgres_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender waits NOTIFY_LINGER after a change for the next ones: changes
    a few milliseconds apart go out in one NOTIFY transaction, and the other
    process hears each of them."""
    monkeypatch.setattr(changes_module, "NOTIFY_LINGER", 0.5)
    other_engine = create_engine(postgres_url)
    first, second = ChangeBus(postgres_engine), ChangeBus(other_engine)
    sent: list[int] = []
    send = first._pg_notify

    async def counted(pairs: Sequence[tuple[str, str]]) -> None:
        sent.append(len(pairs))
        await send(pairs)

    monkeypatch.setattr(first, "_pg_notify", counted)
    await first.start()
    await second.start()
    try:
        with second.subscribe(42) as remote:
            # (Three kinds: a subscriber keeps one pending change per kind.)
            sent_changes = [
                FolderChange(42, 9, "exists"),
                FolderChange(42, 10, "flags"),
                FolderChange(42, 11, "expunge"),
            ]
            for change in sent_changes:
                first.notify(change)
                await asyncio.sleep(0.01)
            async with asyncio.timeout(2):
                heard = [await remote.get() for _ in range(3)]
        assert sorted(heard, key=lambda change: change.modseq) == sent_changes
        assert sent == [3]
    finally:
        await first.stop()
        await second.stop()
        await other_engine.dispose()


async def test_subscribers_are_told_to_resync_after_the_listener_reconnects(
    postgres_url: str, postgres_engine: AsyncEngine
) -> None:
    bus = ChangeBus(postgres_engine)
    await bus.start()
    try:
        with bus.subscribe(3) as subscription:
            database = postgres_url.rpartition("/")[2]
            conn = await asyncpg.connect(_asyncpg_dsn(postgres_url))
            try:
                killed = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = $1 AND datname = $2",
                    APPLICATION_NAME,
                    database,
                )
            finally:
                await conn.close()
            assert killed == 1
            assert await asyncio.wait_for(subscription.get(), 5) == FolderChange(3, 0, "resync")
            assert bus.reconnects == 1
            other = ChangeBus(create_engine(postgres_url))
            await other.start()
            try:
                await other.publish([FolderChange(3, 4, "exists")])
                assert await asyncio.wait_for(subscription.get(), 1) == FolderChange(3, 4, "exists")
            finally:
                await other.stop()
                await other._engine.dispose()
    finally:
        await bus.stop()
