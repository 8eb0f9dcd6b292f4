"""Group commit of write transactions on SQLite (``mssd.store.engine.run_write``):
writes submitted together share one transaction and one fsync, each in a
savepoint, so one that fails leaves the others committed and itself undone."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import loop_ticks
from sqlalchemy import Connection, event, text

from mssd.store import engine as engine_module
from mssd.store.engine import _sqlite_writer, create_engine, dispose, lock_file, run_write


def insert(n: int, *, pause: float = 0.0) -> Callable[[Connection], int]:
    """A work that inserts ``n`` into ``t`` and says which thread ran it (after
    ``pause`` seconds; 7 is refused)."""

    def work(conn: Connection) -> int:
        conn.execute(text("INSERT INTO t (x) VALUES (:x)"), {"x": n})
        time.sleep(pause)
        if n == 7:
            raise ValueError("seven is refused")
        return threading.get_ident()

    return work


def stored(conn: Connection) -> list[int]:
    return [row[0] for row in conn.execute(text("SELECT x FROM t ORDER BY x"))]


async def test_concurrent_writes_share_a_transaction_and_fail_alone(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'batches.db'}")
    try:
        await run_write(engine, lambda conn: conn.execute(text("CREATE TABLE t (x INTEGER)")))
        writer = _sqlite_writer(engine)
        assert writer is not None
        begins: list[int] = []
        event.listen(writer[0], "begin", lambda conn: begins.append(1))

        def numbered(n: int) -> Callable[[Connection], int]:
            """:func:`insert` answering ``n``: each caller gets its own work's answer."""
            inserting = insert(n)

            def work(conn: Connection) -> int:
                inserting(conn)
                return n

            return work

        outcomes = await asyncio.gather(
            *(run_write(engine, numbered(n)) for n in range(20)), return_exceptions=True
        )
        assert [o for o in outcomes if not isinstance(o, BaseException)] == [
            n for n in range(20) if n != 7
        ]
        assert isinstance(outcomes[7], ValueError) and str(outcomes[7]) == "seven is refused"
        assert len(begins) <= 2, f"{len(begins)} transactions for 20 concurrent writes"

        assert await run_write(engine, stored) == [n for n in range(20) if n != 7]
        # A lone write that fails is rolled back whole, as before.
        with pytest.raises(ValueError):
            await run_write(engine, insert(7))
        assert 7 not in await run_write(engine, stored)
    finally:
        await dispose(engine)


async def test_small_writes_run_on_the_event_loop_until_the_disk_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of small works runs on the event loop's thread (no hand-over to
    the writer thread); a large one on the writer thread; and after several
    slow transactions on the loop (a disk slow to sync), small ones go to the
    writer thread too for a while. Same group commit and failures either way."""
    # Whatever this machine's disk does, nothing counts as slow until said so.
    monkeypatch.setattr(engine_module, "INLINE_SLOW", 60.0)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'inline.db'}")
    try:
        await run_write(engine, lambda conn: conn.execute(text("CREATE TABLE t (x INTEGER)")))
        loop_thread = threading.get_ident()
        threads = await asyncio.gather(*(run_write(engine, insert(n), small=True) for n in (1, 2)))
        assert threads == [loop_thread, loop_thread]
        assert await run_write(engine, insert(3)) != loop_thread  # not small: the writer thread
        # A failing small work is undone alone, as on the writer thread.
        outcomes = await asyncio.gather(
            *(run_write(engine, insert(n), small=True) for n in (6, 7, 8)),
            return_exceptions=True,
        )
        assert outcomes[0] == outcomes[2] == loop_thread
        assert isinstance(outcomes[1], ValueError)

        # Slow transactions on the loop: the next small ones leave it.
        monkeypatch.setattr(engine_module, "INLINE_SLOW", 0.01)
        for n in range(10, 10 + engine_module.INLINE_SLOW_COUNT):
            await run_write(engine, insert(n, pause=0.02), small=True)
        assert await run_write(engine, insert(20), small=True) != loop_thread
        # ...until the back-off is over.
        monkeypatch.setattr(engine_module, "INLINE_SLOW", 60.0)
        batches = engine.sync_engine._mssd_write_batches  # type: ignore[attr-defined]
        batches._threaded_until = 0.0
        assert await run_write(engine, insert(21), small=True) == loop_thread
        assert await run_write(engine, stored) == [1, 2, 3, 6, 8, 10, 11, 12, 20, 21]
    finally:
        await dispose(engine)


async def test_the_commit_of_small_writes_waits_for_the_disk_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small works' statements run on the loop's thread, their COMMIT (the WAL
    write and its fsync) on the writer thread while the loop goes on serving;
    the works' callers hear only once it returned, and a COMMIT that fails
    fails every work of the batch and keeps none of them."""
    monkeypatch.setattr(engine_module, "INLINE_SLOW", 60.0)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'commit.db'}")
    try:
        await run_write(engine, lambda conn: conn.execute(text("CREATE TABLE t (x INTEGER)")))
        writer = _sqlite_writer(engine)
        assert writer is not None
        loop_thread = threading.get_ident()
        commits: list[int] = []
        failing: list[Exception] = []

        def on_commit(conn: Connection) -> None:
            commits.append(threading.get_ident())
            time.sleep(0.2)  # a disk slow to sync
            if failing:
                raise failing.pop()

        event.listen(writer[0], "commit", on_commit)

        async with loop_ticks(0.01) as ticks:
            threads = await asyncio.gather(
                *(run_write(engine, insert(n), small=True) for n in (1, 2))
            )
        assert threads == [loop_thread, loop_thread]
        assert len(commits) == 1 and commits[0] != loop_thread
        assert ticks[0] >= 5, "the event loop waited for the COMMIT"

        failing.append(OSError("disk I/O error"))
        outcomes = await asyncio.gather(
            *(run_write(engine, insert(n), small=True) for n in (3, 4)), return_exceptions=True
        )
        assert all(isinstance(o, OSError) for o in outcomes), outcomes
        event.remove(writer[0], "commit", on_commit)

        assert await run_write(engine, insert(5), small=True) == loop_thread
        assert await run_write(engine, stored) == [1, 2, 5]
    finally:
        await dispose(engine)


def test_a_loop_closed_during_a_commit_leaves_the_file_lock_free(tmp_path: Path) -> None:
    """The file lock taken on the event loop for small works is given back by the
    writer thread once their COMMIT returned, not by the loop, which may be gone
    by then (an engine outliving its loop): the other writers on the file, in
    this process or another, do not wait for it forever."""
    database = tmp_path / "closed.db"
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    committing = threading.Event()

    def on_commit(conn: Connection) -> None:
        committing.set()
        time.sleep(0.3)  # a disk slow to sync

    async def create() -> None:
        await run_write(engine, lambda conn: conn.execute(text("CREATE TABLE t (x INTEGER)")))
        writer = _sqlite_writer(engine)
        assert writer is not None
        event.listen(writer[0], "commit", on_commit)

    async def write_and_leave() -> None:
        write = asyncio.ensure_future(run_write(engine, insert(1), small=True))
        assert await asyncio.to_thread(committing.wait, 10)
        assert not write.done()
        # The loop ends here, cancelling what waits for the COMMIT.

    asyncio.run(create())
    asyncio.run(write_and_leave())
    fd = os.open(lock_file(database), os.O_RDWR)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the file lock is still held"
                time.sleep(0.01)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

    async def write_again() -> list[int]:
        writer = _sqlite_writer(engine)
        assert writer is not None
        event.remove(writer[0], "commit", on_commit)
        try:
            await run_write(engine, insert(2), small=True)
            return await run_write(engine, stored)
        finally:
            await dispose(engine)

    assert asyncio.run(write_again()) == [1, 2]
