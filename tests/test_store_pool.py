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
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

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
    postgres: tuple[str, AsyncEngine],
) -> None:
    """A read that needs no snapshot runs each statement as its own transaction
    (no BEGIN, no ROLLBACK); a snapshot read and a write transaction still see
    one transaction on the same pooled connection afterwards."""
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
