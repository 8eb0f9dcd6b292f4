"""The store on SQLite and PostgreSQL: schema, group commit, UIDs, audit."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import AsyncIterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import ORG, PER, PER2, PkiBundle, new_message, seed
from sqlalchemy import Connection, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store.accounts import StoreAccounts
from mssd.store.delivery import GroupCommitter, RecipientRecord
from mssd.store.engine import SchemaError, check_schema, create_engine
from mssd.store.messages import folder_states, list_messages, read_blob
from mssd.store.records import AuditEvent
from mssd.store.schema import audit, blobs, metadata


@pytest.fixture
async def engine(store_url: str, test_pki: PkiBundle) -> AsyncIterator[AsyncEngine]:
    await seed(store_url, test_pki)
    engine = create_engine(store_url)
    yield engine
    await engine.dispose()


async def recipient(engine: AsyncEngine, address: str) -> RecipientRecord:
    mailbox = await StoreAccounts(engine).local_mailbox(address)
    assert mailbox is not None
    return RecipientRecord(address=address, mailbox_id=mailbox.id)


async def test_migrations_match_the_schema_module(engine: AsyncEngine) -> None:
    await check_schema(engine)

    def differences(connection: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(connection), metadata))

    async with engine.connect() as conn:
        assert await conn.run_sync(differences) == []


async def test_upgrade_stores_hosted_idn_domains_as_a_labels(store_url: str) -> None:
    # Before 0007, `mssd domain add` stored an IDN domain as typed (U-labels).
    from alembic import command

    from mssd.store.engine import _alembic_config, upgrade

    engine = create_engine(store_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.upgrade(_alembic_config(sync), "0005"))
            now = dt.datetime.now(dt.UTC)
            await conn.execute(
                text("INSERT INTO domains (id, name, created_at) VALUES (7, :n, :t)"),
                {"n": "hôpital-é.test", "t": now},
            )
            await conn.execute(
                text(
                    "INSERT INTO accounts (id, login, status, created_at) "
                    "VALUES (9, 'accueil@hôpital-é.test', 'active', :t)"
                ),
                {"t": now},
            )
            await conn.execute(
                text(
                    "INSERT INTO mailboxes (address, domain_id, bal_type, status, owner_idnat,"
                    " account_id, created_at, updated_at) VALUES"
                    " ('accueil@hôpital-é.test', 7, 'ORG', 'active', '1750000001', 9, :t, :t)"
                ),
                {"t": now},
            )
        await upgrade(engine)
        async with engine.connect() as conn:
            a_label = "hôpital-é.test".encode("idna").decode()
            assert (await conn.execute(text("SELECT name FROM domains"))).scalar() == a_label
            assert (await conn.execute(text("SELECT address FROM mailboxes"))).scalar() == (
                f"accueil@{a_label}"
            )
            assert (await conn.execute(text("SELECT login FROM accounts"))).scalar() == (
                f"accueil@{a_label}"
            )
    finally:
        await engine.dispose()


async def test_unknown_schema_revision_is_refused(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    with pytest.raises(SchemaError, match="unknown to this mssd"):
        await check_schema(engine)


async def test_audit_rows_cannot_be_changed_or_deleted(engine: AsyncEngine) -> None:
    for statement in (audit.update().values(result="tampered"), audit.delete()):
        with pytest.raises(Exception, match="append-only"):
            async with engine.begin() as conn:
                await conn.execute(statement)
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(audit)) > 0
        assert await conn.scalar(select(func.count()).where(audit.c.result == "tampered")) == 0


async def test_concurrent_deliveries_get_unique_consecutive_uids(engine: AsyncEngine) -> None:
    committed: list[int] = []
    committer = GroupCommitter(
        engine, max_batch=16, on_commit=lambda results: committed.append(len(results))
    )
    committer.start()
    try:
        to_per2 = await recipient(engine, PER2)
        to_org = await recipient(engine, ORG)
        stored = await asyncio.gather(
            *(
                committer.store(
                    new_message(f"Subject: {i}\r\n\r\n{i}\r\n".encode(), [to_per2, to_org])
                )
                for i in range(100)
            )
        )
    finally:
        await committer.stop()
    assert sum(committed) == 100
    assert len(committed) < 100, "concurrent messages should share commits"
    for address in (PER2, ORG):
        uids = [m.uid for m in await list_messages(engine, address, folder="INBOX")]
        assert uids == list(range(1, 101))
        inbox = next(f for f in await folder_states(engine, address) if f.name == "INBOX")
        assert inbox.uidnext == 101
        assert inbox.highestmodseq == 101
    placements = [p for s in stored for p in s.placements]
    assert len({(p.folder_id, p.uid) for p in placements}) == 200


async def test_identical_content_is_stored_once(engine: AsyncEngine) -> None:
    committer = GroupCommitter(engine)
    committer.start()
    body = b"Subject: meme contenu\r\n\r\nidentique\r\n"
    try:
        await committer.store(new_message(body, [await recipient(engine, PER2)]))
        await committer.store(new_message(body, [await recipient(engine, ORG)]))
    finally:
        await committer.stop()
    digest = hashlib.sha256(body).hexdigest()
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).where(blobs.c.sha256 == digest)) == 1
    assert await read_blob(engine, digest) == body


async def test_one_failing_message_does_not_fail_its_batch(engine: AsyncEngine) -> None:
    committer = GroupCommitter(engine)
    committer.start()
    good = await recipient(engine, PER2)
    broken = RecipientRecord(address="ghost@hopital.mssd.test", mailbox_id=999999)
    try:
        results = await asyncio.gather(
            committer.store(new_message(b"Subject: a\r\n\r\na\r\n", [good])),
            committer.store(new_message(b"Subject: b\r\n\r\nb\r\n", [broken])),
            committer.store(new_message(b"Subject: c\r\n\r\nc\r\n", [good])),
            return_exceptions=True,
        )
    finally:
        await committer.stop()
    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], LookupError)
    assert not isinstance(results[2], BaseException)
    assert len(await list_messages(engine, PER2, folder="INBOX")) == 2


async def test_sender_rights(engine: AsyncEngine) -> None:
    accounts = StoreAccounts(engine)
    per = await accounts.by_login(PER.upper())
    per2 = await accounts.by_idnat_ps("810000000029")
    assert per is not None and per2 is not None
    assert await accounts.sendable_addresses(per.id) == {PER, ORG}
    assert await accounts.sendable_addresses(per2.id) == {PER2}


async def test_one_time_code_step_is_claimed_once(engine: AsyncEngine) -> None:
    accounts = StoreAccounts(engine)
    per = await accounts.by_login(PER)
    assert per is not None
    claims = await asyncio.gather(*(accounts.claim_totp_step(per.id, 1000) for _ in range(5)))
    assert sorted(claims) == [False, False, False, False, True]
    assert not await accounts.claim_totp_step(per.id, 999)
    assert await accounts.claim_totp_step(per.id, 1001)


async def test_audit_events_ride_along_with_deliveries(engine: AsyncEngine) -> None:
    commits: list[int] = []
    committer = GroupCommitter(engine, on_commit=lambda results: commits.append(len(results)))
    committer.start()
    to_per2 = await recipient(engine, PER2)
    try:
        await asyncio.gather(
            *(
                committer.record(AuditEvent(actor=f"guess{i}", action="auth.failure"))
                for i in range(50)
            ),
            committer.store(new_message(b"Subject: x\r\n\r\nx\r\n", [to_per2])),
        )
    finally:
        await committer.stop()
    async with engine.connect() as conn:
        count = await conn.scalar(
            select(func.count()).where(
                audit.c.action == "auth.failure", audit.c.actor.like("guess%")
            )
        )
    assert count == 50
    assert sum(commits) == 1  # on_commit hears about messages only
