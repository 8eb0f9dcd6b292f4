"""The IMAP view of the store (mssd.store.mailstore) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import (
    ORG,
    PER,
    PER2,
    SUSPENDED,
    PkiBundle,
    _asyncpg_dsn,
    _postgres_admin_url,
    seed,
    store_url_for,
)
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store import admin
from mssd.store.accounts import StoreAccounts
from mssd.store.changes import FolderChange
from mssd.store.engine import create_engine
from mssd.store.mailstore import SHARED_PREFIX, FolderInfo, MailStore, MailStoreError
from mssd.store.schema import blobs, expunges, folders, placements

NOW = dt.datetime(2026, 11, 28, 9, 30, tzinfo=dt.UTC)
SHARED_ORG = f"{SHARED_PREFIX}/{ORG}"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[str]:
    """The standard population, seeded once per backend; tests work on copies."""
    for url in store_url_for(request.param, tmp_path_factory.mktemp(f"seed-{request.param}")):
        asyncio.run(seed(url, test_pki))
        yield url


@pytest.fixture
async def engine(seeded: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A fresh copy of the seeded store: a file copy, or CREATE DATABASE ... TEMPLATE."""
    if seeded.startswith("sqlite"):
        source = Path(seeded.split(":///", 1)[1])
        shutil.copyfile(source, tmp_path / "mssd.db")
        url, name = f"sqlite+aiosqlite:///{tmp_path / 'mssd.db'}", None
    else:
        name = f"mssd_test_{secrets.token_hex(6)}"
        template = seeded.rpartition("/")[2]
        admin_url = _postgres_admin_url()
        assert admin_url is not None
        conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        finally:
            await conn.close()
        url = f"{seeded.rpartition('/')[0]}/{name}"
    engine = create_engine(url)
    yield engine
    await engine.dispose()
    if name is not None:
        conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def account(engine: AsyncEngine, login: str) -> int:
    found = await StoreAccounts(engine).by_login(login)
    assert found is not None
    return found.id


async def folder(store: MailStore, account_id: int, name: str) -> FolderInfo:
    info = await store.folder(account_id, name)
    assert info is not None, name
    return info


def message(n: int) -> bytes:
    return f"Subject: message {n}\r\n\r\ncorps {n}\r\n".encode()


async def fill(store: MailStore, folder_id: int, count: int) -> list[int]:
    return [
        await store.append(folder_id, message(n), flags=frozenset(), internal_date=NOW)
        for n in range(count)
    ]


async def test_account_sees_own_folders_and_the_shared_ones_its_delegations_allow(
    engine: AsyncEngine,
) -> None:
    store = MailStore(engine)
    per, per2 = await account(engine, PER), await account(engine, PER2)
    names = [f.name for f in await store.folders(per)]
    assert names[:2] == ["INBOX", "Archive"]
    assert {"Sent", "Drafts", "Trash", "Junk"} <= set(names)
    assert f"{SHARED_ORG}/INBOX" in names
    shared = await folder(store, per, f"{SHARED_ORG}/INBOX")
    assert (shared.rights, shared.mailbox_address) == ("lrswipte", ORG)
    assert (await folder(store, per2, f"{SHARED_ORG}/Sent")).rights == "lr"
    assert (await folder(store, per, "INBOX")).rights == "lrswipkxtea"

    await admin.grant(engine, ORG, PER2, rights="r", may_send=False, actor="test")
    assert not any(f.name.startswith(SHARED_PREFIX) for f in await store.folders(per2))
    assert await store.folder(per2, f"{SHARED_ORG}/INBOX") is None

    await admin.revoke(engine, ORG, PER, actor="test")
    assert await store.folder(per, f"{SHARED_ORG}/INBOX") is None

    suspended = await account(engine, SUSPENDED)
    assert await store.folders(suspended) == []


async def test_suspended_shared_mailbox_disappears(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    await admin.set_mailbox_status(engine, ORG, "suspended", actor="test")
    assert not any(f.name.startswith(SHARED_PREFIX) for f in await store.folders(per))


async def test_inbox_is_case_insensitive(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    assert (await folder(store, per, "inBox")).name == "INBOX"
    created = await store.create_folder(per, "inbox/Patients")
    assert created.name == "INBOX/Patients"
    assert (await folder(store, per, "Inbox/Patients")).id == created.id


async def test_uids_ascend_and_are_never_reused_after_expunge(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    inbox = await folder(store, await account(engine, PER), "INBOX")
    assert await fill(store, inbox.id, 3) == [1, 2, 3]
    await store.store_flags(
        inbox.id, [3], mode="add", flags=frozenset({"\\Deleted"}), unchanged_since=None
    )
    assert await store.expunge(inbox.id) == [3]
    assert await fill(store, inbox.id, 1) == [4]
    snapshot = await store.snapshot(inbox.id)
    assert [uid for uid, _, _ in snapshot.messages] == [1, 2, 4]
    assert snapshot.uidnext == 5
    modseqs = [modseq for _, _, modseq in snapshot.messages]
    assert modseqs == sorted(modseqs) and len(set(modseqs)) == 3
    assert snapshot.highestmodseq == max(modseqs)


async def test_store_flags_gives_each_changed_message_a_new_modseq(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    inbox = await folder(store, await account(engine, PER), "INBOX")
    await fill(store, inbox.id, 3)
    before = await store.snapshot(inbox.id)
    result = await store.store_flags(
        inbox.id, [1, 2, 3, 99], mode="add", flags=frozenset({"\\seen"}), unchanged_since=None
    )
    assert [(s.uid, s.flags) for s in result.updated] == [(u, {"\\Seen"}) for u in (1, 2, 3)]
    assert [s.modseq for s in result.updated] == [
        before.highestmodseq + 1,
        before.highestmodseq + 2,
        before.highestmodseq + 3,
    ]
    again = await store.store_flags(
        inbox.id, [1], mode="add", flags=frozenset({"\\Seen"}), unchanged_since=None
    )
    assert again.updated == () and again.unchanged[0].modseq == before.highestmodseq + 1
    assert (await store.snapshot(inbox.id)).highestmodseq == before.highestmodseq + 3
    removed = await store.store_flags(
        inbox.id, [2], mode="remove", flags=frozenset({"\\Seen"}), unchanged_since=None
    )
    assert removed.updated[0].flags == frozenset()
    replaced = await store.store_flags(
        inbox.id, [3], mode="set", flags=frozenset({"$Urgent", "\\Flagged"}), unchanged_since=None
    )
    assert replaced.updated[0].flags == {"$Urgent", "\\Flagged"}
    rows = await store.messages(inbox.id, [3, 1])
    assert [(r.uid, r.flags) for r in rows] == [(1, {"\\Seen"}), (3, {"$Urgent", "\\Flagged"})]
    assert rows[0].internal_date == NOW and rows[0].size == len(message(0))


async def test_unchangedsince_conflicts_are_reported_as_modified(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    inbox = await folder(store, await account(engine, PER), "INBOX")
    await fill(store, inbox.id, 3)
    seen_at = (await store.snapshot(inbox.id)).highestmodseq
    await store.store_flags(
        inbox.id, [2], mode="add", flags=frozenset({"\\Flagged"}), unchanged_since=None
    )
    result = await store.store_flags(
        inbox.id, [1, 2, 3], mode="add", flags=frozenset({"\\Seen"}), unchanged_since=seen_at
    )
    assert result.modified == (2,)  # RFC 7162 §3.1.3: [MODIFIED 2]
    assert [s.uid for s in result.updated] == [1, 3]
    assert (await store.messages(inbox.id, [2]))[0].flags == {"\\Flagged"}
    zero = await store.store_flags(
        inbox.id, [1], mode="add", flags=frozenset({"x"}), unchanged_since=0
    )
    assert zero.modified == (1,)


async def test_expunge_records_vanished_uids_with_new_modseqs(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    inbox = await folder(store, await account(engine, PER), "INBOX")
    await fill(store, inbox.id, 5)
    await store.store_flags(
        inbox.id, [1, 2, 4, 5], mode="add", flags=frozenset({"\\Deleted"}), unchanged_since=None
    )
    mark = (await store.snapshot(inbox.id)).highestmodseq
    assert await store.expunge(inbox.id, uids=[2, 3, 4]) == [2, 4]  # RFC 4315 UID EXPUNGE
    assert await store.expunge(inbox.id) == [1, 5]
    changed, vanished = await store.changes_since(inbox.id, mark)
    assert changed == [] and vanished == [1, 2, 4, 5]
    async with engine.connect() as conn:
        modseqs = list(
            await conn.scalars(
                select(expunges.c.modseq)
                .where(expunges.c.folder_id == inbox.id)
                .order_by(expunges.c.modseq)
            )
        )
    assert modseqs == list(range(mark + 1, mark + 5))
    assert (await store.snapshot(inbox.id)).highestmodseq == mark + 4
    await store.store_flags(
        inbox.id, [3], mode="add", flags=frozenset({"\\Seen"}), unchanged_since=None
    )
    changed, vanished = await store.changes_since(inbox.id, mark + 4)
    assert [m.uid for m in changed] == [3] and vanished == []


async def test_copy_and_move_share_the_blob_and_allocate_copyuids_ascending(
    engine: AsyncEngine,
) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    inbox, archive = await folder(store, per, "INBOX"), await folder(store, per, "Archive")
    await fill(store, inbox.id, 4)
    await fill(store, archive.id, 2)
    await store.store_flags(
        inbox.id, [3], mode="add", flags=frozenset({"\\Seen"}), unchanged_since=None
    )
    assert await store.copy(inbox.id, [4, 1, 3], archive.id) == [(1, 3), (3, 4), (4, 5)]
    copied = await store.messages(archive.id, [4])
    assert copied[0].flags == {"\\Seen"} and copied[0].internal_date == NOW
    assert await store.move(inbox.id, [2, 3], archive.id) == [(2, 6), (3, 7)]
    assert [u for u, _, _ in (await store.snapshot(inbox.id)).messages] == [1, 4]
    assert (await store.changes_since(inbox.id, 0))[1] == [2, 3]
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(blobs)) == 4
    # 2 left in INBOX, 2 + 3 copied + 2 moved in Archive: 9 placements of 31 octets.
    assert await store.usage(inbox.mailbox_id) == 9 * len(message(0))
    assert await store.blob((await store.messages(archive.id, [7]))[0].sha256) == message(2)


async def test_usage_counts_every_placement(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    inbox, archive = await folder(store, per, "INBOX"), await folder(store, per, "Archive")
    await fill(store, inbox.id, 2)
    await store.copy(inbox.id, [1], archive.id)
    assert await store.usage(inbox.mailbox_id) == 2 * len(message(0)) + len(message(1))


async def test_move_is_atomic(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    inbox, archive = await folder(store, per, "INBOX"), await folder(store, per, "Archive")
    await fill(store, inbox.id, 2)
    # Sabotage: a placement sits where the move's first destination UID will go.
    sha = (await store.messages(inbox.id, [1]))[0].sha256
    async with engine.begin() as conn:
        await conn.execute(
            insert(placements).values(
                folder_id=archive.id,
                uid=1,
                blob_sha256=sha,
                flags="",
                modseq=1,
                internal_date=NOW,
                size=1,
            )
        )
    before = await store.snapshot(inbox.id)
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await store.move(inbox.id, [1, 2], archive.id)
    assert await store.snapshot(inbox.id) == before
    assert (await store.changes_since(inbox.id, 0))[1] == []


async def test_move_within_one_folder_renumbers(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    inbox = await folder(store, await account(engine, PER), "INBOX")
    await fill(store, inbox.id, 2)
    assert await store.move(inbox.id, [1], inbox.id) == [(1, 3)]
    assert [u for u, _, _ in (await store.snapshot(inbox.id)).messages] == [2, 3]


async def test_renaming_inbox_moves_its_messages_and_leaves_it_empty(engine: AsyncEngine) -> None:
    changes: list[FolderChange] = []
    store = MailStore(engine, on_change=changes.append)
    per = await account(engine, PER)
    inbox = await folder(store, per, "INBOX")
    child = await store.create_folder(per, "INBOX/Suivi")
    await fill(store, inbox.id, 3)
    await store.rename_folder(per, "inbox", "Anciens/2026")
    old = await folder(store, per, "Anciens/2026")
    assert await folder(store, per, "Anciens")
    assert [u for u, _, _ in (await store.snapshot(old.id)).messages] == [1, 2, 3]
    assert old.uidnext == 4 and old.uidvalidity != inbox.uidvalidity
    emptied = await store.snapshot(inbox.id)
    assert emptied.messages == () and emptied.uidnext == 4  # UIDs are not reused
    assert (await store.changes_since(inbox.id, inbox.highestmodseq))[1] == [1, 2, 3]
    assert (await folder(store, per, "INBOX/Suivi")).id == child.id  # RFC 9051 §6.3.6
    assert await fill(store, inbox.id, 1) == [4]
    assert FolderChange(inbox.id, emptied.highestmodseq, "expunge") in changes


async def test_rename_moves_children_and_changes_uidvalidity(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    parent = await store.create_folder(per, "Patients/Dupont")
    top = await folder(store, per, "Patients")
    await fill(store, parent.id, 1)
    await store.rename_folder(per, "Patients", "Dossiers")
    assert await store.folder(per, "Patients") is None
    moved = await folder(store, per, "Dossiers/Dupont")
    assert moved.id == parent.id and moved.uidvalidity not in (parent.uidvalidity, top.uidvalidity)
    assert (await folder(store, per, "Dossiers")).id == top.id
    assert [u for u, _, _ in (await store.snapshot(moved.id)).messages] == [1]


async def test_folder_errors_carry_imap_response_codes(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    per, per2 = await account(engine, PER), await account(engine, PER2)
    await store.create_folder(per, "Projets/")
    await store.create_folder(per, "Projets/A")
    cases = [
        (store.create_folder(per, "Sent"), "ALREADYEXISTS"),
        (store.create_folder(per, "a//b"), "CANNOT"),
        (store.create_folder(per, "x*"), "CANNOT"),
        (store.create_folder(per, f"{SHARED_PREFIX}/perso"), "NONEXISTENT"),
        (store.create_folder(per, SHARED_PREFIX), "CANNOT"),
        (store.create_folder(per, f"{SHARED_ORG}"), "CANNOT"),
        (store.create_folder(per, f"{SHARED_ORG}/Nouveau"), "NOPERM"),  # "k" not granted
        (store.create_folder(per2, f"{SHARED_ORG}/Nouveau"), "NOPERM"),
        (store.delete_folder(per, "INBOX"), "CANNOT"),
        (store.delete_folder(per, "Absent"), "NONEXISTENT"),
        (store.delete_folder(per, "Projets"), "HASCHILDREN"),
        (store.delete_folder(per2, f"{SHARED_ORG}/Sent"), "NOPERM"),
        (store.rename_folder(per, "Absent", "Autre"), "NONEXISTENT"),
        (store.rename_folder(per, "Sent", "Drafts"), "ALREADYEXISTS"),
        (store.rename_folder(per, "Projets", "Projets/A/B"), "CANNOT"),
        (store.rename_folder(per, "Sent", f"{SHARED_ORG}/Sent2"), "CANNOT"),
        (store.set_subscribed(per, "Absent", True), "NONEXISTENT"),
    ]
    for call, code in cases:
        with pytest.raises(MailStoreError) as raised:
            await call
        assert raised.value.code == code, raised.value.text


async def test_delegate_with_k_and_x_manages_shared_folders(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    await admin.grant(engine, ORG, PER, rights="lrswipkxte", may_send=True, actor="test")
    created = await store.create_folder(per, f"{SHARED_ORG}/Ordonnances")
    assert created.name == f"{SHARED_ORG}/Ordonnances" and created.mailbox_address == ORG
    org_account = await account(engine, ORG)
    assert (await folder(store, org_account, "Ordonnances")).id == created.id
    await store.rename_folder(per, f"{SHARED_ORG}/Ordonnances", f"{SHARED_ORG}/Ordo")
    await store.delete_folder(per, f"{SHARED_ORG}/Ordo")
    assert await store.folder(org_account, "Ordo") is None


async def test_deleting_a_folder_removes_its_messages_but_keeps_blobs(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    created = await store.create_folder(per, "Temporaire")
    await fill(store, created.id, 2)
    await store.delete_folder(per, "Temporaire")
    async with engine.connect() as conn:
        assert (
            await conn.scalar(select(func.count()).where(placements.c.folder_id == created.id)) == 0
        )
        assert await conn.scalar(select(func.count()).select_from(blobs)) == 2
    again = await store.create_folder(per, "Temporaire")
    assert again.uidvalidity != created.uidvalidity and again.uidnext == 1


async def test_recreated_folder_never_gets_an_old_uidvalidity(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    per = await account(engine, PER)
    # Archive holds the mailbox's highest UIDVALIDITY (folders made in one burst).
    archive = await folder(store, per, "Archive")
    await store.delete_folder(per, "Archive")
    assert (await store.create_folder(per, "Archive")).uidvalidity > archive.uidvalidity


async def test_subscriptions(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    per, per2 = await account(engine, PER), await account(engine, PER2)
    await store.set_subscribed(per, "Junk", False)
    assert not (await folder(store, per, "Junk")).subscribed
    await store.set_subscribed(per2, f"{SHARED_ORG}/Junk", False)  # accepted, not stored
    assert (await folder(store, await account(engine, ORG), "Junk")).subscribed


async def test_concurrent_appends_get_distinct_consecutive_uids(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    inbox = await folder(store, await account(engine, PER), "INBOX")
    uids = await asyncio.gather(
        *(
            store.append(inbox.id, message(n), flags=frozenset(), internal_date=NOW)
            for n in range(20)
        )
    )
    assert sorted(uids) == list(range(1, 21))
    snapshot = await store.snapshot(inbox.id)
    assert len({modseq for _, _, modseq in snapshot.messages}) == 20
    assert snapshot.highestmodseq == inbox.highestmodseq + 20


async def test_concurrent_writers_keep_modseqs_unique_and_increasing(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    inbox = await folder(store, await account(engine, PER), "INBOX")
    await fill(store, inbox.id, 10)

    async def flagger(n: int) -> None:
        for round_ in range(3):
            await store.store_flags(
                inbox.id,
                [n + 1, 10 - n],
                mode="set",
                flags=frozenset({f"k{n}-{round_}"}),
                unchanged_since=None,
            )

    async def deleter() -> None:
        await store.store_flags(
            inbox.id, [5], mode="add", flags=frozenset({"\\Deleted"}), unchanged_since=None
        )
        await store.expunge(inbox.id, uids=[5])

    await asyncio.gather(
        *(flagger(n) for n in range(4)),
        deleter(),
        *(
            store.append(inbox.id, message(100 + n), flags=frozenset(), internal_date=NOW)
            for n in range(5)
        ),
    )
    snapshot = await store.snapshot(inbox.id)
    async with engine.connect() as conn:
        expunged = list(
            await conn.scalars(select(expunges.c.modseq).where(expunges.c.folder_id == inbox.id))
        )
    modseqs = [m for _, _, m in snapshot.messages] + expunged
    assert len(modseqs) == len(set(modseqs)), "two changes share a modseq"
    assert snapshot.highestmodseq == max(modseqs)
    assert [u for u, _, _ in snapshot.messages] == [1, 2, 3, 4, 6, 7, 8, 9, 10, *range(11, 16)]


async def test_snapshot_of_ten_thousand_messages(engine: AsyncEngine) -> None:
    store = MailStore(engine)
    inbox = await folder(store, await account(engine, PER), "INBOX")
    sha = hashlib.sha256(b"x").hexdigest()
    async with engine.begin() as conn:
        await conn.execute(insert(blobs).values(sha256=sha, size=1, data=b"x", created_at=NOW))
        await conn.execute(
            insert(placements),
            [
                {
                    "folder_id": inbox.id,
                    "uid": uid,
                    "blob_sha256": sha,
                    "flags": "\\Seen" if uid % 2 else "",
                    "modseq": uid + 1,
                    "internal_date": NOW,
                    "size": 1,
                }
                for uid in range(1, 10_001)
            ],
        )
        await conn.execute(
            update(folders)
            .where(folders.c.id == inbox.id)
            .values(uidnext=10_001, highestmodseq=10_001)
        )
    snapshot = await store.snapshot(inbox.id)
    assert len(snapshot.messages) == 10_000
    assert snapshot.messages[0] == (1, frozenset({"\\Seen"}), 2)
    assert snapshot.messages[-1] == (10_000, frozenset(), 10_001)
    assert (snapshot.uidnext, snapshot.highestmodseq) == (10_001, 10_001)
    assert len(await store.messages(inbox.id, range(1, 10_001))) == 10_000


async def test_changes_are_reported_after_commit(engine: AsyncEngine) -> None:
    seen: list[FolderChange] = []
    store = MailStore(engine, on_change=seen.append)
    per = await account(engine, PER)
    inbox, archive = await folder(store, per, "INBOX"), await folder(store, per, "Archive")
    await fill(store, inbox.id, 2)
    await store.store_flags(
        inbox.id, [1], mode="add", flags=frozenset({"\\Deleted"}), unchanged_since=None
    )
    await store.expunge(inbox.id)
    await store.move(inbox.id, [2], archive.id)
    assert [(c.folder_id, c.kind) for c in seen] == [
        (inbox.id, "exists"),
        (inbox.id, "exists"),
        (inbox.id, "flags"),
        (inbox.id, "expunge"),
        (archive.id, "exists"),
        (inbox.id, "expunge"),
    ]
    assert seen[-1].modseq == (await store.snapshot(inbox.id)).highestmodseq
