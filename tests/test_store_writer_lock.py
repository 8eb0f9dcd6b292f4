"""Writers of several processes on one SQLite file take turns on a file lock
(``mssd.store.engine.WriterLock``), not in SQLite's busy handler; the lock is
released after a failed transaction and after a cancelled wait."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store.engine import (
    create_engine,
    dispose,
    lock_file,
    run_write,
    write_transaction,
    writer_lock,
)

HERE = Path(__file__).resolve().parent


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'mssd.db'}")
    await run_write(engine, lambda conn: conn.execute(text("CREATE TABLE t (x INTEGER)")))
    yield engine
    await dispose(engine)


@contextmanager
def held_by_another_process(database: Path) -> Iterator[int]:
    """The writer lock taken as another process takes it (another open file
    description: flock(2) locks conflict between those even in one process)."""
    fd = os.open(lock_file(database), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def lock_is_free(database: Path) -> bool:
    fd = os.open(lock_file(database), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def rows(conn: Connection) -> list[int]:
    return [row[0] for row in conn.execute(text("SELECT x FROM t ORDER BY x"))]


def test_two_processes_write_one_file_concurrently_without_meeting_the_busy_handler(
    tmp_path: Path,
) -> None:
    database = tmp_path / "mssd.db"
    with sqlite3.connect(database) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (who TEXT, n INTEGER, seen INTEGER)")
    count = 400
    writers = [
        subprocess.Popen(
            [sys.executable, str(HERE / "sqlite_writer.py"), str(database), name, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
        )
        for name in ("a", "b")
    ]
    try:
        for writer in writers:
            assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.flush()
        outputs = [writer.communicate(timeout=120)[0] for writer in writers]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    # Without the file lock, each process's BEGIN IMMEDIATE finds the other's
    # write lock and fails at once ("database is locked": busy_timeout=0).
    assert outputs == ["done\n", "done\n"]
    with sqlite3.connect(database) as conn:
        stored = conn.execute("SELECT who, n, seen FROM t").fetchall()
    assert sorted((who, n) for who, n, _ in stored) == [
        (who, n) for who in "ab" for n in range(count)
    ]
    # Each transaction saw exactly the rows committed before it.
    assert sorted(seen for _, _, seen in stored) == list(range(2 * count))
    assert stat.S_IMODE(lock_file(database).stat().st_mode) == 0o600


async def test_a_writer_waits_for_another_process_and_the_lock_is_released_after_errors(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    database = tmp_path / "mssd.db"
    with held_by_another_process(database):
        write = asyncio.ensure_future(
            run_write(engine, lambda conn: conn.execute(text("INSERT INTO t VALUES (1)")))
        )
        await asyncio.sleep(0.3)
        assert not write.done(), "wrote while another process held the writer lock"
    await asyncio.wait_for(write, 5)
    assert lock_is_free(database)

    with pytest.raises(ValueError, match="refused"):
        async with write_transaction(engine) as conn:
            await conn.execute(text("INSERT INTO t VALUES (2)"))
            raise ValueError("refused")
    assert lock_is_free(database)

    def refuse(conn: Connection) -> None:
        conn.execute(text("INSERT INTO t VALUES (3)"))
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        await run_write(engine, refuse)
    assert lock_is_free(database)
    assert await run_write(engine, rows) == [1]


async def test_a_writer_cancelled_while_waiting_for_the_file_lock_leaves_it_free(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    database = tmp_path / "mssd.db"
    lock = writer_lock(engine)
    with held_by_another_process(database):

        async def cancelled_write() -> None:
            async with write_transaction(engine) as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))

        first = asyncio.ensure_future(cancelled_write())
        await asyncio.sleep(0.2)  # its thread now waits for the file lock
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        # That thread may still obtain the file lock: no task of this process
        # may believe it holds the writer lock meanwhile.
        assert lock.locked()
        second = asyncio.ensure_future(
            run_write(engine, lambda conn: conn.execute(text("INSERT INTO t VALUES (2)")))
        )
        await asyncio.sleep(0.2)
        assert not second.done()
    # The other process let go: the thread took the file lock, gave it back,
    # and the next writer went on.
    await asyncio.wait_for(second, 5)
    assert lock_is_free(database)
    assert not lock.locked()
    assert await run_write(engine, rows) == [2]


async def test_a_small_write_waits_off_the_event_loop_while_another_process_writes(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    database = tmp_path / "mssd.db"

    def insert(n: int) -> Callable[[Connection], int]:
        def work(conn: Connection) -> int:
            conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": n})
            return threading.get_ident()

        return work

    loop_thread = threading.get_ident()
    # The file lock free: on the event loop, and given back.
    assert await run_write(engine, insert(1), small=True) == loop_thread
    assert lock_is_free(database)
    with held_by_another_process(database):
        write = asyncio.ensure_future(run_write(engine, insert(2), small=True))
        await asyncio.sleep(0.3)
        # The loop is not blocked: the write waits in the writer thread.
        assert not write.done()
    assert await asyncio.wait_for(write, 5) != loop_thread
    assert lock_is_free(database)
    assert await run_write(engine, rows) == [1, 2]
