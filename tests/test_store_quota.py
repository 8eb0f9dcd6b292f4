"""Mailbox quotas in the store (mssd.store.quota) on SQLite and PostgreSQL: what is
refused, that a refusal writes nothing, and that the usage counter always equals
the sizes of the placements it stands for."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib

import pytest
import test_store_mailstore
from alembic import command
from conftest import ORG, PER, PER2
from sqlalchemy import Connection, func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from test_store_mailstore import SHARED_ORG, account, folder

from mssd.store import admin
from mssd.store.accounts import StoreAccounts
from mssd.store.delivery import GroupCommitter, NewMessage, RecipientRecord, new_envelope_id
from mssd.store.engine import _alembic_config
from mssd.store.mailstore import MailStore, MailStoreError
from mssd.store.quota import OverQuota
from mssd.store.schema import blobs, envelope_recipients, envelopes, folders, placements

# The fixtures of the mail store's tests: the standard population seeded once per
# backend, a fresh copy of it for each test.
seeded = test_store_mailstore.seeded
engine = test_store_mailstore.engine
SHARED_INBOX = f"{SHARED_ORG}/INBOX"
NOW = dt.datetime(2026, 12, 20, 9, 30, tzinfo=dt.UTC)
KIB = 1024


def sized(size: int, tag: str = "") -> bytes:
    """A message of exactly ``size`` octets."""
    head = f"Subject: {tag or size}\r\n\r\n".encode()
    return head + b"x" * (size - len(head))


async def append(store: MailStore, folder_id: int, *sizes: int, tag: str = "") -> list[int]:
    return await store.append_many(
        folder_id, [(sized(s, f"{tag}{i}"), frozenset(), NOW) for i, s in enumerate(sizes)]
    )


async def stored_sums(engine: AsyncEngine) -> dict[int, int]:
    """What each mailbox holds, summed from the placements themselves."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(folders.c.mailbox_id, func.coalesce(func.sum(placements.c.size), 0))
            .select_from(folders.outerjoin(placements, placements.c.folder_id == folders.c.id))
            .group_by(folders.c.mailbox_id)
        )
        return {int(mailbox_id): int(total) for mailbox_id, total in rows}


async def counters(engine: AsyncEngine, store: MailStore) -> dict[int, int]:
    return {m: await store.usage(m) for m in await stored_sums(engine)}


async def blob_exists(engine: AsyncEngine, content: bytes) -> bool:
    async with engine.connect() as conn:
        digest = hashlib.sha256(content).hexdigest()
        return await conn.scalar(select(blobs.c.sha256).where(blobs.c.sha256 == digest)) is not None


async def test_append_over_quota_is_refused_and_stores_nothing(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    await admin.set_quota(engine, PER, 10 * KIB, actor="test")
    inbox = await folder(store, await account(engine, PER), "INBOX")
    assert await append(store, inbox.id, 6 * KIB) == [1]
    before = await store.snapshot(inbox.id)
    with pytest.raises(MailStoreError) as refused:
        await append(store, inbox.id, 5 * KIB, tag="trop")
    assert refused.value.code == "OVERQUOTA"
    assert refused.value.text == (
        f"{PER}: mailbox full (6 KiB used of its 10 KiB quota, 5 KiB more do not fit)"
    )
    assert await store.snapshot(inbox.id) == before
    assert await store.usage(inbox.mailbox_id) == 6 * KIB
    assert not await blob_exists(engine, sized(5 * KIB, "trop0"))
    # Exactly up to the limit is allowed.
    assert await append(store, inbox.id, 4 * KIB) == [2]
    assert await store.usage(inbox.mailbox_id) == 10 * KIB


async def test_multiappend_whose_second_message_overflows_stores_none(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    await admin.set_quota(engine, PER, 10 * KIB, actor="test")
    inbox = await folder(store, await account(engine, PER), "INBOX")
    with pytest.raises(MailStoreError, match="mailbox full") as refused:
        await append(store, inbox.id, 4 * KIB, 7 * KIB, tag="lot")
    assert refused.value.code == "OVERQUOTA"
    assert (await store.snapshot(inbox.id)).messages == ()
    assert await store.usage(inbox.mailbox_id) == 0
    assert not await blob_exists(engine, sized(4 * KIB, "lot0"))
    # The UIDs the refused MULTIAPPEND would have had are still free.
    assert await append(store, inbox.id, 4 * KIB, 6 * KIB) == [1, 2]


async def test_quota_is_enforced_in_whole_kib_as_reported(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    await admin.set_quota(engine, PER, 10 * KIB + 1000, actor="test")
    per = await account(engine, PER)
    inbox = await folder(store, per, "INBOX")
    with pytest.raises(MailStoreError, match="mailbox full"):
        await append(store, inbox.id, 10 * KIB + 1)
    await append(store, inbox.id, 10 * KIB)
    quota = await store.quota(per, PER)
    assert quota is not None and (quota.used_kib, quota.limit_kib) == (10, 10)


async def test_copy_and_move_over_quota_leave_both_folders_untouched(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    await admin.set_quota(engine, ORG, 10 * KIB, actor="test")
    per = await account(engine, PER)
    inbox, shared = await folder(store, per, "INBOX"), await folder(store, per, SHARED_INBOX)
    await append(store, inbox.id, 4 * KIB, 4 * KIB, 4 * KIB)
    await append(store, shared.id, 1 * KIB)
    source, target = await store.snapshot(inbox.id), await store.snapshot(shared.id)
    for operation in (store.copy, store.move):
        with pytest.raises(MailStoreError) as refused:
            await operation(inbox.id, [1, 2, 3], shared.id)
        assert refused.value.code == "OVERQUOTA"
        assert refused.value.text == (
            f"{ORG}: mailbox full (1 KiB used of its 10 KiB quota, 12 KiB more do not fit)"
        )
        assert await store.snapshot(inbox.id) == source
        assert await store.snapshot(shared.id) == target
        assert await store.changes_since(inbox.id, source.highestmodseq) == ([], [])
    # Two of them fit: the move frees PER's mailbox and fills ORG's.
    assert await store.move(inbox.id, [1, 2], shared.id) == [(1, 2), (2, 3)]
    assert await counters(engine, store) == await stored_sums(engine)
    assert await store.usage(shared.mailbox_id) == 9 * KIB
    assert await store.usage(inbox.mailbox_id) == 4 * KIB


async def test_a_full_mailbox_can_still_move_within_itself_but_not_copy(
    engine: AsyncEngine,
) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    inbox, trash = await folder(store, per, "INBOX"), await folder(store, per, "Trash")
    await append(store, inbox.id, 6 * KIB, 6 * KIB)
    # The administrator lowers the quota below what the mailbox holds.
    await admin.set_quota(engine, PER, 10 * KIB, actor="test")
    with pytest.raises(MailStoreError, match="12 KiB used of its 10 KiB quota\\)"):
        await store.copy(inbox.id, [1], trash.id)
    assert await store.move(inbox.id, [1], trash.id) == [(1, 1)]
    assert await store.usage(inbox.mailbox_id) == 12 * KIB


async def test_expunge_and_folder_deletion_give_the_room_back(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    await admin.set_quota(engine, PER, 10 * KIB, actor="test")
    per = await account(engine, PER)
    inbox = await folder(store, per, "INBOX")
    await append(store, inbox.id, 5 * KIB, 5 * KIB)
    with pytest.raises(MailStoreError, match="mailbox full"):
        await append(store, inbox.id, 1 * KIB)
    await store.store_flags(inbox.id, [1], mode="add", flags=frozenset({"\\Deleted"}))
    assert await store.expunge(inbox.id) == [1]
    assert await store.usage(inbox.mailbox_id) == 5 * KIB
    assert await append(store, inbox.id, 5 * KIB) == [3]
    await store.create_folder(per, "Dossiers")
    dossiers = await folder(store, per, "Dossiers")
    await store.move(inbox.id, [2, 3], dossiers.id)
    await store.delete_folder(per, "Dossiers")
    assert await store.usage(inbox.mailbox_id) == 0
    assert await append(store, inbox.id, 10 * KIB) == [4]


async def test_usage_counter_equals_the_placements_after_every_kind_of_write(
    engine: AsyncEngine,
) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    inbox, archive = await folder(store, per, "INBOX"), await folder(store, per, "Archive")
    shared = await folder(store, per, SHARED_INBOX)
    await append(store, inbox.id, 3000, 4000, 5000, 6000)
    await store.copy(inbox.id, [1, 2], archive.id)
    await store.move(inbox.id, [3], shared.id)
    await store.copy(shared.id, [1], shared.id)
    await store.store_flags(inbox.id, [1, 4], mode="add", flags=frozenset({"\\Deleted"}))
    await store.expunge(inbox.id, uids=[4])
    await store.rename_folder(per, "INBOX", "Ancien")
    await store.delete_folder(per, "Archive")
    committer = GroupCommitter(engine)
    committer.start()
    try:
        for n in range(3):
            await committer.store(delivery(sized(2000 + n, "smtp"), [await to(engine, PER)]))
    finally:
        await committer.stop()
    sums = await stored_sums(engine)
    # PER: 3000 and 4000 left in the renamed INBOX, and three deliveries; ORG: 5000 twice.
    assert sums[inbox.mailbox_id] == 7000 + 6003 and sums[shared.mailbox_id] == 10_000
    assert await counters(engine, store) == sums


async def test_concurrent_appends_never_share_the_last_free_space(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    await admin.set_quota(engine, PER, 10 * KIB, actor="test")
    per = await account(engine, PER)
    targets = [await folder(store, per, name) for name in ("INBOX", "Archive", "Drafts")]

    async def attempt(n: int) -> bool:
        try:
            await append(store, targets[n % 3].id, 4 * KIB, tag=f"c{n}-")
        except MailStoreError as error:
            assert error.code == "OVERQUOTA"
            return False
        return True

    outcomes = await asyncio.gather(*(attempt(n) for n in range(8)))
    assert outcomes.count(True) == 2
    assert await store.usage(targets[0].mailbox_id) == 8 * KIB
    assert await counters(engine, store) == await stored_sums(engine)


# -- deliveries (the group committer) ---------------------------------------------------


def delivery(
    content: bytes, recipients: list[RecipientRecord], source: str = "submission"
) -> NewMessage:
    return NewMessage(
        envelope_id=new_envelope_id(),
        content=content,
        sha256=hashlib.sha256(content).hexdigest(),
        mail_from=PER,
        recipients=tuple(recipients),
        source=source,
        remote="127.0.0.1",
        received_at=NOW,
    )


async def to(engine: AsyncEngine, address: str) -> RecipientRecord:
    mailbox = await StoreAccounts(engine).local_mailbox(address)
    assert mailbox is not None
    return RecipientRecord(mailbox.address, mailbox.id)


async def test_delivery_skips_a_full_mailbox_and_places_for_the_others(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    await admin.set_quota(engine, PER2, 4 * KIB, actor="test")
    per_inbox = await folder(store, await account(engine, PER), "INBOX")
    per2_inbox = await folder(store, await account(engine, PER2), "INBOX")
    await append(store, per2_inbox.id, 3 * KIB)
    committer = GroupCommitter(engine)
    committer.start()
    try:
        message = delivery(
            sized(2 * KIB, "pour deux"), [await to(engine, PER), await to(engine, PER2)]
        )
        stored = await committer.store(message)
        with pytest.raises(OverQuota) as refused:
            await committer.store(delivery(sized(2 * KIB, "pour un"), [await to(engine, PER2)]))
        # Reports mssd writes to its own senders are placed even in a full mailbox.
        report = await committer.store(
            delivery(sized(2 * KIB, "rapport"), [await to(engine, PER2)], source="report")
        )
    finally:
        await committer.stop()
    assert [p.folder_id for p in stored.placements] == [per_inbox.id]
    assert [(r.address, r.reason) for r in stored.over_quota] == [
        (PER2, "mailbox full (3 KiB used of its 4 KiB quota, 2 KiB more do not fit)")
    ]
    assert refused.value.text == (
        f"{PER2}: mailbox full (3 KiB used of its 4 KiB quota, 2 KiB more do not fit)"
    )
    assert len(report.placements) == 1
    assert await store.usage(per2_inbox.mailbox_id) == 5 * KIB
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(envelope_recipients.c.address, envelope_recipients.c.status).where(
                envelope_recipients.c.envelope_id == message.envelope_id
            )
        )
        statuses = {address: status for address, status in rows}
        envelope_ids = set(await conn.scalars(select(envelopes.c.id)))
    assert statuses == {PER: "delivered", PER2: "over_quota"}
    # The message nobody could take left nothing behind.
    assert envelope_ids == {message.envelope_id, report.envelope_id}
    assert not await blob_exists(engine, sized(2 * KIB, "pour un"))


# -- migration 0006 ---------------------------------------------------------------------


async def test_migration_starts_the_counters_from_the_stored_placements(
    engine: AsyncEngine,
) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    inbox, shared = await folder(store, per, "INBOX"), await folder(store, per, SHARED_INBOX)
    await append(store, inbox.id, 3000, 7000)
    await append(store, shared.id, 1500)

    def migrate(connection: Connection, revision: str) -> None:
        step = command.downgrade if revision == "0005" else command.upgrade
        step(_alembic_config(connection), revision)

    async with engine.begin() as conn:
        await conn.run_sync(migrate, "0005")
    async with engine.begin() as conn:
        await conn.run_sync(migrate, "0006")
    usage = await counters(engine, store)
    assert usage == await stored_sums(engine)
    assert (usage[inbox.mailbox_id], usage[shared.mailbox_id]) == (10_000, 1500)
