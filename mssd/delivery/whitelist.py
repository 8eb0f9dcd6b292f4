"""Keeping the ANS whitelist current: load the last good list, refresh it on schedule.

The list in force lives in memory (for the port 25 policy and, later, the relay), in the
store (shared by every process, kept across restarts) and on disk (readable without the
database). A refresh fetches the configured source, and replaces the list only if
``mssd.trust.whitelist.accept_update`` accepts it; a refused or failed refresh keeps the
current list, logs an alert, counts it in a metric and records it in the store.

Invariants:
- The list in force is replaced whole, never edited: readers see the old or the new list.
- The store is written before the in-memory list changes, so a process that restarts
  never falls back to an older list than the one it was enforcing.
- Parsing (a few hundred milliseconds for the full list) runs in a worker thread.
- A fetched list is hashed once (``sha256_hex``); the checksum check and the store
  reuse that digest, the disk copy is compared byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd import background, metrics
from mssd.config import WhitelistSettings
from mssd.files import write_atomic
from mssd.store.whitelist import (
    latest_whitelist,
    latest_whitelist_id,
    record_refusal,
    save_whitelist,
)
from mssd.trust.whitelist import (
    RefusalKind,
    Whitelist,
    WhitelistError,
    WhitelistRefused,
    accept_update,
    check_checksum,
    parse_whitelist,
    sha256_hex,
)
from mssd.trust.whitelist_source import SourceError, describe, fetch

log = logging.getLogger(__name__)

REFUSED = metrics.counter(
    "mssd_whitelist_refused_total",
    "Whitelist updates refused (checksum, parse, shrink) or not fetched (fetch)",
    ("reason",),
)
# Seconds before a failed fetch is retried, when that is sooner than the schedule.
RETRY_SECONDS = 300.0
# Early retries after a checksum mismatch (whitelist.checksum_retry_seconds, doubling).
CHECKSUM_RETRIES = 4

UPDATED = metrics.counter("mssd_whitelist_updates_total", "Whitelist updates accepted")


@dataclass(frozen=True)
class RefreshOutcome:
    status: Literal["updated", "unchanged", "refused", "failed"]
    message: str
    refusal: RefusalKind | None = None
    """Which rule refused the list, for ``refused``."""


class WhitelistKeeper:
    """The whitelist in force in this process, and the means to refresh it."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: WhitelistSettings,
        cache_file: Path,
        *,
        actor: str = "mssd",
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._cache_file = cache_file
        self._actor = actor
        self._current: Whitelist | None = None
        self._sha256: str | None = None
        self._stored_id: int | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_outcome: RefreshOutcome | None = None
        self._checksum_retries = 0

    @property
    def current(self) -> Whitelist | None:
        """The list in force, or None when no list was ever accepted here."""
        return self._current

    @property
    def sha256(self) -> str | None:
        return self._sha256

    # -- loading what was kept -------------------------------------------------------------

    async def load(self) -> Whitelist | None:
        """Take the last good list from the store, else from the disk copy."""
        async with self._lock:
            if await self._adopt_stored():
                return self._current
            data = await asyncio.to_thread(_read_or_none, self._cache_file)
            if data is None:
                return None
            try:
                listed = await asyncio.to_thread(parse_whitelist, data)
            except WhitelistError as error:
                log.error(
                    "the whitelist copy %s is unusable (%s); ignored", self._cache_file, error
                )
                return None
            digest = sha256_hex(data)
            # The store lost it (a new database): put it back, so other processes share it.
            await self._save(listed, data, digest, f"{self._cache_file} (kept copy)")
            log.info("whitelist loaded from the kept copy %s", self._cache_file)
            return self._current

    async def _adopt_stored(self) -> bool:
        """Adopt the store's list if it is newer than ours (another process refreshed it)."""
        stored_id = await latest_whitelist_id(self._engine)
        if stored_id is None or stored_id == self._stored_id:
            return stored_id is not None
        stored = await latest_whitelist(self._engine)
        if stored is None:
            return False
        try:
            listed = await asyncio.to_thread(parse_whitelist, stored.content)
        except WhitelistError as error:
            log.error("the whitelist in the store (id %d) is unusable: %s", stored.id, error)
            return False
        self._current, self._sha256, self._stored_id = listed, stored.sha256, stored.id
        await self._keep_copy(stored.content)
        return True

    async def _keep_copy(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(_write_if_changed, self._cache_file, data)
        except OSError as error:
            # The store holds the list; a missing disk copy only matters without a database.
            log.error("cannot keep the whitelist copy %s: %s", self._cache_file, error)

    # -- refreshing --------------------------------------------------------------------------

    async def refresh(
        self,
        *,
        source: str | None = None,
        checksum_source: str | None = None,
        max_shrink: float | None = None,
    ) -> RefreshOutcome:
        """Fetch the list and replace the one in force if the rules accept it; the
        arguments override the settings."""
        outcome = await self._refresh(source, checksum_source, max_shrink)
        self._last_outcome = outcome
        return outcome

    async def _refresh(
        self, source: str | None, checksum_source: str | None, max_shrink: float | None
    ) -> RefreshOutcome:
        source = source if source is not None else self._settings.source
        if checksum_source is None:
            checksum_source = self._settings.checksum_source
        shrink = self._settings.max_shrink if max_shrink is None else max_shrink
        if not source:
            return RefreshOutcome("failed", "no whitelist source configured (whitelist.source)")
        shown = describe(source)
        async with self._lock:
            await self._adopt_stored()
            try:
                data = await self._fetch(source)
                checksum = await self._fetch(checksum_source) if checksum_source else None
            except SourceError as error:
                REFUSED.inc("fetch")
                log.warning("whitelist not refreshed, keeping the current list: %s", error)
                return RefreshOutcome("failed", f"cannot fetch the list: {error}")
            digest = await asyncio.to_thread(sha256_hex, data)
            try:
                if digest == self._sha256:
                    if checksum is not None:
                        check_checksum(data, checksum, digest=digest)
                    return RefreshOutcome("unchanged", f"the list at {shown} is unchanged")
                listed, digest = await asyncio.to_thread(
                    accept_update,
                    self._current,
                    data,
                    checksum_file=checksum,
                    max_shrink=shrink,
                    digest=digest,
                )
            except WhitelistRefused as refusal:
                return await self._refused(shown, digest, refusal)
            await self._save(listed, data, digest, shown)
            UPDATED.inc()
            message = (
                f"whitelist updated from {shown}: {len(listed.domains)} domains, "
                f"{len(listed.operators)} operator certificates (sha256 {digest[:16]})"
            )
            log.info("%s", message)
            if listed.skipped:
                log.warning(
                    "whitelist from %s: %d unusable entries skipped, first: %s",
                    shown,
                    len(listed.skipped),
                    listed.skipped[0],
                )
            return RefreshOutcome("updated", message)

    async def _fetch(self, source: str) -> bytes:
        return await fetch(
            source, ca_file=self._settings.ca_file, timeout_seconds=self._settings.timeout_seconds
        )

    async def _refused(self, shown: str, digest: str, refusal: WhitelistRefused) -> RefreshOutcome:
        REFUSED.inc(refusal.kind)
        kept = (
            f"keeping the current list ({len(self._current.domains)} domains)"
            if self._current is not None
            else "no list is in force"
        )
        log.error(
            "ALERT whitelist update from %s refused (%s): %s; %s",
            shown,
            refusal.kind,
            refusal.message,
            kept,
        )
        await record_refusal(
            self._engine,
            source=shown,
            kind=refusal.kind,
            sha256=digest,
            message=refusal.message,
            actor=self._actor,
        )
        return RefreshOutcome(
            "refused", f"refused ({refusal.kind}): {refusal.message}; {kept}", refusal.kind
        )

    async def _save(self, listed: Whitelist, data: bytes, digest: str, source: str) -> None:
        stored_id = await save_whitelist(
            self._engine,
            sha256=digest,
            content=data,
            source=source,
            generated_at=listed.generated_at,
            domain_count=len(listed.domains),
            entry_count=listed.entry_count,
            actor=self._actor,
        )
        self._current, self._sha256, self._stored_id = listed, digest, stored_id
        await self._keep_copy(data)

    # -- schedule ------------------------------------------------------------------------------

    def start(self) -> None:
        """Refresh every ``refresh_seconds`` in the background; the first one now, unless
        this process has just refreshed."""
        if self._task is None and self._settings.source:
            self._task = asyncio.create_task(self._run(), name="whitelist-refresh")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await background.cancel(task)

    def _pause(self) -> float:
        interval = float(self._settings.refresh_seconds)
        last = self._last_outcome
        if last is not None and last.refusal == "checksum":
            # The list and its checksum file were most likely fetched while ANS was
            # replacing the pair: fetch again soon, a few times, backing off.
            if self._checksum_retries < CHECKSUM_RETRIES:
                delay = self._settings.checksum_retry_seconds * (1 << self._checksum_retries)
                self._checksum_retries += 1
                return min(interval, delay)
        # A mismatch at a scheduled refresh starts a new round of early retries.
        self._checksum_retries = 0
        if last is not None and last.status == "failed":
            # Unreachable source: try again sooner than the schedule (a list refused
            # for its content is not retried early: it is what the source publishes
            # until it changes).
            return min(interval, RETRY_SECONDS)
        return interval

    async def _run(self) -> None:
        if self._last_outcome is not None:
            await asyncio.sleep(self._pause())
        while True:
            try:
                await self.refresh()
            except Exception:
                # A broken store or disk must not stop later refreshes; the list in force stays.
                self._last_outcome = RefreshOutcome("failed", "refresh raised")
                log.exception("whitelist refresh failed; keeping the current list")
            await asyncio.sleep(self._pause())


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write_if_changed(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` unless it already holds it
    (compared byte for byte: cheaper than hashing the file again)."""
    if _read_or_none(path) == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o644)
