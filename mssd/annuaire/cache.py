"""The directory cache, kept in the store so every process shares it, and the
schedule that deletes its expired rows (reads already ignore them; without the
purge they would only pile up)."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd import background
from mssd.annuaire.model import Lookup, Status
from mssd.annuaire.resolver import decode_entries, encode_entries
from mssd.store import annuaire as store

log = logging.getLogger("mssd.annuaire")


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


class CachePurger:
    """Deletes the expired cache rows every ``interval`` seconds, in the
    background of ``mssd serve``. Every process may run one: deleting what has
    expired is the same whoever does it."""

    def __init__(self, engine: AsyncEngine, interval: float) -> None:
        self.engine = engine
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self.interval > 0:
            self._task = asyncio.create_task(self._run(), name="annuaire-cache-purge")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await background.cancel(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                purged = await store.cache_purge(self.engine)
            except Exception:
                # A store outage must not end the schedule; the next round retries.
                log.exception("directory cache purge failed")
                continue
            if purged:
                log.info("directory cache: %d expired answers deleted", purged)
