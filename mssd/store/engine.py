"""Database engines, transactions and schema versions.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL``: a
commit is on disk when it returns. Write transactions on SQLite start with
``BEGIN IMMEDIATE`` so two writers queue on the database lock instead of
failing half-way when a reader upgrades to a writer. PostgreSQL runs at READ
COMMITTED and writers lock the rows they change (``SELECT ... FOR UPDATE``).

On a SQLite file, the writers of every mssd process sharing it (``imap.workers``)
take turns on :class:`WriterLock` before ``BEGIN IMMEDIATE`` and until after
COMMIT or ROLLBACK, so that none of them meets SQLite's busy handler, which
sleeps up to 100 ms between tries however soon the database is free again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, RootTransaction, event
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.elements import (
    ReleaseSavepointClause,
    RollbackToSavepointClause,
    SavepointClause,
)
from sqlalchemy.util import greenlet_spawn

from mssd.store.fastpath import run_driver_sql

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


class SchemaError(Exception):
    """The database schema is missing or unknown to this version of mssd."""


def _sqlite_file(url: str) -> Path | None:
    prefix = "sqlite+aiosqlite:///"
    if url.startswith(prefix) and url[len(prefix) :] not in ("", ":memory:"):
        return Path(url[len(prefix) :].split("?", 1)[0])
    return None


def _configure_sqlite(sync_engine: Engine) -> None:
    """The connection settings every SQLite connection of mssd runs with."""

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _: ConnectionPoolEntry) -> None:
        # The driver must not open transactions on its own: we emit BEGIN below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("mssd_write", False)
        # Straight on the DBAPI connection: every read and write transaction
        # begins here, and Connection.exec_driver_sql costs ~10 times more.
        run_driver_sql(conn, "BEGIN IMMEDIATE" if immediate else "BEGIN")


PING_AFTER_IDLE = 2.0
"""Seconds a pooled PostgreSQL connection may rest before it is pinged at check-out."""


def _configure_postgresql(sync_engine: Engine) -> None:
    """Ping a pooled connection at check-out only when it has rested
    :data:`PING_AFTER_IDLE` seconds: SQLAlchemy's ``pool_pre_ping`` pings at every
    check-out, three round trips with asyncpg (BEGIN, ``;``, ROLLBACK), some 20 % of
    the CPU of a store read. A connection in use under load is not idle long
    enough to need it; one that broke while in use fails its statement, which
    invalidates the pool's older connections (SQLAlchemy's disconnect handling)."""

    @event.listens_for(sync_engine, "connect")
    def _on_connect(_: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        record.info["mssd_idle_since"] = time.monotonic()

    @event.listens_for(sync_engine, "checkin")
    def _on_checkin(_: DBAPIConnection | None, record: ConnectionPoolEntry) -> None:
        record.info["mssd_idle_since"] = time.monotonic()

    @event.listens_for(sync_engine, "engine_disposed")
    def _on_dispose(engine: Engine) -> None:
        # AsyncEngine.dispose() or mssd's dispose(): the connections _connected
        # keeps are closed with the pool's.
        held: _Held | None = getattr(engine, "_mssd_held", None)
        if held is not None:
            del engine._mssd_held  # type: ignore[attr-defined]
            held.drop()

    @event.listens_for(sync_engine, "checkout")
    def _on_checkout(
        dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry, _: Any
    ) -> None:
        if time.monotonic() - record.info.get("mssd_idle_since", 0.0) < PING_AFTER_IDLE:
            return
        try:
            sync_engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            # The pool replaces the connection and checks out again.
            raise DisconnectionError(f"pooled connection lost while idle: {error}") from error


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    """An engine configured for mssd's durability rules on either backend."""
    if url.startswith("sqlite"):
        path = _sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # Every pooled aiosqlite connection is a thread; a pool smaller than the number
        # of concurrent sessions makes the overflow connections (thread, open, PRAGMAs)
        # be created and closed again for nearly every query under load.
        engine = create_async_engine(
            url, echo=echo, connect_args={"timeout": 30}, pool_size=32, max_overflow=32
        )
        _configure_sqlite(engine.sync_engine)
        return engine
    engine = create_async_engine(url, echo=echo, pool_size=10, max_overflow=10)
    _configure_postgresql(engine.sync_engine)
    return engine


def sqlite_writer_engine(engine: AsyncEngine, *, connections: int = 1) -> Engine | None:
    """A synchronous (stdlib ``sqlite3``) engine on the same SQLite file as ``engine``.

    For a writer that runs a whole transaction in one worker thread
    (:func:`run_write`): with aiosqlite every statement, BEGIN and COMMIT is a round trip
    between the event loop and the connection's thread, which under load costs
    more than the statements themselves. Same file, same PRAGMAs (WAL,
    ``synchronous=FULL``), same ``BEGIN IMMEDIATE``. None for other backends and
    for in-memory databases (a second engine would open a different database).
    """
    url = engine.url
    if url.get_backend_name() != "sqlite" or _sqlite_file(str(url)) is None:
        return None
    writer = sa_create_engine(
        url.set(drivername="sqlite"),
        echo=engine.echo,
        connect_args={"timeout": 30, "check_same_thread": False},
        pool_size=connections,
        max_overflow=0,
    )
    _configure_sqlite(writer)
    # One multi-row INSERT per table and batch rather than one sqlite3_step per row:
    # each step releases and re-takes the GIL, and re-taking it while the event loop
    # is busy costs up to the interpreter's switch interval (5 ms).
    writer.dialect.use_insertmanyvalues_wo_returning = True
    return writer


def lock_file(database: Path) -> Path:
    """The file whose ``flock`` the writers of every process on ``database`` take
    turns on: next to it, never the database itself (SQLite's own POSIX locks are
    on that one, and a process that closes any descriptor of a file loses all
    its POSIX locks on it)."""
    return database.with_name(database.name + "-lock")


class WriterLock:
    """This process's writers, and those of the other processes on the same
    SQLite file, take turns here: an :class:`asyncio.Lock` for this process's
    tasks, then an exclusive ``flock`` (flock(2)) on :func:`lock_file` for the
    other processes (none for an in-memory database, which no other process
    opens).

    :meth:`acquire` (for :func:`write_transaction`) tries the file lock without
    blocking on the event loop first (a system call when nobody holds it); when
    another process holds it, a thread waits for it. A task cancelled while
    that thread waits leaves this process's lock held until the thread returns,
    and the file lock released then: no other task may write while a thread of
    this process may still obtain the file lock behind its back. The group
    committer (:class:`_WriteBatches`) takes this process's turn on the loop
    (:meth:`acquire_turn`), then the file lock either on the loop, when it is
    free and the batch's statements run there (:meth:`try_file`), or in the
    writer thread, which waits for it (:meth:`file_held`), from before BEGIN;
    either way the writer thread, which runs the COMMIT, gives it back right
    after (:meth:`unlock_file`): no other process waits for this one's event
    loop to see the COMMIT, and a contended lock costs no extra hand-over
    between threads.
    Processes that do not take it (the ``sqlite3`` shell) still meet the busy
    handler, as they should."""

    def __init__(self, path: Path | None) -> None:
        self._local = asyncio.Lock()
        self._path = path
        self._fd: int | None = None
        self._closer: weakref.finalize[[int], WriterLock] | None = None
        self._waiter: concurrent.futures.ThreadPoolExecutor | None = None
        self.waits = 0
        """Turns that had to wait for another process (for the log, tests)."""

    def locked(self) -> bool:
        """Whether a task of this process holds the lock (or a cancelled one's
        thread may still obtain it)."""
        return self._local.locked()

    def _file(self) -> int | None:
        if self._fd is None and self._path is not None:
            # O_CLOEXEC: a child process must not inherit (and keep) our lock.
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self._path, flags, 0o600)
            self._closer = weakref.finalize(self, os.close, self._fd)
        return self._fd

    async def acquire_turn(self) -> None:
        """This process's turn only (the file lock is then :meth:`file_held`)."""
        await self._local.acquire()
        try:
            self._file()
        except BaseException:
            self._local.release()
            raise

    def try_file(self) -> bool:
        """During :meth:`acquire_turn`, on the event loop: the file lock if no
        other process holds it (then :meth:`release` gives both back)."""
        if self._fd is None:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @contextlib.contextmanager
    def file_held(self) -> Iterator[None]:
        """The file lock, in the thread that runs the transaction, during
        :meth:`acquire_turn`; blocks while another process writes."""
        if self._fd is None:
            yield
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.waits += 1  # (only this thread counts, while holding the turn)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release_turn(self) -> None:
        self._local.release()

    def release_turn_after(self, work: asyncio.Future[Any]) -> None:
        """End this process's turn once ``work`` (a transaction in a thread,
        which took and gave back the file lock itself) is done, even if its
        awaiter was cancelled."""
        if work.done():
            self._local.release()
        else:
            work.add_done_callback(lambda _: self._local.release())

    async def acquire(self) -> None:
        await self._local.acquire()
        try:
            fd = self._file()
            if fd is None:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                self.waits += 1  # another process writes: wait for it in a thread
            if self._waiter is None:
                self._waiter = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="mssd-sqlite-lock"
                )
            waiting = asyncio.get_running_loop().run_in_executor(
                self._waiter, fcntl.flock, fd, fcntl.LOCK_EX
            )
        except BaseException:
            self._local.release()
            raise
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            waiting.add_done_callback(self._abandoned)
            raise
        except BaseException:
            self._local.release()
            raise

    def _abandoned(self, waiting: asyncio.Future[None]) -> None:
        """The thread of a cancelled :meth:`acquire` returned."""
        if not waiting.cancelled() and waiting.exception() is None:
            self.unlock_file()
        self._local.release()

    def unlock_file(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release(self) -> None:
        self.unlock_file()
        self._local.release()

    def close(self) -> None:
        """Close the lock file (when the engine is disposed)."""
        if self._waiter is not None:
            self._waiter.shutdown(wait=False)
        if self._closer is not None and not self._local.locked():
            # (A lock still held is closed by its finalizer, with the last reference.)
            self._fd = None
            self._closer()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *_: object) -> None:
        self.release()


def _sqlite_writer_lock(engine: AsyncEngine) -> WriterLock:
    loop = asyncio.get_running_loop()
    held: tuple[asyncio.AbstractEventLoop, WriterLock] | None = getattr(
        engine.sync_engine, "_mssd_writer_lock", None
    )
    if held is None or held[0] is not loop:
        # A lock belongs to one event loop; an engine may outlive a loop in tests.
        database = _sqlite_file(str(engine.url))
        held = (loop, WriterLock(None if database is None else lock_file(database)))
        engine.sync_engine._mssd_writer_lock = held  # type: ignore[attr-defined]
    return held[1]


def writer_lock(engine: AsyncEngine) -> WriterLock | contextlib.nullcontext[None]:
    """On SQLite, where writers take turns (:class:`WriterLock`): hold it from
    before ``BEGIN IMMEDIATE`` to after COMMIT or ROLLBACK. PostgreSQL writers
    lock rows instead: no lock."""
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    return _sqlite_writer_lock(engine)


def statement_engine(engine: AsyncEngine) -> AsyncEngine:
    """``engine``, or on PostgreSQL the same pool in autocommit: every statement
    is a transaction of its own, atomic and, for a write, durable when it
    returns (``synchronous_commit``), with no BEGIN and COMMIT or ROLLBACK
    round trips around it.

    For reads that need no snapshot (at READ COMMITTED, PostgreSQL's default
    and mssd's, every statement of a transaction takes a fresh snapshot anyway,
    so wrapping them in one adds two round trips and nothing else) and for
    writes of a single statement. Not for work that must see or change several
    rows together: use :func:`write_transaction` or ``run_read(...,
    snapshot=True)``."""
    if engine.dialect.name != "postgresql":
        return engine
    held: AsyncEngine | None = getattr(engine.sync_engine, "_mssd_statement_engine", None)
    if held is None:
        held = engine.execution_options(isolation_level="AUTOCOMMIT")
        held.sync_engine._mssd_base_engine = engine.sync_engine  # type: ignore[attr-defined]
        engine.sync_engine._mssd_statement_engine = held  # type: ignore[attr-defined]
    return held


HELD_CONNECTIONS = 6
"""PostgreSQL connections :func:`_connected` keeps checked out between works, at
most, over all the execution options of an engine: fewer than the pool's ten, so
that the pool always has connections for the rest (``write_transaction``...)."""


_Options = tuple[tuple[str, Any], ...]
"""Execution options, sorted, as a key."""


def _connect(sync_engine: Engine, options: _Options) -> Connection:
    conn = sync_engine.connect()
    if options:
        conn.execution_options(**dict(options))
    return conn


class _Held:
    """Connections :func:`_connected` keeps checked out between works on
    PostgreSQL, for one event loop: a check-out from SQLAlchemy's pool and the
    ``Connection`` made around it, then the check-in that resets and returns
    it, cost some 55 µs of CPU per work, more than the statement itself (raw
    asyncpg: 46 µs a round trip; bench/README.md). A connection is kept only
    when its work succeeded, after the transaction SQLAlchemy began for it, if
    any, is ended (in autocommit there is nothing to undo; a snapshot read's is
    rolled back, as the check-in would); one that rested
    :data:`PING_AFTER_IDLE` seconds is pinged before use, as the pool's
    check-out does; at most :data:`HELD_CONNECTIONS` rest."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: dict[tuple[Engine, _Options], list[tuple[Connection, float]]] = {}
        """By the engine (the base one or :func:`statement_engine`) and the
        execution options each was made with: when it rested from."""

    def take(self, sync_engine: Engine, options: _Options) -> Connection:
        idle = self.idle.get((sync_engine, options))
        while idle:
            conn, since = idle.pop()
            if time.monotonic() - since < PING_AFTER_IDLE:
                return conn
            dbapi_connection = conn.connection.dbapi_connection
            try:
                assert dbapi_connection is not None
                sync_engine.dialect.do_ping(dbapi_connection)
            except Exception:
                conn.invalidate()
                conn.close()
                continue
            return conn
        return _connect(sync_engine, options)

    def give_back(self, sync_engine: Engine, options: _Options, conn: Connection) -> None:
        if conn.in_transaction():
            try:
                conn.rollback()
            except Exception:
                # The work's answer stands; the connection is not kept.
                log.debug("kept connection lost after its work", exc_info=True)
                conn.invalidate()
        if conn.invalidated or sum(map(len, self.idle.values())) >= HELD_CONNECTIONS:
            conn.close()
            return
        self.idle.setdefault((sync_engine, options), []).append((conn, time.monotonic()))

    def drop(self) -> None:
        """Invalidate the kept connections (closed, their places in the pool
        freed): when the engine is disposed of, after a connection to the
        server was lost, or when their loop is gone (they cannot be checked in
        from another loop)."""
        idle, self.idle = self.idle, {}
        for held in idle.values():
            for conn, _ in held:
                with contextlib.suppress(Exception):
                    conn.invalidate()


def _held(engine: AsyncEngine) -> _Held:
    base: Engine = getattr(engine.sync_engine, "_mssd_base_engine", engine.sync_engine)
    loop = asyncio.get_running_loop()
    held: _Held | None = getattr(base, "_mssd_held", None)
    if held is None or held.loop is not loop:
        if held is not None:
            held.drop()  # (an engine may outlive a loop in tests)
        held = _Held(loop)
        base._mssd_held = held  # type: ignore[attr-defined]
    return held


async def _connected(
    engine: AsyncEngine,
    work: Callable[[Connection], T],
    *,
    transaction: bool = False,
    **options: Any,
) -> T:
    """``work`` on a connection of ``engine`` with execution ``options`` (in a
    transaction of its own if asked), in one greenlet: the connection's
    check-out, BEGIN, the work, COMMIT (ROLLBACK on error) and the check-in,
    where ``AsyncConnection`` would switch greenlets for each (some 100 µs of
    CPU a transaction on PostgreSQL, bench/README.md). On PostgreSQL the
    connection is kept for the next work when this one succeeded
    (:class:`_Held`)."""
    sync_engine = engine.sync_engine
    key: _Options = tuple(sorted(options.items()))

    def run_work(conn: Connection) -> T:
        if not transaction:
            return work(conn)
        with conn.begin():
            return work(conn)

    def run() -> T:
        with _connect(sync_engine, key) as conn:
            return run_work(conn)

    if engine.dialect.name != "postgresql":
        return await greenlet_spawn(run)
    held = _held(engine)

    def run_held() -> T:
        conn = held.take(sync_engine, key)
        try:
            result = run_work(conn)
        except BaseException:
            if conn.invalidated:
                # The server went away: those kept are likely gone too (SQLAlchemy
                # likewise has the pool's older connections replaced).
                held.drop()
            conn.close()
            raise
        held.give_back(sync_engine, key, conn)
        return result

    return await greenlet_spawn(run_held)


async def run_statements(engine: AsyncEngine, work: Callable[[Connection], T]) -> T:
    """``work`` on :func:`statement_engine` (on PostgreSQL each statement its
    own transaction), in one greenlet (:func:`_connected`)."""
    return await _connected(statement_engine(engine), work)


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that will write: committed on success, rolled back on error."""
    async with writer_lock(engine), engine.connect() as conn:
        await conn.execution_options(mssd_write=True)
        async with conn.begin():
            yield conn


T = TypeVar("T")


def _sqlite_writer(
    engine: AsyncEngine,
) -> tuple[Engine, concurrent.futures.ThreadPoolExecutor] | None:
    """This engine's synchronous SQLite writer and the one thread it runs on
    (made on first use, disposed with the engine); None for other backends."""
    held: tuple[Engine, concurrent.futures.ThreadPoolExecutor] | None = getattr(
        engine.sync_engine, "_mssd_sqlite_writer", None
    )
    if held is None:
        writer = sqlite_writer_engine(engine)
        if writer is None:
            return None
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mssd-sqlite-store")
        held = (writer, executor)
        engine.sync_engine._mssd_sqlite_writer = held  # type: ignore[attr-defined]
        weakref.finalize(engine.sync_engine, _close_writer, writer, executor)
    return held


_READER_THREADS = 2
"""Threads for the SQLite reads that must not run on the event loop (large blobs)."""


def _sqlite_reader(
    engine: AsyncEngine,
) -> tuple[Engine, concurrent.futures.ThreadPoolExecutor] | None:
    """This engine's synchronous SQLite reader (one connection for the event
    loop, one per reader thread) and its threads; None for other backends."""
    held: tuple[Engine, concurrent.futures.ThreadPoolExecutor] | None = getattr(
        engine.sync_engine, "_mssd_sqlite_reader", None
    )
    if held is None:
        reader = sqlite_writer_engine(engine, connections=1 + _READER_THREADS)
        if reader is None:
            return None
        executor = concurrent.futures.ThreadPoolExecutor(
            _READER_THREADS, thread_name_prefix="mssd-sqlite-read"
        )
        held = (reader, executor)
        engine.sync_engine._mssd_sqlite_reader = held  # type: ignore[attr-defined]
        weakref.finalize(engine.sync_engine, _close_writer, reader, executor)
    return held


async def run_read(
    engine: AsyncEngine,
    work: Callable[[Connection], T],
    *,
    small: bool = True,
    snapshot: bool = False,
) -> T:
    """Run ``work`` as one read-only transaction on a synchronous connection.

    On a SQLite file a ``small`` read (rows by index: a few rows of metadata,
    header blocks, a bounded number of octets) runs right here, on the event
    loop: SQLite answers it from its page cache in microseconds, where a trip
    through aiosqlite's thread and the async layer costs some 500 µs of CPU
    (bench/README.md); a read that may be large runs on a reader thread. Both
    see one snapshot (a WAL read transaction) for all their statements.
    Elsewhere it runs in one greenlet (SQLAlchemy's ``greenlet_spawn``, as
    ``AsyncConnection.run_sync`` does, but around the connection's check-out and
    check-in too): in a REPEATABLE READ transaction when ``snapshot`` asks that
    its statements see one state, else on :func:`statement_engine` (on
    PostgreSQL each statement in its own implicit transaction)."""
    reader = _sqlite_reader(engine)
    if reader is None:
        if not snapshot:
            return await run_statements(engine, work)
        return await _connected(engine, work, isolation_level="REPEATABLE READ")
    sync_engine, executor = reader
    if small:
        # The event loop keeps one connection: a pool check-out and its reset
        # would cost twice the read itself.
        inline: Connection | None = getattr(engine.sync_engine, "_mssd_inline_reader", None)
        if inline is None or inline.closed or inline.invalidated:
            inline = sync_engine.connect()
            engine.sync_engine._mssd_inline_reader = inline  # type: ignore[attr-defined]
        with inline.begin():
            return work(inline)

    def transaction() -> T:
        with sync_engine.connect() as conn, conn.begin():
            return work(conn)

    return await asyncio.get_running_loop().run_in_executor(executor, transaction)


def _close_writer(writer: Engine, executor: concurrent.futures.ThreadPoolExecutor) -> None:
    executor.shutdown(wait=False)
    writer.dispose()


async def dispose(engine: AsyncEngine) -> None:
    """Close the engine's connections, its SQLite writer's included (after the
    writer's last transaction)."""
    inline = getattr(engine.sync_engine, "_mssd_inline_reader", None)
    if inline is not None:
        del engine.sync_engine._mssd_inline_reader  # type: ignore[attr-defined]
        inline.close()
    batches = getattr(engine.sync_engine, "_mssd_write_batches", None)
    for attribute in ("_mssd_sqlite_writer", "_mssd_sqlite_reader"):
        held = getattr(engine.sync_engine, attribute, None)
        if held is not None:
            delattr(engine.sync_engine, attribute)
            sync_engine, executor = held
            loop = asyncio.get_running_loop()
            if attribute == "_mssd_sqlite_writer" and batches is not None:
                await loop.run_in_executor(executor, batches.close)
            await loop.run_in_executor(executor, sync_engine.dispose)
            executor.shutdown(wait=True)
    held_lock = getattr(engine.sync_engine, "_mssd_writer_lock", None)
    if batches is not None and batches.transactions and held_lock is not None:
        log.info(
            "SQLite writes of this process: %d in %d transactions; %d turns waited for "
            "another process",
            batches.works,
            batches.transactions,
            held_lock[1].waits,
        )
    if held_lock is not None:
        del engine.sync_engine._mssd_writer_lock  # type: ignore[attr-defined]
        held_lock[1].close()
    await engine.dispose()


SMALL_WRITE_ROWS = 64
SMALL_WRITE_OCTETS = 256 * 1024


def small_write(rows: int, octets: int = 0) -> bool:
    """Whether a write of ``rows`` messages (or records) and ``octets`` of
    content is ``small`` for :func:`run_write`: at most :data:`SMALL_WRITE_ROWS`
    and :data:`SMALL_WRITE_OCTETS`."""
    return rows <= SMALL_WRITE_ROWS and octets <= SMALL_WRITE_OCTETS


INLINE_SLOW = 0.005
"""Seconds: when :data:`INLINE_SLOW_COUNT` of the last :data:`INLINE_WINDOW`
batches of statements run on the event loop took longer than this (pages read
from a slow disk: their COMMIT, which writes the WAL and waits for its
``fsync``, is on the writer thread already; one slow batch now and then does
not count; under load on two shared cores, 1 in 5,000 takes over 5 ms), the
next batches run wholly on the writer thread..."""
INLINE_SLOW_COUNT = 3
INLINE_WINDOW = 8
INLINE_BACKOFF = 10.0
"""...for this many seconds, after which they are tried on the loop again."""


async def run_write(
    engine: AsyncEngine, work: Callable[[Connection], T], *, small: bool = False
) -> T:
    """Run ``work`` as one write transaction on a synchronous connection:
    committed when it returns, rolled back when it raises.

    On a SQLite file it runs on the store's writer connection (stdlib
    ``sqlite3``, same PRAGMAs, ``BEGIN IMMEDIATE``), in turn with this
    process's other writers (:func:`writer_lock`), and the works that arrive
    while one transaction runs share the next one (:class:`_WriteBatches`):
    one ``fsync`` for all of them, each in a savepoint of its own so that one
    failing leaves the others as they were. The statements of a batch of
    ``small`` works (a few rows: flags of a few messages, an audit record; the
    caller knows) run right on the event loop, as small reads do: the
    hand-over to the writer thread and back, and the two threads taking turns
    on the GIL, cost more CPU than such statements (bench/README.md); their
    COMMIT, which waits for the disk, runs on the writer thread, which holds
    the GIL only to start and end it, while the loop serves other sessions.
    The other batches, and every batch while statements on the loop are slow
    (:data:`INLINE_SLOW`), run wholly on the writer's thread. Elsewhere it
    runs as :func:`write_transaction` would, in one greenlet
    (:func:`_connected`)."""
    writer = _sqlite_writer(engine)
    if writer is None:
        async with writer_lock(engine):
            return await _connected(engine, work, transaction=True, mssd_write=True)
    batches: _WriteBatches | None = getattr(engine.sync_engine, "_mssd_write_batches", None)
    loop = asyncio.get_running_loop()
    if batches is None or batches.loop is not loop:
        if batches is not None:
            batches.close()  # (an engine may outlive a loop in tests)
        batches = _WriteBatches(engine, *writer)
        engine.sync_engine._mssd_write_batches = batches  # type: ignore[attr-defined]
    return await batches.submit(work, small)


_Pending = tuple[Callable[[Connection], Any], "asyncio.Future[Any]", bool]
"""A work, its caller's future, and whether it is ``small``."""


class _WriteBatches:
    """Group commit for :func:`run_write` on SQLite: while a transaction runs,
    the works submitted meanwhile wait, and then run together in the next one.
    An idle store adds no delay: a work submitted while nothing runs starts at
    once.

    A batch of small works runs on the event loop when the file lock is free
    (:meth:`WriterLock.try_file`: no other process writes); otherwise the
    writer thread waits for the file lock and takes the works waiting when it
    holds it (:meth:`WriterLock.file_held`), not before: those that arrive
    while another process writes join the batch rather than wait for the next
    one."""

    def __init__(
        self, engine: AsyncEngine, writer: Engine, executor: concurrent.futures.ThreadPoolExecutor
    ) -> None:
        self._engine = engine
        self._writer = writer
        self._executor = executor
        self.loop = asyncio.get_running_loop()
        self._pending: list[_Pending] = []
        self._pending_lock = threading.Lock()
        """Between the loop, which appends, and the writer thread, which takes."""
        self._running: asyncio.Task[None] | None = None
        self._threaded_until = 0.0
        """Until this loop time, small batches too run on the writer thread."""
        self._slow: collections.deque[bool] = collections.deque(maxlen=INLINE_WINDOW)
        self._conn: Connection | None = None
        self.transactions = 0
        self.works = 0
        """Transactions committed (or rolled back whole) and the works they carried."""
        # A work's savepoint, its release and its undoing, as SQLAlchemy writes them
        # for this dialect; run straight on the connection (run_driver_sql) rather
        # than through Connection.begin_nested, which costs two full statement
        # executions per work.
        self._savepoint, self._release, self._undo = (
            str(clause("mssd_work").compile(dialect=writer.dialect))
            for clause in (SavepointClause, ReleaseSavepointClause, RollbackToSavepointClause)
        )

    async def submit(self, work: Callable[[Connection], T], small: bool = False) -> T:
        future: asyncio.Future[T] = self.loop.create_future()
        with self._pending_lock:
            self._pending.append((work, future, small))
        if self._running is None:
            self._running = self.loop.create_task(self._drain(), name="mssd-sqlite-writes")
        return await future

    def _take(self) -> list[_Pending]:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        return batch

    def inline(self, batch: list[_Pending]) -> bool:
        """Whether the batch runs on the event loop (see :func:`run_write`)."""
        return self.loop.time() >= self._threaded_until and all(small for *_, small in batch)

    def _run_inline(
        self, works: list[Callable[[Connection], Any]]
    ) -> tuple[RootTransaction, list[tuple[bool, Any]]]:
        """The batch's statements, on the event loop; its COMMIT is left to the
        caller (:meth:`_statements`)."""
        started = time.perf_counter()
        try:
            return self._statements(works)
        finally:
            self._slow.append(time.perf_counter() - started > INLINE_SLOW)
            if sum(self._slow) >= INLINE_SLOW_COUNT:
                self._slow.clear()
                self._threaded_until = self.loop.time() + INLINE_BACKOFF

    async def _drain(self) -> None:
        try:
            # (Only this loop appends: what it sees empty here stays empty
            # until this task has ended.)
            while self._pending:
                if self._pending[-1][2]:
                    # Small works come in bursts (every session's STORE of one
                    # round of client commands): one turn of the loop gathers them.
                    await asyncio.sleep(0)
                lock = _sqlite_writer_lock(self._engine)
                try:
                    await lock.acquire_turn()
                except BaseException as error:
                    self._settle(self._take(), error)
                    raise
                if self.inline(self._pending) and lock.try_file():
                    batch = self._take()
                    try:
                        begun, outcome = self._run_inline([work for work, _, _ in batch])
                        try:
                            # The COMMIT waits for the disk (fsync): on the writer
                            # thread, while the loop serves the other sessions.
                            committed = self.loop.run_in_executor(
                                self._executor, self._commit_inline, begun, lock
                            )
                        except BaseException:
                            begun.rollback()
                            raise
                    except BaseException as error:  # nothing of the batch stays
                        lock.release()
                        self._settle(batch, error)
                        if not isinstance(error, Exception):
                            raise
                        continue
                    # This process's turn ends, and the works' callers hear, when
                    # the COMMIT returned, even if this task is cancelled meanwhile.
                    committed.add_done_callback(partial(self._committed, lock, batch, outcome))
                    with contextlib.suppress(Exception):
                        await asyncio.shield(committed)
                else:
                    try:
                        transaction = self.loop.run_in_executor(
                            self._executor, self._transaction, lock
                        )
                    except BaseException as error:
                        lock.release_turn()
                        self._settle(self._take(), error)
                        raise
                    # The turn ends, and the works' callers hear, when the thread
                    # is out of its transaction, even if this task is cancelled
                    # meanwhile.
                    lock.release_turn_after(transaction)
                    transaction.add_done_callback(self._done)
                    _, threaded = await asyncio.shield(transaction)
                    if isinstance(threaded, BaseException) and not isinstance(threaded, Exception):
                        raise threaded
        finally:
            self._running = None

    def _committed(
        self,
        lock: WriterLock,
        batch: list[_Pending],
        outcome: list[tuple[bool, Any]],
        committed: asyncio.Future[None],
    ) -> None:
        lock.release_turn()
        error = None if committed.cancelled() else committed.exception()
        self._settle(batch, outcome if error is None else error)

    def _done(
        self, transaction: asyncio.Future[tuple[list[_Pending], list[Any] | BaseException]]
    ) -> None:
        if not transaction.cancelled() and transaction.exception() is None:
            self._settle(*transaction.result())

    def _settle(self, batch: list[_Pending], outcome: list[Any] | BaseException) -> None:
        """Answer each work of a batch: its value or its error, or the error
        that undid the whole transaction (its COMMIT or BEGIN failed)."""
        if batch:
            self.transactions += 1
            self.works += len(batch)
        for index, (_, future, _) in enumerate(batch):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
                continue
            ok, value = outcome[index]
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _transaction(
        self, lock: WriterLock
    ) -> tuple[list[_Pending], list[tuple[bool, Any]] | BaseException]:
        """In the writer thread: the works waiting now, in one transaction."""
        with lock.file_held():
            batch = self._take()
            if not batch:
                return batch, []
            try:
                return batch, self._run([work for work, _, _ in batch])
            except BaseException as error:  # nothing of the batch stays
                return batch, error

    def connection(self) -> Connection:
        """The writer's connection, kept open between transactions (a pool
        check-out and its reset cost more than a small transaction), opened
        again after an error made SQLAlchemy invalidate it."""
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            if conn is not None:
                conn.close()
            conn = self._conn = self._writer.connect()
            conn.execution_options(mssd_write=True)
        return conn

    def close(self) -> None:
        """Close the kept connection (from the writer's thread, after its last
        transaction: :func:`dispose`)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _run(self, works: list[Callable[[Connection], Any]]) -> list[tuple[bool, Any]]:
        transaction, outcomes = self._statements(works)
        self._commit(transaction)
        return outcomes

    def _commit_inline(self, transaction: RootTransaction, lock: WriterLock) -> None:
        """In the writer thread: the COMMIT of statements run on the event loop,
        then the file lock given back from here, as :meth:`WriterLock.file_held`
        does: the other processes never wait for this one's event loop, and a
        loop closed while the COMMIT runs (an engine outliving its loop, in
        tests) leaves no lock held behind it."""
        try:
            self._commit(transaction)
        finally:
            lock.unlock_file()

    def _commit(self, transaction: RootTransaction) -> None:
        """COMMIT what :meth:`_statements` left open. When it fails, the
        connection is left out of any transaction, or invalidated (opened again
        for the next batch): SQLite keeps the transaction open after some
        failed COMMITs (a busy or full disk), where SQLAlchemy only marks it
        over, and every later BEGIN would fail."""
        try:
            transaction.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # (as ``with conn.begin()`` would)
                transaction.rollback()
            conn = self._conn
            if conn is not None and not conn.invalidated:
                driver = conn.connection.driver_connection
                if driver is not None and driver.in_transaction:
                    try:
                        driver.rollback()
                    except Exception:
                        conn.invalidate()
            raise

    def _statements(
        self, works: list[Callable[[Connection], Any]]
    ) -> tuple[RootTransaction, list[tuple[bool, Any]]]:
        """BEGIN and the works, each in a savepoint of its own; the transaction
        is returned open, for :meth:`_commit`. An exception means it was rolled
        back."""
        conn = self.connection()
        transaction = conn.begin()
        try:
            return transaction, self._works(conn, works)
        except BaseException:
            transaction.rollback()
            raise

    def _works(
        self, conn: Connection, works: list[Callable[[Connection], Any]]
    ) -> list[tuple[bool, Any]]:
        if len(works) == 1:
            return [(True, works[0](conn))]  # as a transaction of its own
        outcomes: list[tuple[bool, Any]] = []
        for work in works:
            run_driver_sql(conn, self._savepoint)
            try:
                value = work(conn)
            except Exception as error:
                if not conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
                    # SQLite undid the whole transaction (disk full, I/O
                    # error): every work of the batch fails with it.
                    raise
                run_driver_sql(conn, self._undo)
                run_driver_sql(conn, self._release)
                outcomes.append((False, error))
            else:
                run_driver_sql(conn, self._release)
                outcomes.append((True, value))
        return outcomes


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current_revision)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the schema to ``revision`` (the newest by default); return (before, after)."""

    def run(connection: Connection) -> tuple[str | None, str]:
        before = _current_revision(connection)
        command.upgrade(_alembic_config(connection), revision)
        return before, _current_revision(connection) or ""

    async with engine.begin() as conn:
        return await conn.run_sync(run)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Migrate the schema back to ``revision`` (each migration says how)."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: command.downgrade(_alembic_config(c), revision))


async def check_schema(engine: AsyncEngine) -> None:
    """Refuse to run on a schema this version does not know (DESIGN.md, Storage)."""
    current = await current_revision(engine)
    head = head_revision()
    if current is None:
        raise SchemaError("the database has no mssd schema yet: run `mssd db upgrade`")
    if current != head:
        known = {
            script.revision
            for script in ScriptDirectory.from_config(_alembic_config()).walk_revisions()
        }
        if current in known:
            raise SchemaError(
                f"the database schema is at revision {current}, this mssd needs {head}: "
                "run `mssd db upgrade`"
            )
        raise SchemaError(
            f"the database schema revision {current} is unknown to this mssd "
            "(written by a newer version?); refusing to start"
        )


def describe(url: str) -> dict[str, Any]:
    """What an administrator needs to know about where data lives (no password)."""
    path = _sqlite_file(url)
    if path is not None:
        return {"backend": "sqlite", "path": str(path)}
    return {"backend": url.split(":", 1)[0], "url": url.split("@")[-1]}
