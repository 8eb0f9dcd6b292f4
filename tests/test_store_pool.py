"""Pooled PostgreSQL connections (mssd.store.engine): pinged at check-out only after
resting ``PING_AFTER_IDLE`` seconds, so a busy store pays no ping round trips and a
store that was quiet while PostgreSQL dropped its connections still answers."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import _asyncpg_dsn, store_url_for
from sqlalchemy import Connection, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store import engine as engine_module
from mssd.store.engine import (
    PING_AFTER_IDLE,
    create_engine,
    run_read,
    run_write,
    write_transaction,
)


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    """An empty PostgreSQL store (created and dropped outside the test's event loop)."""
    yield from store_url_for("postgresql", tmp_path)


@pytest.fixture
async def postgres(postgres_url: str) -> AsyncIterator[tuple[str, AsyncEngine]]:
    """Its URL and an engine on it."""
    engine = create_engine(postgres_url)
    yield postgres_url, engine
    await engine.dispose()


def backend_pid(conn: Connection) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


async def terminate(url: str, pid: int) -> None:
    """What a PostgreSQL restart or a dropped network does to a pooled connection."""
    conn = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


async def test_a_connection_dropped_while_resting_is_replaced(
    postgres: tuple[str, AsyncEngine],
) -> None:
    postgres_url, engine = postgres
    pid = await run_read(engine, backend_pid)
    await terminate(postgres_url, pid)
    await asyncio.sleep(PING_AFTER_IDLE + 0.2)
    assert await run_read(engine, backend_pid) != pid


async def test_a_busy_connection_is_not_pinged(postgres: tuple[str, AsyncEngine]) -> None:
    """No ping before a statement on a connection used a moment ago: one dropped
    meanwhile fails that statement (as one dropped during it would), and the pool
    replaces it for the next."""
    postgres_url, engine = postgres
    pid = await run_read(engine, backend_pid)
    await terminate(postgres_url, pid)
    with pytest.raises(DBAPIError) as failed:
        await run_read(engine, backend_pid)
    assert failed.value.connection_invalidated
    assert await run_read(engine, backend_pid) != pid


def transaction_starts(conn: Connection) -> tuple[dt.datetime, dt.datetime]:
    """``now()`` twice, 10 ms apart: PostgreSQL's ``now()`` is the start of the
    current transaction."""
    first = conn.execute(text("SELECT now()")).scalar_one()
    conn.execute(text("SELECT pg_sleep(0.01)"))
    return first, conn.execute(text("SELECT now()")).scalar_one()


async def test_reads_without_a_snapshot_pay_no_transaction_round_trips(
    postgres: tuple[str, AsyncEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that needs no snapshot runs each statement as its own transaction
    (no BEGIN, no ROLLBACK); a snapshot read and a write transaction still see
    one transaction on the same pooled connection afterwards (none kept out of
    the pool between works here, so that each goes back to it)."""
    monkeypatch.setattr(engine_module, "HELD_CONNECTIONS", 0)
    _, engine = postgres
    pid = await run_read(engine, backend_pid)
    first, second = await run_read(engine, transaction_starts)
    assert first < second
    first, second = await run_read(engine, transaction_starts, snapshot=True)
    assert first == second
    first, second = await run_write(engine, transaction_starts)
    assert first == second
    async with write_transaction(engine) as conn:
        first, second = await conn.run_sync(transaction_starts)
        assert first == second
        assert await conn.run_sync(backend_pid) == pid
    assert await run_write(engine, backend_pid) == pid


def checkouts(engine: AsyncEngine) -> list[int]:
    """A list that grows by one at each check-out from the engine's pool."""
    counted: list[int] = []
    event.listen(engine.sync_engine, "checkout", lambda *_: counted.append(1))
    return counted


async def test_a_connection_is_kept_between_works(postgres: tuple[str, AsyncEngine]) -> None:
    """Works one after the other run on one kept connection: no check-out from
    the pool and no check-in for each (the costlier half of a short read)."""
    _, engine = postgres
    pid = await run_read(engine, backend_pid)
    counted = checkouts(engine)
    for _ in range(5):
        assert await run_read(engine, backend_pid) == pid
    assert counted == []
    # Snapshot reads (REPEATABLE READ) keep one of their own: each is a
    # transaction of its own, ended when it returns.
    earlier, _ = await run_read(engine, transaction_starts, snapshot=True)
    later, _ = await run_read(engine, transaction_starts, snapshot=True)
    assert earlier < later
    assert len(counted) == 1
    # So do write transactions: each committed, the connection ready for the next.
    first = await run_write(engine, backend_pid)
    assert await run_write(engine, transaction_starts)
    assert await run_write(engine, backend_pid) == first
    assert len(counted) == 2


async def test_a_failed_work_leaves_no_transaction_behind(
    postgres: tuple[str, AsyncEngine],
) -> None:
    """A work that fails inside its transaction gives its connection back to the
    pool, rolled back: the next works (which may get that connection) start
    clean, not in a failed transaction."""
    _, engine = postgres

    def fails(conn: Connection) -> None:
        conn.execute(text("SELECT 1"))
        conn.execute(text("SELECT no_such_column FROM pg_class"))

    for snapshot in (True, False):
        with pytest.raises(DBAPIError):
            await run_read(engine, fails, snapshot=snapshot)
        first, second = await run_read(engine, transaction_starts, snapshot=True)
        assert first == second
    with pytest.raises(DBAPIError):
        await run_write(engine, fails)
    first, second = await run_write(engine, transaction_starts)
    assert first == second
    assert await run_read(engine, lambda conn: conn.execute(text("SELECT 1")).scalar_one()) == 1


async def test_after_a_lost_connection_the_kept_ones_are_replaced(
    postgres: tuple[str, AsyncEngine],
) -> None:
    """When the server goes away (a restart), the statement on the connection in
    use fails as before, and the connections kept beside it are let go with it:
    the next work does not fail again on another dead one."""
    postgres_url, engine = postgres

    async def slow_pid() -> int:
        def work(conn: Connection) -> int:
            conn.execute(text("SELECT pg_sleep(0.05)"))
            return backend_pid(conn)

        return await run_read(engine, work)

    pids = set(await asyncio.gather(*(slow_pid() for _ in range(3))))
    assert len(pids) == 3  # three connections, all kept
    for pid in pids:
        await terminate(postgres_url, pid)
    with pytest.raises(DBAPIError) as failed:
        await run_read(engine, backend_pid)
    assert failed.value.connection_invalidated
    assert await run_read(engine, backend_pid) not in pids
    assert await run_read(engine, backend_pid) not in pids


async def test_disposing_of_the_engine_closes_the_kept_connections(postgres_url: str) -> None:
    """``AsyncEngine.dispose()`` ends the kept connections' server sessions too
    (nothing is left for the garbage collector to terminate)."""
    engine = create_engine(postgres_url)
    pids = set(await asyncio.gather(*(run_read(engine, backend_pid) for _ in range(3))))
    await engine.dispose()
    conn = await asyncpg.connect(_asyncpg_dsn(postgres_url))
    try:
        for _ in range(50):
            alive = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids)
            )
            if not alive:
                break
            await asyncio.sleep(0.05)
        assert alive == 0
    finally:
        await conn.close()
