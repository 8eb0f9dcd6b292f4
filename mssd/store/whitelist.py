"""The ANS whitelist in the store: the last good lists and the refused updates.

The store keeps the published bytes, not a parsed form: whoever reads them parses them
again with ``mssd.trust.whitelist`` (a newer mssd may read more of the format). Every
accepted or refused update writes its audit row in the same transaction.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store.audit import insert_audit
from mssd.store.engine import write_transaction
from mssd.store.records import AuditEvent
from mssd.store.schema import whitelist_lists, whitelist_refusals

# Lists kept besides the one in force, for an administrator comparing versions.
KEEP_LISTS = 3


@dataclass(frozen=True)
class StoredWhitelist:
    id: int
    sha256: str
    content: bytes
    source: str
    generated_at: str | None
    domain_count: int
    entry_count: int
    loaded_at: dt.datetime


@dataclass(frozen=True)
class WhitelistRefusal:
    at: dt.datetime
    source: str
    kind: str
    sha256: str | None
    message: str


async def save_whitelist(
    engine: AsyncEngine,
    *,
    sha256: str,
    content: bytes,
    source: str,
    generated_at: str | None,
    domain_count: int,
    entry_count: int,
    actor: str,
) -> int:
    """Store an accepted list as the one in force; return its id."""
    now = dt.datetime.now(dt.UTC)
    async with write_transaction(engine) as conn:
        result = await conn.execute(
            whitelist_lists.insert().values(
                sha256=sha256,
                content=content,
                source=source[:2048],
                generated_at=generated_at,
                domain_count=domain_count,
                entry_count=entry_count,
                loaded_at=now,
            )
        )
        new_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
        assert isinstance(new_id, int)
        await conn.execute(
            delete(whitelist_lists).where(whitelist_lists.c.id <= new_id - KEEP_LISTS)
        )
        await insert_audit(
            conn,
            AuditEvent(
                actor=actor,
                action="whitelist.update",
                target=source,
                details={
                    "sha256": sha256,
                    "domains": domain_count,
                    "entries": entry_count,
                    "generated_at": generated_at,
                },
                at=now,
            ),
        )
    return new_id


async def latest_whitelist_id(engine: AsyncEngine) -> int | None:
    """Id of the list in force (cheap: for processes checking whether another one updated it)."""
    async with engine.connect() as conn:
        value = (await conn.execute(select(func.max(whitelist_lists.c.id)))).scalar_one()
    return int(value) if value is not None else None


async def latest_whitelist(engine: AsyncEngine) -> StoredWhitelist | None:
    """The list in force, or None when none was ever accepted."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(whitelist_lists).order_by(whitelist_lists.c.id.desc()).limit(1)
            )
        ).first()
    if row is None:
        return None
    return StoredWhitelist(
        id=row.id,
        sha256=row.sha256,
        content=bytes(row.content),
        source=row.source,
        generated_at=row.generated_at,
        domain_count=row.domain_count,
        entry_count=row.entry_count,
        loaded_at=row.loaded_at,
    )


async def record_refusal(
    engine: AsyncEngine,
    *,
    source: str,
    kind: str,
    sha256: str | None,
    message: str,
    actor: str,
) -> None:
    now = dt.datetime.now(dt.UTC)
    async with write_transaction(engine) as conn:
        await conn.execute(
            whitelist_refusals.insert().values(
                at=now, source=source[:2048], kind=kind, sha256=sha256, message=message
            )
        )
        await insert_audit(
            conn,
            AuditEvent(
                actor=actor,
                action="whitelist.update",
                target=source,
                result=f"refused:{kind}",
                details={"sha256": sha256, "reason": message},
                at=now,
            ),
        )


async def refusals(engine: AsyncEngine, *, limit: int = 10) -> tuple[int, list[WhitelistRefusal]]:
    """(how many updates were ever refused, the newest ``limit`` of them)."""
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(whitelist_refusals))).scalar()
        rows = (
            await conn.execute(
                select(whitelist_refusals).order_by(whitelist_refusals.c.id.desc()).limit(limit)
            )
        ).all()
    return int(total or 0), [
        WhitelistRefusal(
            at=row.at, source=row.source, kind=row.kind, sha256=row.sha256, message=row.message
        )
        for row in rows
    ]
