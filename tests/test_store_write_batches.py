"""Group commit of write transactions on SQLite (``mssd.store.engine.run_write``):
writes submitted together share one transaction and one fsync, each in a
savepoint, so one that fails leaves the others committed and itself undone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import Connection, event, text

from mssd.store.engine import _sqlite_writer, create_engine, dispose, run_write


async def test_concurrent_writes_share_a_transaction_and_fail_alone(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'batches.db'}")
    try:
        await run_write(engine, lambda conn: conn.execute(text("CREATE TABLE t (x INTEGER)")))
        writer = _sqlite_writer(engine)
        assert writer is not None
        begins: list[int] = []
        event.listen(writer[0], "begin", lambda conn: begins.append(1))

        def insert(n: int) -> object:
            def work(conn: Connection) -> int:
                conn.execute(text("INSERT INTO t (x) VALUES (:x)"), {"x": n})
                if n == 7:
                    raise ValueError("seven is refused")
                return n

            return work

        outcomes = await asyncio.gather(
            *(run_write(engine, insert(n)) for n in range(20)),  # type: ignore[arg-type]
            return_exceptions=True,
        )
        assert [o for o in outcomes if not isinstance(o, BaseException)] == [
            n for n in range(20) if n != 7
        ]
        assert isinstance(outcomes[7], ValueError) and str(outcomes[7]) == "seven is refused"
        assert len(begins) <= 2, f"{len(begins)} transactions for 20 concurrent writes"

        def stored(conn: Connection) -> list[int]:
            return [row[0] for row in conn.execute(text("SELECT x FROM t ORDER BY x"))]

        assert await run_write(engine, stored) == [n for n in range(20) if n != 7]
        # A lone write that fails is rolled back whole, as before.
        with pytest.raises(ValueError):
            await run_write(engine, insert(7))  # type: ignore[arg-type]
        assert 7 not in await run_write(engine, stored)
    finally:
        await dispose(engine)
