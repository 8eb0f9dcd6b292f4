"""Publication of our mailboxes to the directory (FHIR PATCH, LDAP)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.annuaire.model import DirectoryError
from mssd.config import Settings


async def run_publication(
    settings: Settings,
    engine: AsyncEngine,
    *,
    dry_run: bool,
    actor: str,
    out: Callable[[str], None],
) -> None:
    raise DirectoryError("publication is not available yet")
