"""The directory cache, kept in the store so every process shares it."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.annuaire.model import Lookup, Status
from mssd.annuaire.resolver import decode_entries, encode_entries
from mssd.store import annuaire as store


class StoreCache:
    """Answers of the backends by lookup key, until their expiry time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def get(self, key: str) -> Lookup | None:
        cached = await store.cache_get(self.engine, key)
        if cached is None:
            return None
        status: Status = "found" if cached.status == "found" else "not_found"
        return Lookup(status, decode_entries(cached.entries), source=f"cache:{cached.source}")

    async def put(self, key: str, answer: Lookup, ttl_seconds: float) -> None:
        if answer.status == "unknown":
            return
        await store.cache_put(
            self.engine,
            key[:400],
            status=answer.status,
            source=answer.source[:32],
            entries=encode_entries(answer.entries),
            ttl_seconds=ttl_seconds,
        )
