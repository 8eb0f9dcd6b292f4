"""The append-only audit trail (DESIGN.md, Storage).

Rows are only ever inserted; the schema's triggers refuse UPDATE and DELETE.
An audit event never carries message content, passwords, codes or tokens.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mssd.store.engine import write_transaction
from mssd.store.fastpath import FastInsert
from mssd.store.records import AuditEvent
from mssd.store.schema import audit


def audit_row(event: AuditEvent) -> dict[str, Any]:
    return {
        "at": event.at or dt.datetime.now(dt.UTC),
        "actor": event.actor[:1024],
        "action": event.action,
        "target": event.target[:1024],
        "remote": event.remote[:64],
        "result": event.result,
        "details": json.dumps(event.details, sort_keys=True, ensure_ascii=False),
    }


_INSERT_AUDIT = FastInsert(audit)


def write_audit_rows(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Write :func:`audit_row` rows inside the caller's transaction (synchronous
    form, through the fast path: the group committer writes one for every
    authentication and every IMAP content fetch)."""
    _INSERT_AUDIT.rows(conn, rows)


async def insert_audit(conn: AsyncConnection, *events: AuditEvent) -> None:
    """Write audit rows inside the caller's transaction."""
    if events:
        await conn.execute(audit.insert(), [audit_row(event) for event in events])


class AuditLog:
    """An ``AuditSink`` writing each event in its own transaction (authentication
    outcomes, which have no other change to ride along with)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def record(self, event: AuditEvent) -> None:
        async with write_transaction(self._engine) as conn:
            await insert_audit(conn, event)


async def read_audit(
    engine: AsyncEngine, *, action_prefix: str = "", limit: int = 1000
) -> Sequence[AuditEvent]:
    """The newest audit events first (for the CLI and the tests)."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(audit)
                .where(audit.c.action.startswith(action_prefix))
                .order_by(audit.c.id.desc())
                .limit(limit)
            )
        ).all()
    return [
        AuditEvent(
            actor=row.actor,
            action=row.action,
            target=row.target,
            remote=row.remote,
            result=row.result,
            details=json.loads(row.details),
            at=row.at,
        )
        for row in rows
    ]
