"""The fast path of the hot store statements (mssd.store.fastpath): the same rows as
SQLAlchemy's own execution of the same statement, on SQLite and PostgreSQL, and
the same transactions (a write that fails leaves nothing behind)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store import mailstore as ms
from mssd.store.audit import audit_row, write_audit_rows
from mssd.store.engine import create_engine, dispose, run_read, run_write, upgrade
from mssd.store.fastpath import FastInsert, FastStatement, size_class
from mssd.store.records import AuditEvent
from mssd.store.schema import (
    accounts,
    audit,
    blobs,
    delegations,
    domains,
    expunges,
    folders,
    mailboxes,
    placements,
)

NOW = dt.datetime(2026, 11, 28, 9, 30, 15, 123456, tzinfo=dt.UTC)
MESSAGES = 1200
"""Placements in the full folder: more than one chunk of ``IN`` values."""


def digest(n: int) -> str:
    return hashlib.sha256(f"message {n}".encode()).hexdigest()


def populate(conn: Connection) -> None:
    """Two accounts, a PER and an ORG mailbox (delegated), a full folder with
    flags, dates and expunges, an empty folder without special use (NULL)."""
    conn.execute(insert(domains).values(id=1, name="example.test", created_at=NOW))
    conn.execute(
        insert(accounts),
        [
            {"id": i, "login": f"user{i}@example.test", "status": "active", "created_at": NOW}
            for i in (1, 2)
        ],
    )
    conn.execute(
        insert(mailboxes),
        [
            {
                "id": i,
                "address": address,
                "domain_id": 1,
                "bal_type": bal_type,
                "status": "active",
                "owner_idnat": "810000000001",
                "account_id": i,
                "created_at": NOW,
                "updated_at": NOW,
            }
            for i, address, bal_type in ((1, "user1@example.test", "PER"), (2, "org@x", "ORG"))
        ],
    )
    conn.execute(
        insert(delegations).values(
            mailbox_id=2, account_id=1, rights="lrs", may_send=False, created_at=NOW
        )
    )
    conn.execute(
        insert(folders),
        [
            {
                "id": 1,
                "mailbox_id": 1,
                "name": "INBOX",
                "uidvalidity": 7,
                "uidnext": MESSAGES + 1,
                "highestmodseq": MESSAGES + 100,
                "special_use": "\\Inbox",
                "subscribed": True,
            },
            {
                "id": 2,
                "mailbox_id": 1,
                "name": "Empty",
                "uidvalidity": 8,
                "uidnext": 1,
                "highestmodseq": 1,
                "special_use": None,
                "subscribed": False,
            },
        ],
    )
    conn.execute(
        insert(blobs),
        [
            {
                "sha256": digest(n),
                "size": 20 + n,
                "data": f"message {n}".encode() + b"\x00\xff" * n,
                "created_at": NOW,
            }
            for n in range(20)
        ],
    )
    flag_sets = ["", "\\Seen", "\\Deleted \\Seen", "$Label \\Flagged", "\\Deleted"]
    conn.execute(
        insert(placements),
        [
            {
                "folder_id": 1,
                "uid": uid,
                "blob_sha256": digest(uid % 20),
                "flags": flag_sets[uid % len(flag_sets)],
                "modseq": uid + 1,
                "internal_date": NOW - dt.timedelta(days=uid, microseconds=uid),
                "size": 20 + uid % 20,
            }
            for uid in range(1, MESSAGES + 1)
        ],
    )
    conn.execute(
        insert(expunges),
        [
            {"folder_id": 1, "uid": 5000 + i, "modseq": MESSAGES + 10 + i, "expunged_at": NOW}
            for i in range(30)
        ],
    )


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(store_url)
    await upgrade(engine)
    await run_write(engine, populate)
    yield engine
    await dispose(engine)


def lengths() -> list[int]:
    """Expanding list lengths around the padded sizes, up to past one chunk."""
    return [1, 2, 3, 5, 8, 9, 16, 17, 63, 65, 200, 257, 1000, 1024, 1025]


def uid_lists() -> list[list[int]]:
    # Present and absent UIDs, out of order, some repeated.
    return [[(7 * i) % 1500 + 1 for i in range(n)] for n in lengths()] + [[3, 3, 3, 1]]


def digest_lists() -> list[list[str]]:
    return [[digest(i % 25) for i in range(n)] for n in (1, 2, 3, 7, 20, 25, 40)]


def cases() -> list[tuple[str, FastStatement, Mapping[str, Any]]]:
    found: list[tuple[str, FastStatement, Mapping[str, Any]]] = []
    for uids in uid_lists():
        for name in ("_MESSAGES_IN", "_PLACEMENT_FLAGS", "_DELETED_IN", "_TRANSFERRED"):
            found.append((name, getattr(ms, name), {"b_folder": 1, "b_uids": uids}))
    for digests in digest_lists():
        found.append(("_BLOBS", ms._BLOBS, {"b_digests": digests}))
        found.append(("_BLOB_HEADS", ms._BLOB_HEADS, {"b_digests": digests, "b_limit": 9}))
    for low, high in ((1, 1), (1, 10), (100, 2000), (2000, 3000)):
        params = {"b_folder": 1, "b_low": low, "b_high": high}
        found.append(("_MESSAGES_BETWEEN", ms._MESSAGES_BETWEEN, params))
    for modseq in (0, MESSAGES - 5, MESSAGES + 20, 10**6):
        found.append(("_CHANGED", ms._CHANGED, {"b_folder": 1, "b_modseq": modseq}))
        found.append(("_EXPUNGED", ms._EXPUNGED, {"b_folder": 1, "b_modseq": modseq}))
    for folder_id in (1, 2, 3):  # full, empty (NULLs from the outer join), missing
        found.append(("_SNAPSHOT", ms._SNAPSHOT, {"b_folder": folder_id}))
        found.append(("_DELETED", ms._DELETED, {"b_folder": folder_id}))
    for ids in ([1], [2, 1], [1, 2, 3], [9]):
        found.append(("_READ_COUNTERS", ms._READ_COUNTERS, {"b_ids": ids}))
    for mailbox_id, name in ((1, "INBOX"), (1, "Empty"), (1, "nothing"), (2, "INBOX")):
        params = {"b_mailbox": mailbox_id, "b_name": name}
        found.append(("_FOLDER_BY_NAME", ms._FOLDER_BY_NAME, params))
    found.append(("_FOLDERS_OF", ms._FOLDERS_OF, {"b_mailboxes": [1, 2]}))
    for account_id in (1, 2, 3):
        found.append(("_OWN_MAILBOXES", ms._OWN_MAILBOXES, {"b_account": account_id}))
        params = {"b_account": account_id}
        found.append(("_DELEGATED_MAILBOXES", ms._DELEGATED_MAILBOXES, params))
    return found


def assert_same(
    fast: Sequence[tuple[Any, ...]], reference: Sequence[tuple[Any, ...]], label: str = ""
) -> None:
    assert fast == reference, label
    for fast_row, reference_row in zip(fast, reference, strict=True):
        assert type(fast_row) is tuple, label
        assert [type(v) for v in fast_row] == [type(v) for v in reference_row], label


async def test_every_hot_read_returns_what_sqlalchemy_returns(engine: AsyncEngine) -> None:
    def compare(conn: Connection) -> int:
        compared = 0
        for name, statement, params in cases():
            reference = [tuple(row) for row in conn.execute(statement.statement, params)]
            fast = statement.rows(conn, params)
            assert_same(fast, reference, f"{name} {params}")
            compared += len(fast)
        return compared

    # On SQLite: the event loop's kept sqlite3 connection, then a reader thread;
    # on PostgreSQL: asyncpg through run_sync.
    assert await run_read(engine, compare) > 10_000
    assert await run_read(engine, compare, small=False, snapshot=True) > 10_000

    def sample(conn: Connection) -> list[tuple[Any, ...]]:
        return ms._MESSAGES_IN.rows(conn, {"b_folder": 1, "b_uids": [2, 3]})

    rows = await run_read(engine, sample)
    assert [row[0] for row in rows] == [2, 3]
    assert all(isinstance(row[3], dt.datetime) for row in rows)
    assert ms.as_utc(rows[0][3]) == NOW - dt.timedelta(days=2, microseconds=2)


async def test_lock_for_update_reads_the_counters(engine: AsyncEngine) -> None:
    def work(conn: Connection) -> dict[int, tuple[int, int]]:
        locked = ms._lock_folders(conn, [2, 1])
        reference = conn.execute(ms._LOCK_COUNTERS.statement, {"b_ids": [1, 2]}).all()
        assert [(row[0], row[1], row[2]) for row in reference] == [
            (folder_id, c.uidnext, c.highestmodseq) for folder_id, c in sorted(locked.items())
        ]
        return {folder_id: (c.uidnext, c.highestmodseq) for folder_id, c in locked.items()}

    assert await run_write(engine, work) == {1: (MESSAGES + 1, MESSAGES + 100), 2: (1, 1)}


def placement_rows(folder_id: int, first_uid: int, count: int) -> list[dict[str, Any]]:
    return [
        {
            "folder_id": folder_id,
            "uid": first_uid + i,
            "blob_sha256": digest(i % 20),
            "flags": "\\Seen" if i % 2 else "",
            "modseq": 10 + i,
            "internal_date": NOW + dt.timedelta(seconds=i, microseconds=i),
            "size": 20 + i % 20,
        }
        for i in range(count)
    ]


def folder_contents(conn: Connection, folder_id: int) -> list[tuple[Any, ...]]:
    query = (
        select(*(c for c in placements.c if c.name not in ("id", "folder_id")))
        .where(placements.c.folder_id == folder_id)
        .order_by(placements.c.uid)
    )
    return [tuple(row) for row in conn.execute(query)]


async def test_writes_store_what_sqlalchemy_stores(engine: AsyncEngine) -> None:
    """The same writes into folder 2 through SQLAlchemy and into folder 3 through the
    fast path leave the same rows (multi-row INSERTs of every row count)."""

    def work(conn: Connection) -> None:
        conn.execute(
            insert(folders).values(
                id=3,
                mailbox_id=1,
                name="Fast",
                uidvalidity=9,
                uidnext=1,
                highestmodseq=1,
                special_use=None,
                subscribed=True,
            )
        )
        first = 1
        for count in (1, 2, 3, 7, 16, 37, 300, 1100):
            conn.execute(insert(placements), placement_rows(2, first, count))
            ms._INSERT_PLACEMENTS.rows(conn, placement_rows(3, first, count))
            first += count
        flags = [
            {"b_uid": uid, "b_flags": "\\Answered", "b_modseq": 5000 + uid}
            for uid in range(1, first, 3)
        ]
        conn.execute(ms._SET_FLAGS.statement, [{"b_folder": 2, **row} for row in flags])
        ms._SET_FLAGS.execute_many(conn, [{"b_folder": 3, **row} for row in flags])
        for uids in ([4], [5, 6, 6], list(range(100, 1300, 2)), [99999]):
            reference = conn.execute(
                ms._DELETE_PLACEMENTS.statement, {"b_folder": 2, "b_uids": uids}
            ).rowcount
            assert ms._DELETE_PLACEMENTS.execute(conn, {"b_folder": 3, "b_uids": uids}) == (
                reference
            )
        counters = [{"b_id": 2, "b_uidnext": first, "b_modseq": 77}]
        conn.execute(ms._ADVANCE.statement, counters)
        ms._ADVANCE.execute_many(conn, [{**counters[0], "b_id": 3}])
        expunged = [
            {"folder_id": 0, "uid": u, "modseq": u + 1, "expunged_at": NOW} for u in (4, 5, 6)
        ]
        conn.execute(insert(expunges), [{**row, "folder_id": 2} for row in expunged])
        ms._INSERT_EXPUNGES.rows(conn, [{**row, "folder_id": 3} for row in expunged])

    await run_write(engine, work)

    def check(conn: Connection) -> None:
        assert len(folder_contents(conn, 2)) > 800
        assert_same(folder_contents(conn, 3), folder_contents(conn, 2))
        counters = ms._READ_COUNTERS.rows(conn, {"b_ids": [2, 3]})
        assert counters[0][1:] == counters[1][1:]
        changes = [ms._EXPUNGED.rows(conn, {"b_folder": f, "b_modseq": 0}) for f in (2, 3)]
        assert changes[0] == changes[1] == [(4, 5), (5, 6), (6, 7)]

    await run_read(engine, check, small=False)


async def test_blobs_and_audit_rows_are_stored_as_sqlalchemy_stores_them(
    engine: AsyncEngine,
) -> None:
    events = [
        AuditEvent(
            actor=f"user{i}@example.test",
            action="imap.fetch",
            target="INBOX",
            remote="127.0.0.1",
            details={"uid": i, "note": "é"} if i % 2 else {},
            at=NOW + dt.timedelta(microseconds=i) if i % 3 else None,
        )
        for i in range(11)
    ]
    rows = [audit_row(event) for event in events]

    def work(conn: Connection) -> None:
        # Blobs: those stored already keep their bytes, new ones are added once.
        fresh = [
            {"sha256": digest(n), "size": 1, "data": b"other bytes", "created_at": NOW}
            for n in (3, 40, 41, 40, 19, 42)
        ]
        ms.INSERT_BLOB.rows(conn, fresh)
        conn.execute(insert(audit), rows)
        write_audit_rows(conn, rows)

    await run_write(engine, work)

    def check(conn: Connection) -> None:
        query = select(blobs.c.sha256, blobs.c.data)
        stored = {sha: bytes(data) for sha, data in conn.execute(query)}
        assert len(stored) == 23
        assert stored[digest(3)] == b"message 3" + b"\x00\xff" * 3
        assert stored[digest(40)] == stored[digest(42)] == b"other bytes"
        columns = [c for c in audit.c if c.name != "id"]
        written = [tuple(row) for row in conn.execute(select(*columns).order_by(audit.c.id))]
        assert len(written) == 22
        assert_same(written[11:], written[:11])

    await run_read(engine, check, small=False)


async def test_a_failing_write_leaves_nothing(engine: AsyncEngine) -> None:
    def failing(conn: Connection) -> None:
        ms._INSERT_PLACEMENTS.rows(conn, placement_rows(2, 1, 5))
        ms._SET_FLAGS.execute_many(
            conn, [{"b_folder": 1, "b_uid": 1, "b_flags": "\\Draft", "b_modseq": 9}]
        )
        ms._INSERT_PLACEMENTS.rows(conn, placement_rows(2, 5, 2))  # uid 5 again

    with pytest.raises(IntegrityError):
        await run_write(engine, failing)

    def state(conn: Connection) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        flags = ms._PLACEMENT_FLAGS.rows(conn, {"b_folder": 1, "b_uids": [1]})
        return folder_contents(conn, 2), flags

    assert await run_read(engine, state) == ([], [(1, "\\Seen", 2)])

    # Group commit (SQLite): a work that fails inside a shared transaction is undone
    # by its savepoint, the others commit.
    def good(uid: int) -> Any:
        return lambda conn: ms._INSERT_PLACEMENTS.rows(conn, placement_rows(2, uid, 1))

    outcomes = await asyncio.gather(
        run_write(engine, good(100)),
        run_write(engine, failing),
        run_write(engine, good(101)),
        return_exceptions=True,
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], IntegrityError)
    contents, flags = await run_read(engine, state)
    assert [row[0] for row in contents] == [100, 101]
    assert flags == [(1, "\\Seen", 2)]


async def test_statements_run_inside_sqlalchemys_transaction(engine: AsyncEngine) -> None:
    """A fast statement on a connection that has not begun begins SQLAlchemy's
    transaction (which the adapter starts with the connection's isolation level);
    left uncommitted, what it wrote is rolled back with it."""
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execution_options(isolation_level="REPEATABLE READ")

        def fast(sync: Connection) -> tuple[bool, int]:
            assert not sync.in_transaction()
            rows = ms._READ_COUNTERS.rows(sync, {"b_ids": [1]})
            assert sync.in_transaction()
            ms._INSERT_PLACEMENTS.rows(sync, placement_rows(2, 1, 3))
            return sync.in_transaction(), len(rows)

        assert await conn.run_sync(fast) == (True, 1)
        if engine.dialect.name == "postgresql":
            level = await conn.scalar(text("SELECT current_setting('transaction_isolation')"))
            assert level == "repeatable read"
        assert len(await conn.run_sync(folder_contents, 2)) == 3
        await conn.rollback()
        assert await conn.run_sync(folder_contents, 2) == []


def test_lists_are_padded_to_a_few_sizes() -> None:
    assert [size_class(n) for n in (1, 2, 3, 5, 9, 17, 65, 257, 1000, 1025, 3000)] == [
        1,
        2,
        4,
        8,
        16,
        64,
        256,
        1024,
        1024,
        2048,
        3072,
    ]


async def test_empty_lists_and_missing_parameters(engine: AsyncEngine) -> None:
    def work(conn: Connection) -> None:
        assert ms._MESSAGES_IN.rows(conn, {"b_folder": 1, "b_uids": []}) == []
        assert ms._DELETE_PLACEMENTS.execute(conn, {"b_folder": 1, "b_uids": []}) == 0
        with pytest.raises(Exception, match="b_folder"):
            ms._MESSAGES_IN.rows(conn, {"b_uids": [1]})
        FastInsert(placements).rows(conn, [])

    await run_write(engine, work)
