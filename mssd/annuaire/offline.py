"""The extraction backend: answers from the file last loaded by `mssd annuaire import`.

The import reads and checks the file in a worker thread, :data:`CHUNK` lines at a
time, so the event loop never parses; each checked chunk is then inserted in the
import's one transaction (``mssd.store.annuaire.replace_extraction``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.annuaire.extraction import ExtractionStats, entry_row, parse_extraction, read_lines
from mssd.annuaire.model import DirectoryEntry, SearchQuery, fold
from mssd.store import annuaire as store


def _entry(row: dict[str, Any]) -> DirectoryEntry:
    return DirectoryEntry(**row, source="extraction")


class ExtractionBackend:
    name = "extraction"
    cacheable = False

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def by_address(self, address: str) -> list[DirectoryEntry]:
        return [_entry(row) for row in await store.extraction_by_address(self.engine, address)]

    async def by_idnat_ps(self, idnat_ps: str) -> list[DirectoryEntry]:
        return [_entry(row) for row in await store.extraction_by_idnat_ps(self.engine, idnat_ps)]

    async def search(self, query: SearchQuery, limit: int) -> list[DirectoryEntry]:
        profession = query.profession.strip()
        rows = await store.extraction_search(
            self.engine,
            last_name=fold(query.name),
            first_name=fold(query.first_name),
            profession_code=profession if profession.isdigit() else "",
            profession_label="" if profession.isdigit() else fold(profession),
            city=fold(query.city),
            postcode=query.postcode.strip(),
            bal_type=query.bal_type.strip().upper(),
            limit=limit,
        )
        return [_entry(row) for row in rows]

    async def close(self) -> None:
        return None


CHUNK = 5000
"""Lines parsed per hand-over to the worker thread (and rows per INSERT)."""


async def _checked_chunks(rows: Iterator[dict[str, Any]]) -> AsyncIterator[list[dict[str, Any]]]:
    # One thread at a time advances the generator: each chunk is awaited before
    # the next is asked for.
    while chunk := await asyncio.to_thread(lambda: list(itertools.islice(rows, CHUNK))):
        yield chunk


async def import_file(
    engine: AsyncEngine, path: Path, *, actor: str
) -> tuple[store.ImportReport, ExtractionStats]:
    """Load an extraction file into the store, replacing the previous one whole;
    :class:`~mssd.annuaire.extraction.ExtractionError` (nothing changed) when a
    line is refused."""
    stats = ExtractionStats()
    with path.open("rb") as handle:
        rows = (entry_row(entry) for entry in parse_extraction(read_lines(handle), stats))
        report = await store.replace_extraction(
            engine, _checked_chunks(rows), actor=actor, origin=str(path)
        )
    return report, stats
