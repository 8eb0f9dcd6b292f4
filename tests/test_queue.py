"""The outbound queue: entries written with their message, claimed once by concurrent
workers, administered with `mssd queue`; submission to the trust space, on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    OTHER_OPERATOR_DOMAIN,
    PER,
    MssdProcess,
    PkiBundle,
    new_message,
    run,
    seed,
    start_mssd,
    store_url_for,
)
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine
from test_cli import Cli

from mssd.store import queue
from mssd.store.delivery import GroupCommitter, NewMessage, RecipientRecord
from mssd.store.engine import create_engine, downgrade, upgrade

REMOTE = f"confrere@{OTHER_OPERATOR_DOMAIN}"


def _message(recipients: tuple[RecipientRecord, ...], n: int = 0) -> NewMessage:
    content = f"Subject: test {n}\r\n\r\nbody {n}\r\n".encode()
    return new_message(content, recipients, dsn_ret="HDRS", dsn_envid="ENV+2B1")


async def _store(url: str, messages: list[NewMessage]) -> None:
    engine = create_engine(url)
    committer = GroupCommitter(engine)
    committer.start()
    try:
        await asyncio.gather(*(committer.store(m) for m in messages))
    finally:
        await committer.stop()
        await engine.dispose()


async def test_remote_recipients_are_queued_with_the_message(store_url: str) -> None:
    engine = create_engine(store_url)
    try:
        await upgrade(engine)
        records = (
            RecipientRecord(REMOTE, None, dsn_notify="FAILURE,SUCCESS", dsn_orcpt="rfc822;x@y"),
            RecipientRecord(f"autre@{OTHER_OPERATOR_DOMAIN}", None),
        )
        await _store(store_url, [_message(records)])
        entries = await queue.list_entries(engine)
        assert [(e.address, e.state, e.attempts) for e in entries] == [
            (REMOTE, "queued", 0),
            (f"autre@{OTHER_OPERATOR_DOMAIN}", "queued", 0),
        ]
        first = entries[0]
        assert (first.dsn_notify, first.dsn_orcpt, first.dsn_ret, first.dsn_envid) == (
            "FAILURE,SUCCESS",
            "rfc822;x@y",
            "HDRS",
            "ENV+2B1",
        )
        assert first.domain == OTHER_OPERATOR_DOMAIN and first.mail_from == PER
        assert await queue.read_content(engine, first.blob_sha256) == _message(records).content
    finally:
        await engine.dispose()


async def test_concurrent_workers_never_claim_the_same_entry(store_url: str) -> None:
    setup = create_engine(store_url)
    await upgrade(setup)
    await setup.dispose()
    await _store(store_url, [_message((RecipientRecord(REMOTE, None),), n) for n in range(60)])
    engines = [create_engine(store_url) for _ in range(4)]
    try:

        async def worker(engine: object) -> list[int]:
            taken: list[int] = []
            while True:
                batch = await queue.claim(engine, limit=7, lease_seconds=60)  # type: ignore[arg-type]
                if not batch:
                    return taken
                taken += [e.id for e in batch]
                await asyncio.sleep(0)

        claimed = await asyncio.gather(*(worker(e) for e in engines))
        every = [entry for taken in claimed for entry in taken]
        assert len(every) == 60 and len(set(every)) == 60
        # Leased: nothing is due until the lease ends.
        assert await queue.claim(engines[0], limit=100, lease_seconds=60) == []
        later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=61)
        again = await queue.claim(engines[0], limit=100, lease_seconds=60, now=later)
        assert len(again) == 60 and all(e.attempts == 2 for e in again)
    finally:
        for engine in engines:
            await engine.dispose()


async def test_an_outcome_from_a_lapsed_claim_is_ignored(store_url: str) -> None:
    engine = create_engine(store_url)
    try:
        await upgrade(engine)
        await _store(store_url, [_message((RecipientRecord(REMOTE, None),))])
        [first] = await queue.claim(engine, limit=10, lease_seconds=1)
        later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
        [second] = await queue.claim(engine, limit=10, lease_seconds=60, now=later)
        assert first.id == second.id and first.claim_token != second.claim_token
        stale = queue.Outcome(first.id, first.claim_token or "", "delivered")
        assert (await queue.record(engine, [stale])).updated == set()
        deferred = queue.Outcome(
            second.id,
            second.claim_token or "",
            "queued",
            error="451 4.4.0 try later",
            next_attempt_at=later,
        )
        assert (await queue.record(engine, [deferred])).updated == {second.id}
        shown = await queue.get_entry(engine, second.id)
        assert shown is not None and shown.state == "queued"
        assert shown.last_error == "451 4.4.0 try later" and shown.attempts == 2
    finally:
        await engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def relay_off(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[MssdProcess]:
    """mssd with the relay worker off: queued entries stay for inspection."""
    workdir = tmp_path_factory.mktemp(f"queue-{request.param}")
    for url in store_url_for(request.param, workdir):
        run(seed(url, test_pki))
        server = start_mssd(url, test_pki, workdir, MSSD_RELAY_ENABLED="false")
        try:
            yield server
        finally:
            server.stop()


def test_submission_queues_the_trust_space_and_refuses_the_rest(
    relay_off: MssdProcess, tmp_path: Path
) -> None:
    with relay_off.smtp() as client:
        assert client.docmd("MAIL", f"FROM:<{PER}> RET=HDRS ENVID=queue-test")[0] == 250
        code, text = client.docmd("RCPT", "TO:<quelquun@hors-espace.example.com>")
        assert (code, text) == (
            550,
            b"5.7.1 <quelquun@hors-espace.example.com>: recipient domain is outside the "
            b"MSSant\xc3\xa9 trust space",
        )
        assert client.docmd("RCPT", f"TO:<{REMOTE}> NOTIFY=SUCCESS,FAILURE")[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: pour un confrere\r\nX-MSS-NIL: logiciel\r\n\r\nBonjour\r\n.\r\n")
        code, _ = client.getreply()
        assert code == 250
    cli = Cli(relay_off.url, tmp_path)
    listing = cli.ok("queue", "list")
    line = next(line for line in listing.splitlines() if f"<{REMOTE}>" in line)
    entry_id = line.split()[0]
    assert "queued" in line and f"<{PER}>" in line
    shown = cli.ok("queue", "show", entry_id)
    assert "NOTIFY=FAILURE,SUCCESS" in shown and "ENVID=queue-test" in shown
    assert "RET=HDRS" in shown
    assert "will be tried again now" in cli.ok("queue", "retry", entry_id)
    assert "deleted" in cli.ok("queue", "delete", entry_id)
    result = cli("queue", "show", entry_id)
    assert result.returncode == 1 and f"no queue entry {entry_id}" in result.stderr
    assert cli("queue", "retry", "999999").returncode == 1


def test_port_25_never_relays(relay_off: MssdProcess) -> None:
    import smtplib
    import ssl

    context = ssl.create_default_context(cafile=str(relay_off.pki.dev.ca_bundle))
    context.load_cert_chain(str(relay_off.pki.app.cert), str(relay_off.pki.app.key))
    with smtplib.SMTP("127.0.0.1", relay_off.mta, timeout=30) as client:
        client.starttls(context=context)
        client.ehlo("mx.autre-operateur.mssd.test")
        assert client.docmd("MAIL", f"FROM:<x@{OTHER_OPERATOR_DOMAIN}>")[0] == 250
        code, text = client.docmd("RCPT", f"TO:<y@{OTHER_OPERATOR_DOMAIN}>")
        assert code == 550 and b"relaying denied" in text


async def test_migration_0008_keeps_every_entry_and_drops_the_copies(store_url: str) -> None:
    """Up to 0007 each remote recipient was copied into its queue entry; 0008 refers to
    the recipient instead. Entries written the old way read the same after the
    migration, and come back with their copies after a downgrade."""
    engine = create_engine(store_url)
    try:
        await upgrade(engine, "0007")
        arrival = dt.datetime(2026, 12, 1, 8, 30, tzinfo=dt.UTC)
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO blobs (sha256, size, data, created_at) VALUES ('ab', 1, :d, :t)"),
                {"d": b"x", "t": arrival},
            )
            await conn.execute(
                text(
                    "INSERT INTO envelopes (id, blob_sha256, mail_from, source, remote, smtputf8,"
                    " received_at) VALUES ('E1', 'ab', :f, 'submission', '127.0.0.1', :u, :t)"
                ),
                {"f": PER, "u": False, "t": arrival},
            )
            recipients = [
                (REMOTE, "SUCCESS", "rfc822;x@y", "relayed", "delivered"),
                # Its entry was deleted (mssd queue delete): the recipient stays alone.
                (f"supprime@{OTHER_OPERATOR_DOMAIN}", None, None, "queued", None),
                (f"autre@{OTHER_OPERATOR_DOMAIN}", None, None, "queued", "queued"),
            ]
            for address, notify, orcpt, status, state in recipients:
                await conn.execute(
                    text(
                        "INSERT INTO envelope_recipients (envelope_id, address, mailbox_id,"
                        " dsn_notify, dsn_orcpt, status) VALUES ('E1', :a, NULL, :n, :o, :s)"
                    ),
                    {"a": address, "n": notify, "o": orcpt, "s": status},
                )
                if state is not None:
                    await conn.execute(
                        text(
                            "INSERT INTO outbound_queue (envelope_id, address, domain,"
                            " dsn_notify, dsn_orcpt, state, attempts, next_attempt_at,"
                            " delay_reported, created_at) VALUES ('E1', :a, :d, :n, :o, :s, 1,"
                            " :t, :r, :t)"
                        ),
                        {
                            "a": address,
                            "d": address.rpartition("@")[2],
                            "n": notify,
                            "o": orcpt,
                            "s": state,
                            "t": arrival,
                            "r": False,
                        },
                    )

        def described(e: queue.QueueEntry) -> tuple[object, ...]:
            return (e.envelope_id, e.address, e.domain, e.dsn_notify, e.dsn_orcpt, e.state,
                    e.created_at)  # fmt: skip

        await upgrade(engine)
        every = ("queued", "sending", "delivered", "failed")
        assert [described(e) for e in await queue.list_entries(engine, states=every)] == [
            ("E1", REMOTE, OTHER_OPERATOR_DOMAIN, "SUCCESS", "rfc822;x@y", "delivered", arrival),
            ("E1", f"autre@{OTHER_OPERATOR_DOMAIN}", OTHER_OPERATOR_DOMAIN, None, None, "queued",
             arrival),
        ]  # fmt: skip
        assert await _columns(engine) == [
            "attempts", "claim_token", "delay_reported", "id", "last_attempt_at", "last_error",
            "next_attempt_at", "recipient_id", "remote_mta", "state",
        ]  # fmt: skip
        await downgrade(engine, "0007")
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT address, domain, dsn_notify, state FROM outbound_queue ORDER BY id")
            )
            assert [tuple(row) for row in rows] == [
                (REMOTE, OTHER_OPERATOR_DOMAIN, "SUCCESS", "delivered"),
                (f"autre@{OTHER_OPERATOR_DOMAIN}", OTHER_OPERATOR_DOMAIN, None, "queued"),
            ]
    finally:
        await engine.dispose()


async def _columns(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda c: sorted(col["name"] for col in inspect(c).get_columns("outbound_queue"))
        )
