"""A process that writes to a SQLite file through mssd's write paths, for
``test_store_writer_lock.py``: ``python sqlite_writer.py DATABASE NAME COUNT``.

Its SQLite connections run with ``busy_timeout=0``, so that a write that finds
the database locked by another process fails at once ("database is locked")
instead of sleeping in SQLite's busy handler: the writers must never get there
(``mssd.store.engine.WriterLock``). It prints ``ready`` once connected, waits
for a line on its standard input, then writes ``COUNT`` rows, half through
``write_transaction`` and half through ``run_write`` (half of those ``small``),
four tasks at a time, and prints ``done`` (or the first error, and exits 1).
"""

from __future__ import annotations

import asyncio
import sys

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry

import mssd.store.engine as store_engine

_configure = store_engine._configure_sqlite


def _no_busy_handler(sync_engine: Engine) -> None:
    _configure(sync_engine)

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=0")  # after mssd's PRAGMAs
        cursor.close()


store_engine._configure_sqlite = _no_busy_handler


async def main(database: str, name: str, count: int) -> int:
    engine = store_engine.create_engine(f"sqlite+aiosqlite:///{database}")
    try:
        # Connected (and each path's connection opened) before the other starts.
        await store_engine.run_write(engine, lambda conn: conn.execute(text("SELECT 1")))
        async with store_engine.write_transaction(engine) as conn:
            await conn.execute(text("SELECT 1"))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        def insert(n: int) -> object:
            def work(conn: Connection) -> None:
                # Read, then write what was read: interleaved writers would collide.
                last = conn.execute(text("SELECT count(*) FROM t")).scalar_one()
                conn.execute(
                    text("INSERT INTO t (who, n, seen) VALUES (:who, :n, :seen)"),
                    {"who": name, "n": n, "seen": last},
                )

            return work

        async def writer(first: int) -> None:
            for n in range(first, count, 4):
                if n % 2:
                    # Small ones run on the event loop when the lock is free.
                    small = n % 4 == 1
                    await store_engine.run_write(engine, insert(n), small=small)  # type: ignore[arg-type]
                else:
                    async with store_engine.write_transaction(engine) as conn:
                        await conn.run_sync(insert(n))  # type: ignore[arg-type]

        await asyncio.gather(*(writer(first) for first in range(4)))
        print("done", flush=True)
        return 0
    except Exception as error:
        print(f"error: {error!r}", flush=True)
        return 1
    finally:
        await store_engine.dispose(engine)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
