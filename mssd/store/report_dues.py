"""Reports owed to senders on messages a full mailbox refused (RFC 5321 §6.1).

The group committer marks a recipient row refused for want of room with the reason
(``envelope_recipients.report_due``) in the message's own transaction; the reports on
it are then made after the commit (``mssd.delivery.local_reports``) and written as a
:class:`~mssd.store.delivery.DueReports`, whose transaction clears the marks
(:func:`claim_owed`). Marks a crash or a failed write left behind are found again by
:func:`owed_envelopes`, for the recovery pass of ``mssd serve``.

Invariants:
- a report is written only in the transaction that clears its envelope's marks, and
  only if it cleared some: "stored" and "no longer owed" are one commit, and two
  writers (the pipeline and the recovery pass, or two processes) never both write it;
- on PostgreSQL the claim locks the envelope row ``FOR NO KEY UPDATE SKIP LOCKED``
  (DESIGN.md, Scale-out): a writer never waits for another one's envelope.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store.engine import run_read
from mssd.store.schema import envelope_recipients, envelopes


def claim_owed(conn: Connection, envelope_ids: Sequence[str]) -> set[str]:
    """Which of these envelopes still owe their reports; their marks are cleared here,
    so the reports the caller writes in this transaction are never written twice."""
    ids = sorted(set(envelope_ids))
    if conn.dialect.name == "postgresql":
        # Processes sharing the store each take the envelopes no other one holds
        # (DESIGN.md, Scale-out); a held envelope is being reported on by its holder.
        # FOR NO KEY UPDATE: recipient rows referring to it are not kept waiting.
        ids = list(
            conn.scalars(
                select(envelopes.c.id)
                .where(envelopes.c.id.in_(ids))
                .order_by(envelopes.c.id)
                .with_for_update(skip_locked=True, key_share=True)
            )
        )
    claimed: set[str] = set()
    for envelope_id in ids:
        # A fresh statement: it sees a clearing committed by whoever held the envelope
        # before (READ COMMITTED; SQLite's write lock serialises writers anyway).
        cleared = conn.execute(
            update(envelope_recipients)
            .where(
                envelope_recipients.c.envelope_id == envelope_id,
                envelope_recipients.c.report_due.is_not(None),
            )
            .values(report_due=None)
        )
        if cleared.rowcount:
            claimed.add(envelope_id)
    return claimed


@dataclass(frozen=True)
class OwedRecipient:
    """A recipient row of an envelope that still owes reports."""

    address: str
    mailbox_id: int | None
    dsn_notify: str | None
    dsn_orcpt: str | None
    status: str
    report_due: str | None
    """Why its mailbox refused the message, while the report on it is owed."""


@dataclass(frozen=True)
class OwedEnvelope:
    """An envelope whose report is still owed, with what the report needs to say."""

    envelope_id: str
    mail_from: str
    blob_sha256: str
    received_at: dt.datetime
    dsn_ret: str | None
    dsn_envid: str | None
    recipients: tuple[OwedRecipient, ...]
    """All of them, in the order they were given (the delivered ones too)."""


async def owed_envelopes(
    engine: AsyncEngine, *, received_before: dt.datetime, after: str = "", limit: int = 100
) -> list[OwedEnvelope]:
    """Up to ``limit`` envelopes that still owe reports (``report_due``), received
    before ``received_before``, in envelope id order after ``after``: the recovery
    pass's work (``mssd.delivery.local_reports``). Nothing is claimed here: the
    :class:`DueReports` written for them does that."""

    def read(conn: Connection) -> list[OwedEnvelope]:
        ids = list(
            conn.scalars(
                select(envelope_recipients.c.envelope_id)
                .join(envelopes, envelopes.c.id == envelope_recipients.c.envelope_id)
                .where(
                    envelope_recipients.c.report_due.is_not(None),
                    envelope_recipients.c.envelope_id > after,
                    envelopes.c.received_at < received_before,
                )
                .group_by(envelope_recipients.c.envelope_id)
                .order_by(envelope_recipients.c.envelope_id)
                .limit(limit)
            )
        )
        if not ids:
            return []
        rows = conn.execute(
            select(
                envelope_recipients.c.envelope_id,
                envelope_recipients.c.address,
                envelope_recipients.c.mailbox_id,
                envelope_recipients.c.dsn_notify,
                envelope_recipients.c.dsn_orcpt,
                envelope_recipients.c.status,
                envelope_recipients.c.report_due,
            )
            .where(envelope_recipients.c.envelope_id.in_(ids))
            .order_by(envelope_recipients.c.id)
        )
        recipients: dict[str, list[OwedRecipient]] = {envelope_id: [] for envelope_id in ids}
        for envelope_id, *fields in rows:
            recipients[envelope_id].append(OwedRecipient(*fields))
        found = conn.execute(
            select(
                envelopes.c.id,
                envelopes.c.mail_from,
                envelopes.c.blob_sha256,
                envelopes.c.received_at,
                envelopes.c.dsn_ret,
                envelopes.c.dsn_envid,
            )
            .where(envelopes.c.id.in_(ids))
            .order_by(envelopes.c.id)
        )
        return [
            OwedEnvelope(
                envelope_id,
                mail_from,
                sha256,
                # SQLite hands back naive datetimes; everything stored is UTC.
                received if received.tzinfo else received.replace(tzinfo=dt.UTC),
                ret,
                envid,
                tuple(recipients[envelope_id]),
            )
            for envelope_id, mail_from, sha256, received, ret, envid in found
        ]

    return await run_read(engine, read)
