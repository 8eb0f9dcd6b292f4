"""The report owed to a sender when a mailbox turns out full after RCPT (RFC 5321 §6.1:
after the 250, a failure is reported, never dropped), on SQLite and PostgreSQL: owed
from the message's own commit, made once after it, and made by the recovery pass of
``mssd serve`` when the store refused it (or the process died) in between."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import sqlalchemy as sa
import test_store_mailstore
from conftest import OTHER_OPERATOR_DOMAIN, PER, PER2, MssdProcess, inbox, new_message, run
from sqlalchemy.ext.asyncio import AsyncEngine
from store_faults import allow, refuse
from test_quota import (
    KIB,
    assert_reports_on_a_full_mailbox,
    fill,
    fresh,
    send_without_size,
    sized,
)
from test_store_quota import to

from mssd.delivery.dsn import Reporter
from mssd.delivery.local_reports import OwedReports
from mssd.store import admin
from mssd.store.accounts import StoreAccounts
from mssd.store.delivery import DueReports, GroupCommitter
from mssd.store.engine import create_engine, dispose, downgrade, upgrade
from mssd.store.schema import envelope_recipients, envelopes

seeded = test_store_mailstore.seeded
engine = test_store_mailstore.engine
ARRIVAL = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC)
REMOTE = f"dr-distant@{OTHER_OPERATOR_DOMAIN}"


async def _owed(url: str) -> list[tuple[str, str]]:
    store = create_engine(url)
    try:
        async with store.connect() as conn:
            rows = await conn.execute(
                sa.select(envelope_recipients.c.address, envelope_recipients.c.report_due)
                .where(envelope_recipients.c.report_due.is_not(None))
                .order_by(envelope_recipients.c.id)
            )
            return [(address, due) for address, due in rows]
    finally:
        await store.dispose()


def owed(mssd: MssdProcess) -> list[tuple[str, str]]:
    """(recipient, reason) of every report the store still owes."""
    return list(run(_owed(mssd.url)))


def reports_on(mssd: MssdProcess, subject: str) -> list[bytes]:
    """The reports in the sender's (PER's) INBOX on the message titled ``subject``."""
    return [
        content
        for _, content in inbox(mssd, PER)
        if b"multipart/report" in content and f"Subject: {subject}".encode() in content
    ]


def send_to_a_full_mailbox(mssd: MssdProcess, subject: str) -> str:
    """PER sends to a mailbox that fills up between RCPT and DATA, and to PER2, asking
    for every report; returns the full mailbox's address."""
    small = fresh(mssd, 10 * KIB)
    fill(mssd, small, 2 * KIB)
    with mssd.smtp() as client:
        # 12 KiB with the trace fields: it passes RCPT (no SIZE) and fits nowhere in small.
        send_without_size(client, PER, [small, PER2], sized(11 * KIB, subject), "SUCCESS,FAILURE")
    assert f"Subject: {subject}".encode() in inbox(mssd, PER2)[-1][1]
    return small


def wait_for_reports(mssd: MssdProcess, subject: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(reports_on(mssd, subject)) < count:
        assert time.monotonic() < deadline, f"no report on {subject!r} reached the sender"
        time.sleep(0.2)


async def recover(url: str, passes: int) -> list[int]:
    """Run the recovery pass ``passes`` times at once, each as a process of its own
    would (its own engine, committer and reporter); what each reported on."""
    engines = [create_engine(url) for _ in range(passes)]
    committers = [GroupCommitter(e) for e in engines]
    for committer in committers:
        committer.start()
    try:
        recoveries = [
            OwedReports(
                e,
                c,
                Reporter(StoreAccounts(e), hostname="mssd.test", trust_space=lambda: None),
                hostname="mssd.test",
            )
            for e, c in zip(engines, committers, strict=True)
        ]
        return list(await asyncio.gather(*(r.run_once() for r in recoveries)))
    finally:
        for committer in committers:
            await committer.stop()
        for e in engines:
            await dispose(e)


# -- through mssd ----------------------------------------------------------------------


def test_reports_made_after_the_commit_leave_nothing_owed(mssd: MssdProcess) -> None:
    subject = "sans panne"
    small = send_to_a_full_mailbox(mssd, subject)
    wait_for_reports(mssd, subject, 2)
    assert_reports_on_a_full_mailbox(reports_on(mssd, subject), small)
    assert owed(mssd) == []


def test_report_the_store_refused_after_the_250_is_made_when_mssd_starts_again(
    mssd: MssdProcess,
) -> None:
    # The store refuses every report (as a full disk would) from the 250 on: the
    # message is acknowledged and placed, its reports cannot be written.
    run(refuse(mssd.url, "no_reports", "envelopes", "INSERT", "NEW.source = 'report'"))
    try:
        subject = "rapport perdu au redemarrage"
        small = send_to_a_full_mailbox(mssd, subject)
        # The pipeline tried before answering 250 (DeliveryPipeline.accept).
        assert reports_on(mssd, subject) == []
        mssd.stop()
    finally:
        run(allow(mssd.url, "no_reports", "envelopes"))
    mssd.start()
    wait_for_reports(mssd, subject, 2)
    assert_reports_on_a_full_mailbox(reports_on(mssd, subject), small)
    assert owed(mssd) == []


def test_recovery_passes_run_together_or_again_make_each_report_once(
    mssd: MssdProcess,
) -> None:
    run(refuse(mssd.url, "no_reports", "envelopes", "INSERT", "NEW.source = 'report'"))
    try:
        subject = "rapport repris deux fois"
        small = send_to_a_full_mailbox(mssd, subject)
    finally:
        run(allow(mssd.url, "no_reports", "envelopes"))
    assert [address for address, _ in owed(mssd)] == [small]
    # Two processes' passes at once (on PostgreSQL: SKIP LOCKED), then another one.
    assert sorted(run(recover(mssd.url, 2))) == [0, 1]
    assert run(recover(mssd.url, 1)) == [0]
    assert_reports_on_a_full_mailbox(reports_on(mssd, subject), small)
    assert owed(mssd) == []


# -- in the store ----------------------------------------------------------------------


async def test_the_refused_row_is_marked_owed_unless_the_sender_is_null(
    engine: AsyncEngine,
) -> None:
    await admin.set_quota(engine, PER2, 4 * KIB, actor="test")
    committer = GroupCommitter(engine)
    committer.start()
    try:
        recipients = [await to(engine, PER), await to(engine, PER2)]
        content = sized(5 * KIB, "pour deux")
        stored = await committer.store(new_message(content, recipients))
        # RFC 3461 §6.2: nothing is ever reported about mail from the null sender.
        bounce = await committer.store(new_message(content, recipients, mail_from=""))
        assert [r.address for r in stored.over_quota + bounce.over_quota] == [PER2, PER2]
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(
                    envelope_recipients.c.envelope_id,
                    envelope_recipients.c.address,
                    envelope_recipients.c.status,
                    envelope_recipients.c.report_due,
                ).order_by(envelope_recipients.c.id)
            )
            assert [tuple(row) for row in rows] == [
                (stored.envelope_id, PER, "delivered", None),
                (stored.envelope_id, PER2, "over_quota", stored.over_quota[0].reason),
                (bounce.envelope_id, PER, "delivered", None),
                (bounce.envelope_id, PER2, "over_quota", None),
            ]
        # The reports' transaction clears the marks; a second one finds nothing owed.
        report = new_message(b"Subject: rapport\r\n\r\nx\r\n", [recipients[0]], mail_from="")
        assert await committer.fulfil(DueReports(stored.envelope_id, (report,))) is not None
        again = new_message(b"Subject: encore\r\n\r\nx\r\n", [recipients[0]], mail_from="")
        assert await committer.fulfil(DueReports(stored.envelope_id, (again,))) is None
    finally:
        await committer.stop()
    async with engine.connect() as conn:
        marks = sa.select(sa.func.count()).where(envelope_recipients.c.report_due.is_not(None))
        assert await conn.scalar(marks) == 0
        envelope_ids = set(await conn.scalars(sa.select(envelopes.c.id)))
    assert report.envelope_id in envelope_ids and again.envelope_id not in envelope_ids


async def _indexes(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda c: sorted(i["name"] for i in sa.inspect(c).get_indexes("envelope_recipients"))
        )


async def _columns(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda c: [col["name"] for col in sa.inspect(c).get_columns("envelope_recipients")]
        )


async def test_migration_0009_adds_the_mark_and_takes_it_away(engine: AsyncEngine) -> None:
    """Rows refused before 0009 are not marked (their reports were made, or lost, then);
    a downgrade drops the column and its index and keeps every row."""
    await downgrade(engine, "0008")
    assert "report_due" not in await _columns(engine)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("INSERT INTO blobs (sha256, size, data, created_at) VALUES ('ab', 1, :d, :t)"),
            {"d": b"x", "t": ARRIVAL},
        )
        await conn.execute(
            sa.text(
                "INSERT INTO envelopes (id, blob_sha256, mail_from, source, remote, smtputf8,"
                " received_at) VALUES ('E1', 'ab', :f, 'submission', '127.0.0.1', :u, :t)"
            ),
            {"f": PER, "u": False, "t": ARRIVAL},
        )
        for address, status in ((PER2, "over_quota"), (REMOTE, "queued")):
            await conn.execute(
                sa.text(
                    "INSERT INTO envelope_recipients (envelope_id, address, status)"
                    " VALUES ('E1', :a, :s)"
                ),
                {"a": address, "s": status},
            )
        # A queue entry refers to its recipient row: the column must go without
        # replacing the table (SQLite's batch mode would, and fail on this reference).
        await conn.execute(
            sa.text(
                "INSERT INTO outbound_queue (recipient_id, state, attempts, next_attempt_at,"
                " delay_reported) SELECT id, 'queued', 0, :t, :r FROM envelope_recipients"
                " WHERE address = :a"
            ),
            {"t": ARRIVAL, "r": False, "a": REMOTE},
        )
    rows = "SELECT address, status, report_due FROM envelope_recipients ORDER BY id"
    await upgrade(engine)
    assert "report_due" in await _columns(engine)
    assert "ix_envelope_recipients_report_due" in await _indexes(engine)
    async with engine.begin() as conn:
        assert [tuple(r) for r in await conn.execute(sa.text(rows))] == [
            (PER2, "over_quota", None),
            (REMOTE, "queued", None),
        ]
        await conn.execute(sa.text("UPDATE envelope_recipients SET report_due = 'plein'"))
    await downgrade(engine, "0008")
    assert "report_due" not in await _columns(engine)
    assert "ix_envelope_recipients_report_due" not in await _indexes(engine)
    async with engine.connect() as conn:
        found = await conn.execute(sa.text(rows.replace(", report_due", "")))
        assert [tuple(r) for r in found] == [(PER2, "over_quota"), (REMOTE, "queued")]
        assert await conn.scalar(sa.text("SELECT count(*) FROM outbound_queue")) == 1
    await upgrade(engine)
    assert "report_due" in await _columns(engine)
