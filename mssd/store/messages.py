"""Reading stored messages: what a mailbox holds, and the bytes of a message."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store.errors import NotFound
from mssd.store.schema import blobs, folders, mailboxes, placements


@dataclass(frozen=True)
class PlacedMessage:
    folder: str
    uid: int
    modseq: int
    flags: str
    internal_date: dt.datetime
    size: int
    sha256: str


async def list_messages(
    engine: AsyncEngine, address: str, *, folder: str | None = None
) -> list[PlacedMessage]:
    async with engine.connect() as conn:
        mailbox_id = await conn.scalar(
            select(mailboxes.c.id).where(mailboxes.c.address == address.lower())
        )
        if mailbox_id is None:
            raise NotFound(f"no mailbox {address}")
        query = (
            select(
                folders.c.name,
                placements.c.uid,
                placements.c.modseq,
                placements.c.flags,
                placements.c.internal_date,
                placements.c.size,
                placements.c.blob_sha256,
            )
            .join(folders, folders.c.id == placements.c.folder_id)
            .where(folders.c.mailbox_id == mailbox_id)
            .order_by(folders.c.name, placements.c.uid)
        )
        if folder is not None:
            query = query.where(folders.c.name == folder)
        return [
            PlacedMessage(folder, uid, modseq, flags, as_utc(date), size, sha)
            for folder, uid, modseq, flags, date, size, sha in await conn.execute(query)
        ]


def as_utc(moment: dt.datetime) -> dt.datetime:
    """SQLite returns stored UTC times without their zone; PostgreSQL with it."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


async def read_blob(engine: AsyncEngine, sha256: str) -> bytes:
    async with engine.connect() as conn:
        data = await conn.scalar(select(blobs.c.data).where(blobs.c.sha256 == sha256))
    if data is None:
        raise NotFound(f"no message blob {sha256}")
    return bytes(data)


@dataclass(frozen=True)
class FolderState:
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    special_use: str | None


async def folder_states(engine: AsyncEngine, address: str) -> list[FolderState]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(
                    folders.c.name,
                    folders.c.uidvalidity,
                    folders.c.uidnext,
                    folders.c.highestmodseq,
                    folders.c.special_use,
                )
                .join(mailboxes, mailboxes.c.id == folders.c.mailbox_id)
                .where(mailboxes.c.address == address.lower())
                .order_by(folders.c.id)
            )
        ).tuples()
        return [FolderState(*row) for row in rows]
