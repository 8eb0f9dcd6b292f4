"""The outbound queue in the store: claiming due entries, recording outcomes, administration.

Entries are created with their message by the group committer (``mssd.store.delivery``).
A relay worker *claims* due entries: in one short transaction it selects them and marks
them ``sending`` with a fresh ``claim_token`` and a lease (``next_attempt_at`` moved to the
end of the lease). It then talks to the peer with no transaction open, and records the
outcome with the token as a condition: an outcome whose claim was taken over is ignored.
The delivery reports an outcome causes are written in the same transaction as the
outcome (a crash between the two would lose them).

Invariants:
- PostgreSQL: the claim selects ``FOR UPDATE SKIP LOCKED``, so concurrent workers, in one
  process or many, never claim the same entry; SQLite: the claim runs under the database
  write lock (``BEGIN IMMEDIATE``), which serialises claimers.
- An entry whose worker died (SIGKILL, power loss) is claimed again when its lease ends:
  a message the peer had accepted in the instant before the death is sent twice
  (at-least-once delivery; why SMTP cannot do better: ``_Recorder`` in
  ``mssd/smtp/relay.py``).
- Nothing here talks to the network.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection, and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store.audit import insert_audit
from mssd.store.delivery import NewMessage, StoredMessage, write_batch
from mssd.store.engine import run_write, write_transaction
from mssd.store.records import AuditEvent
from mssd.store.schema import blobs, envelope_recipients, envelopes, outbound_queue

State = Literal["queued", "sending", "delivered", "failed"]
PENDING: tuple[State, ...] = ("queued", "sending")


@dataclass(frozen=True)
class QueueEntry:
    """One (envelope, recipient) with what the relay needs of its envelope."""

    id: int
    envelope_id: str
    address: str
    domain: str
    dsn_notify: str | None
    dsn_orcpt: str | None
    state: str
    attempts: int
    next_attempt_at: dt.datetime
    last_attempt_at: dt.datetime | None
    last_error: str | None
    remote_mta: str | None
    claim_token: str | None
    delay_reported: bool
    created_at: dt.datetime
    mail_from: str
    blob_sha256: str
    dsn_ret: str | None
    dsn_envid: str | None
    body: str | None
    smtputf8: bool
    size: int


@dataclass(frozen=True)
class Outcome:
    """What became of a claimed entry."""

    entry_id: int
    claim_token: str
    state: Literal["queued", "delivered", "failed"]
    error: str | None = None
    remote_mta: str | None = None
    next_attempt_at: dt.datetime | None = None
    """For ``queued`` (a deferral): when to try again."""
    delay_reported: bool = False


def _aware(moment: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


_COLUMNS = (
    outbound_queue.c.id,
    envelope_recipients.c.envelope_id,
    envelope_recipients.c.address,
    envelope_recipients.c.dsn_notify,
    envelope_recipients.c.dsn_orcpt,
    outbound_queue.c.state,
    outbound_queue.c.attempts,
    outbound_queue.c.next_attempt_at,
    outbound_queue.c.last_attempt_at,
    outbound_queue.c.last_error,
    outbound_queue.c.remote_mta,
    outbound_queue.c.claim_token,
    outbound_queue.c.delay_reported,
    envelopes.c.received_at,
    envelopes.c.mail_from,
    envelopes.c.blob_sha256,
    envelopes.c.dsn_ret,
    envelopes.c.dsn_envid,
    envelopes.c.body,
    envelopes.c.smtputf8,
    blobs.c.size,
)
_JOINED = (
    outbound_queue.join(
        envelope_recipients, envelope_recipients.c.id == outbound_queue.c.recipient_id
    )
    .join(envelopes, envelopes.c.id == envelope_recipients.c.envelope_id)
    .join(blobs, blobs.c.sha256 == envelopes.c.blob_sha256)
)


def _entry(row: object) -> QueueEntry:
    m = row._mapping  # type: ignore[attr-defined]
    return QueueEntry(
        id=int(m["id"]),
        envelope_id=str(m["envelope_id"]),
        address=str(m["address"]),
        domain=str(m["address"]).rpartition("@")[2].lower(),
        dsn_notify=m["dsn_notify"],
        dsn_orcpt=m["dsn_orcpt"],
        state=str(m["state"]),
        attempts=int(m["attempts"]),
        next_attempt_at=_aware(m["next_attempt_at"]),
        last_attempt_at=_aware(m["last_attempt_at"]) if m["last_attempt_at"] else None,
        last_error=m["last_error"],
        remote_mta=m["remote_mta"],
        claim_token=m["claim_token"],
        delay_reported=bool(m["delay_reported"]),
        created_at=_aware(m["received_at"]),
        mail_from=str(m["mail_from"]),
        blob_sha256=str(m["blob_sha256"]),
        dsn_ret=m["dsn_ret"],
        dsn_envid=m["dsn_envid"],
        body=m["body"],
        smtputf8=bool(m["smtputf8"]),
        size=int(m["size"]),
    )


def _due(now: dt.datetime) -> object:
    # A "sending" entry whose lease ended belongs to a worker that died: take it over.
    return and_(
        outbound_queue.c.state.in_(PENDING),
        outbound_queue.c.next_attempt_at <= now,
    )


async def claim(
    engine: AsyncEngine, *, limit: int, lease_seconds: float, now: dt.datetime | None = None
) -> list[QueueEntry]:
    """Claim up to ``limit`` due entries for this worker (see the module docstring)."""
    now = now or dt.datetime.now(dt.UTC)
    token = secrets.token_hex(8)
    lease_end = now + dt.timedelta(seconds=lease_seconds)
    async with write_transaction(engine) as conn:
        query = (
            select(outbound_queue.c.id)
            .where(_due(now))  # type: ignore[arg-type]
            .order_by(outbound_queue.c.next_attempt_at, outbound_queue.c.id)
            .limit(limit)
        )
        if conn.dialect.name == "postgresql":
            # Several workers, in one process or many: each takes rows no other holds.
            query = query.with_for_update(skip_locked=True)
        ids = list(await conn.scalars(query))
        if not ids:
            return []
        await conn.execute(
            update(outbound_queue)
            .where(outbound_queue.c.id.in_(ids))
            .values(
                state="sending",
                claim_token=token,
                next_attempt_at=lease_end,
                attempts=outbound_queue.c.attempts + 1,
                last_attempt_at=now,
            )
        )
        rows = await conn.execute(
            select(*_COLUMNS).select_from(_JOINED).where(outbound_queue.c.id.in_(ids))
        )
        return sorted((_entry(row) for row in rows), key=lambda e: e.id)


ReportMaker = Callable[[set[int]], Sequence[NewMessage]]
"""Given the ids of the entries whose outcome is being recorded, the reports to write in
the same transaction (called inside it: it must do no I/O)."""


@dataclass(frozen=True)
class Recorded:
    updated: set[int]
    """Entries whose outcome was recorded (an entry whose claim was taken over by another
    worker, or deleted, is left alone)."""
    reports: list[StoredMessage]
    """The reports written with the outcomes."""


async def record(
    engine: AsyncEngine, outcomes: Sequence[Outcome], reports: ReportMaker | None = None
) -> Recorded:
    """Record outcomes of claimed entries and, in the same transaction, the reports
    ``reports`` makes for those actually recorded."""
    if not outcomes:
        return Recorded(set(), [])

    def work(conn: Connection) -> Recorded:
        updated: set[int] = set()
        for outcome in outcomes:
            if _record_one(conn, outcome):
                updated.add(outcome.entry_id)
        made = list(reports(updated)) if reports is not None and updated else []
        stored = write_batch(conn, made) if made else []
        return Recorded(updated, [s for s in stored if s is not None])

    return await run_write(engine, work)


def _record_one(conn: Connection, outcome: Outcome) -> bool:
    values: dict[str, object] = {
        "state": outcome.state,
        "last_error": outcome.error,
        "claim_token": None,
    }
    if outcome.remote_mta is not None:
        values["remote_mta"] = outcome.remote_mta[:255]
    if outcome.next_attempt_at is not None:
        values["next_attempt_at"] = outcome.next_attempt_at
    if outcome.delay_reported:
        values["delay_reported"] = True
    result = conn.execute(
        update(outbound_queue)
        .where(
            outbound_queue.c.id == outcome.entry_id,
            outbound_queue.c.state == "sending",
            outbound_queue.c.claim_token == outcome.claim_token,
        )
        .values(**values)
    )
    if result.rowcount != 1:
        return False
    if outcome.state != "queued":
        recipient = select(outbound_queue.c.recipient_id).where(
            outbound_queue.c.id == outcome.entry_id
        )
        conn.execute(
            update(envelope_recipients)
            .where(envelope_recipients.c.id == recipient.scalar_subquery())
            .values(status="relayed" if outcome.state == "delivered" else "failed")
        )
    return True


async def release(engine: AsyncEngine, entries: Sequence[tuple[int, str]]) -> None:
    """Give claimed entries back at once (a worker stopping cleanly): (id, token) pairs.
    The attempt is not counted."""
    if not entries:
        return
    now = dt.datetime.now(dt.UTC)
    async with write_transaction(engine) as conn:
        for entry_id, token in entries:
            await conn.execute(
                update(outbound_queue)
                .where(
                    outbound_queue.c.id == entry_id,
                    outbound_queue.c.state == "sending",
                    outbound_queue.c.claim_token == token,
                )
                .values(
                    state="queued",
                    claim_token=None,
                    next_attempt_at=now,
                    attempts=outbound_queue.c.attempts - 1,
                )
            )


async def read_content(engine: AsyncEngine, sha256: str) -> bytes:
    async with engine.connect() as conn:
        data = await conn.scalar(select(blobs.c.data).where(blobs.c.sha256 == sha256))
    if data is None:
        raise LookupError(f"blob {sha256} is missing")
    return bytes(data)


# -- administration (`mssd queue ...`) ------------------------------------------------------


async def list_entries(
    engine: AsyncEngine, *, states: Sequence[str] = PENDING, limit: int = 100
) -> list[QueueEntry]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(*_COLUMNS)
            .select_from(_JOINED)
            .where(outbound_queue.c.state.in_(list(states)))
            .order_by(outbound_queue.c.id)
            .limit(limit)
        )
        return [_entry(row) for row in rows]


async def count_by_state(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(outbound_queue.c.state, func.count()).group_by(outbound_queue.c.state)
        )
        return {str(state): int(count) for state, count in rows}


async def get_entry(engine: AsyncEngine, entry_id: int) -> QueueEntry | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(*_COLUMNS).select_from(_JOINED).where(outbound_queue.c.id == entry_id)
            )
        ).one_or_none()
    return None if row is None else _entry(row)


async def retry_now(engine: AsyncEngine, entry_id: int, *, actor: str) -> bool:
    """Make a waiting or failed entry due now; False if there is no such entry or it is
    being sent or was delivered. Its arrival time stays (it dates the reports), so an
    entry past ``relay.give_up_seconds`` gets one more attempt, not a new period."""
    now = dt.datetime.now(dt.UTC)
    async with write_transaction(engine) as conn:
        result = await conn.execute(
            update(outbound_queue)
            .where(
                outbound_queue.c.id == entry_id,
                or_(outbound_queue.c.state == "queued", outbound_queue.c.state == "failed"),
            )
            .values(state="queued", next_attempt_at=now, claim_token=None)
        )
        if result.rowcount != 1:
            return False
        await insert_audit(
            conn,
            AuditEvent(actor=actor, action="queue.retry", target=str(entry_id), remote="cli"),
        )
    return True


async def delete_entry(engine: AsyncEngine, entry_id: int, *, actor: str) -> bool:
    """Remove an entry (no report is sent); False if there is none."""
    async with write_transaction(engine) as conn:
        result = await conn.execute(delete(outbound_queue).where(outbound_queue.c.id == entry_id))
        if result.rowcount != 1:
            return False
        await insert_audit(
            conn,
            AuditEvent(actor=actor, action="queue.delete", target=str(entry_id), remote="cli"),
        )
    return True
