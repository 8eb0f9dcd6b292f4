"""Authentication failure limits hold across the mssd processes of one
PostgreSQL (DESIGN.md, "Security rules" and "Scale-out"): failures and resets
travel between processes over LISTEN/NOTIFY (``mssd.auth.ratelimit``), as
digests. Real ``mssd serve`` with two IMAP processes behind a PROXY protocol
balancer (the client address each test chooses is the one counted), then two
change buses in one test process for what a real process cannot show."""

from __future__ import annotations

import asyncio
import imaplib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from auth_fakes import AuditList, Clock, MemoryAccounts
from conftest import (
    PASSWORD,
    PER,
    PER2,
    MssdProcess,
    PkiBundle,
    _asyncpg_dsn,
    serve_seeded,
    store_url_for,
)
from proxy_headers import v2
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from test_auth_passwords import ALICE, SETTINGS, plain
from test_imap_proxy_protocol import ProxiedIMAP4_SSL
from test_imap_workers import children, owner_of, wait_for

from mssd.auth import AuthContext, Authenticator, Failure
from mssd.auth.ratelimit import CHANNEL, AuthRateLimiter
from mssd.store.changes import APPLICATION_NAME, ChangeBus
from mssd.store.engine import create_engine, upgrade

ACCOUNT_LIMIT = 3
ADDRESS_LIMIT = 4
REFUSED = "[UNAVAILABLE] too many failed attempts"
FAILED = "[AUTHENTICATIONFAILED]"


# -- two IMAP processes of a real mssd serve ---------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle) -> Iterator[MssdProcess]:
    workdir = tmp_path_factory.mktemp("mssd-shared-limits")
    for url in store_url_for("postgresql", workdir):
        yield from serve_seeded(
            url,
            test_pki,
            workdir,
            MSSD_IMAP_WORKERS="2",
            MSSD_IMAP_PROXY_PROTOCOL="true",
            MSSD_IMAP_PROXY_PROTOCOL_NETWORKS="127.0.0.0/8",
            MSSD_AUTH_FAILURE_LIMIT_PER_ACCOUNT=str(ACCOUNT_LIMIT),
            MSSD_AUTH_FAILURE_LIMIT_PER_ADDRESS=str(ADDRESS_LIMIT),
        )


def processes(server: MssdProcess) -> tuple[int, int]:
    """The pids of the two IMAP processes: ``mssd serve`` and its worker."""
    assert server.process is not None
    parent = server.process.pid
    wait_for(lambda: len(children(parent)) == 1)
    (worker,) = children(parent)
    return parent, worker


def session(server: MssdProcess, pid: int, client_address: str) -> ProxiedIMAP4_SSL:
    """A connection on 993 served by process ``pid``, from ``client_address`` as
    the balancer says. The kernel picks the process: connect until it is ``pid``."""
    header = v2(client_address, "192.0.2.1", 40000, 993)
    for _ in range(100):
        client = ProxiedIMAP4_SSL(server.imaps, header, server.pki.client_context())
        if owner_of(client.sock, list(processes(server))) == pid:
            return client
        client.shutdown()
    raise AssertionError(f"no connection reached process {pid}")


def login(client: imaplib.IMAP4, user: str, password: str) -> str:
    """``OK``, or the text of the tagged NO (with its response code)."""
    try:
        client.login(user, password)
    except client.error as error:
        return str(error)
    return "OK"


class Overhearing:
    """What travels on the failure channel, heard as any session on the database
    can hear it (a LISTEN of our own, on a thread of its own)."""

    def __init__(self, url: str) -> None:
        self.payloads: list[str] = []
        self._dsn = _asyncpg_dsn(url)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._connection: Any = None

    def __enter__(self) -> Overhearing:
        self._thread.start()
        self._connection = self._run(self._listen())
        return self

    def __exit__(self, *_: object) -> None:
        self._run(self._connection.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _listen(self) -> Any:
        connection = await asyncpg.connect(self._dsn)
        await connection.add_listener(CHANNEL, lambda *args: self.payloads.append(args[3]))
        return connection

    def settle(self, count: int) -> None:
        """Let ``count`` payloads go by (the processes' listeners hear them when
        this one does, and get a moment to take them in). Gives up after a few
        seconds: what the clients see afterwards is what the test asserts."""
        deadline = time.monotonic() + 5
        while len(self.payloads) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)


def test_failed_logins_spread_over_processes_are_refused_after_the_account_limit(
    server: MssdProcess,
) -> None:
    first, second = processes(server)
    with Overhearing(server.url) as overheard:
        a = session(server, first, "198.51.100.1")
        b = session(server, second, "198.51.100.1")
        assert FAILED in login(a, PER, "guess 1")
        assert FAILED in login(b, PER, "guess 2")
        assert FAILED in login(a, PER, "guess 3")
        overheard.settle(ACCOUNT_LIMIT)
        # From another address (whose own count is 0), in either process: the
        # account had its 3 failures, the right password is not even looked at.
        for pid in (second, first):
            late = session(server, pid, "198.51.100.2")
            assert REFUSED in login(late, PER, PASSWORD)
            late.shutdown()
        a.shutdown()
        b.shutdown()
    # Neither the login nor the client address is on the wire.
    assert len(overheard.payloads) == ACCOUNT_LIMIT
    for payload in overheard.payloads:
        assert PER.lower() not in payload.lower() and "198.51.100" not in payload


def test_a_success_in_one_process_resets_the_account_in_the_others(server: MssdProcess) -> None:
    first, second = processes(server)
    with Overhearing(server.url) as overheard:
        a = session(server, first, "198.51.100.11")
        b = session(server, second, "198.51.100.11")
        assert FAILED in login(a, PER2, "guess 1")
        assert FAILED in login(b, PER2, "guess 2")
        overheard.settle(2)
        assert login(a, PER2, PASSWORD) == "OK"
        overheard.settle(3)  # the reset
        # Had the second process kept the 2 failures from before the success,
        # 2 more would lock the account there.
        c = session(server, second, "198.51.100.12")
        assert FAILED in login(c, PER2, "guess 3")
        assert FAILED in login(c, PER2, "guess 4")
        assert login(c, PER2, PASSWORD) == "OK"
        for client in (a, b, c):
            client.shutdown()


def test_failed_logins_from_one_address_spread_over_processes_are_refused_after_its_limit(
    server: MssdProcess,
) -> None:
    first, second = processes(server)
    attacker = "203.0.113.66"
    with Overhearing(server.url) as overheard:
        a = session(server, first, attacker)
        b = session(server, second, attacker)
        for i in range(ADDRESS_LIMIT):
            # Never the same login twice: no account limit is reached.
            assert FAILED in login((a, b)[i % 2], f"nobody{i}@mssd.test", "guess")
        overheard.settle(ADDRESS_LIMIT)
        for client in (a, b):
            assert REFUSED in login(client, PER2, PASSWORD)
        # Another address is not concerned.
        other = session(server, second, "198.51.100.21")
        assert login(other, PER2, PASSWORD) == "OK"
        for client in (a, b, other):
            client.shutdown()


# -- two change buses in one process -----------------------------------------------------------


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    yield from store_url_for("postgresql", tmp_path)


@pytest.fixture
async def engines(postgres_url: str) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """Two engines on one database: two processes' pools."""
    first, second = create_engine(postgres_url), create_engine(postgres_url)
    await upgrade(first)
    yield first, second
    await first.dispose()
    await second.dispose()


async def sharing(engine: AsyncEngine, clock: Clock) -> tuple[ChangeBus, AuthRateLimiter]:
    """A bus and a limiter wired as ``mssd.app`` wires them."""
    bus = ChangeBus(engine)
    await bus.start()
    limiter = AuthRateLimiter(SETTINGS, clock=clock)
    limiter.share(lambda payload: bus.post(CHANNEL, payload))
    await bus.listen(CHANNEL, limiter.receive)
    return bus, limiter


async def eventually(predicate: Any) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_failures_sent_in_one_transaction_count_one_by_one(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    # PostgreSQL delivers identical payloads of one transaction once: the
    # sender batches, so each payload must differ from the previous ones.
    clock = Clock()
    (bus_a, a), (bus_b, b) = [await sharing(engine, clock) for engine in engines]
    try:
        for _ in range(ACCOUNT_LIMIT):
            a.failure("alice@mssd.test", "192.0.2.1")
        await eventually(lambda: b.account_failures("alice@mssd.test") == ACCOUNT_LIMIT)
        assert b.limited("alice@mssd.test", "192.0.2.2") == "account"
    finally:
        await bus_a.stop()
        await bus_b.stop()


async def test_sharing_resumes_after_the_listening_connection_is_lost(
    postgres_url: str, engines: tuple[AsyncEngine, AsyncEngine]
) -> None:
    clock = Clock()
    (bus_a, a), (bus_b, b) = [await sharing(engine, clock) for engine in engines]
    try:
        a.failure("alice@mssd.test", "192.0.2.1")
        await eventually(lambda: b.account_failures("ALICE@mssd.test") == 1)
        conn = await asyncpg.connect(_asyncpg_dsn(postgres_url))
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1 AND datname = current_database()",
                APPLICATION_NAME,
            )
        finally:
            await conn.close()
        await eventually(lambda: bus_a.reconnects == 1 and bus_b.reconnects == 1)
        a.failure("alice@mssd.test", "192.0.2.1")
        b.failure("alice@mssd.test", "192.0.2.2")
        await eventually(lambda: b.account_failures("alice@mssd.test") == 3)
        await eventually(lambda: a.account_failures("alice@mssd.test") == 3)
        assert a.limited("alice@mssd.test", "192.0.2.3") == "account"
        assert b.address_failures("192.0.2.1") == 2
        b.success("alice@mssd.test")
        await eventually(lambda: a.account_failures("alice@mssd.test") == 0)
    finally:
        await bus_a.stop()
        await bus_b.stop()


async def test_a_notification_that_cannot_be_sent_neither_fails_nor_delays_a_login(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A pool of one connection, held by the test: the sender waits for it.
    engine = create_async_engine(postgres_url, pool_size=1, max_overflow=0, pool_timeout=1)
    bus = ChangeBus(engine)
    await bus.start()
    try:
        auth = Authenticator(SETTINGS, MemoryAccounts(ALICE), AuditList(), clock=Clock())
        auth.limiter.share(lambda payload: bus.post(CHANNEL, payload))
        ctx = AuthContext(protocol="imap", remote_ip="192.0.2.7", tls=True)
        with caplog.at_level(logging.WARNING, logger="mssd.store.changes"):
            async with engine.connect():
                for _ in range(ACCOUNT_LIMIT):
                    result = await asyncio.wait_for(plain(auth, ALICE.login, "guess", ctx), 5)
                    assert isinstance(result, Failure) and not result.temporary
                limited = await plain(auth, ALICE.login, PASSWORD, ctx)
                assert isinstance(limited, Failure) and limited.temporary
                await eventually(lambda: bus.posts_dropped == ACCOUNT_LIMIT)
        assert "could not send" in caplog.text
    finally:
        await bus.stop()
        await engine.dispose()


# -- the payloads ------------------------------------------------------------------------------


def test_a_success_with_nothing_to_forget_publishes_nothing() -> None:
    published: list[str] = []
    limiter = AuthRateLimiter(SETTINGS, clock=Clock())
    limiter.share(published.append)
    limiter.success("alice@mssd.test", "Alice@mssd.test")
    assert published == []
    limiter.failure("alice@mssd.test", "192.0.2.1")
    limiter.success("alice@mssd.test", "Alice@mssd.test")
    assert [p.split(":")[2] for p in published] == ["failure", "reset"]


def test_own_and_malformed_payloads_change_nothing(caplog: pytest.LogCaptureFixture) -> None:
    published: list[str] = []
    sender = AuthRateLimiter(SETTINGS, clock=Clock())
    sender.share(published.append)
    sender.failure("alice@mssd.test", "192.0.2.1")
    sender.receive(published[0])  # its own, heard back: counted once already
    assert sender.account_failures("alice@mssd.test") == 1
    origin, seq, _kind, address, account = published[0].split(":")
    receiver = AuthRateLimiter(SETTINGS, clock=Clock())
    for garbage in (
        "",
        f"{origin}x:{seq}:failure:{address}",
        f"{origin}x:{seq}:failure:alice@mssd.test:{account}",
        f"{origin}x:x:failure:{address}:{account}",
        f"{origin}x:{seq}:reset:{account}:{account}",
        f"{origin}x:{seq}:unknown:{account}",
    ):
        receiver.receive(garbage)
    assert len(receiver.accounts) == len(receiver.addresses) == 0
    assert caplog.text.count("ignoring malformed authentication failure notification") == 6
    receiver.receive(published[0])
    assert receiver.account_failures("ALICE@mssd.test") == 1
    assert receiver.address_failures("192.0.2.1") == 1
