"""One resolver over several directory backends, with the shared cache and a budget.

Backends are asked in the configured order; the first that finds something
answers. A backend that fails (:class:`DirectoryError`) is logged and the next
one is asked. When every backend answered "nothing", that is a ``not_found``
(cached for ``negative_ttl_seconds``); when some failed and none found, it is
``unknown`` and nothing is cached.

A lookup never takes longer than ``budget_seconds``, cache included: past it the
caller gets ``unknown``, the event is logged and counted in :class:`Counters`.
Callers in SMTP and IMAP sessions rely on this; no exception ever escapes a
lookup (a programming error in a backend is logged and answered ``unknown``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mssd.annuaire.model import (
    AddressError,
    DirectoryEntry,
    DirectoryError,
    Lookup,
    SearchQuery,
    normalise_address,
)

log = logging.getLogger("mssd.annuaire")


class Backend(Protocol):
    """What every directory backend answers. An empty list is "not there";
    :class:`DirectoryError` is "could not say"."""

    name: str
    cacheable: bool
    """False for a backend that reads the store itself (the extraction file):
    caching its answers would only add writes."""

    async def by_address(self, address: str) -> list[DirectoryEntry]: ...

    async def by_idnat_ps(self, idnat_ps: str) -> list[DirectoryEntry]: ...

    async def search(self, query: SearchQuery, limit: int) -> list[DirectoryEntry]: ...

    async def close(self) -> None: ...


class Cache(Protocol):
    async def get(self, key: str) -> Lookup | None: ...

    async def put(self, key: str, answer: Lookup, ttl_seconds: float) -> None: ...


@dataclass
class Counters:
    """Per-process counts (for metrics and tests)."""

    lookups: int = 0
    cache_hits: int = 0
    found: int = 0
    not_found: int = 0
    unknown: int = 0
    timeouts: int = 0
    backend_errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolverPolicy:
    budget_seconds: float = 2.0
    cache_ttl_seconds: float = 86400
    negative_ttl_seconds: float = 3600
    search_limit: int = 50


class Resolver:
    """The directory as the rest of mssd sees it."""

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        cache: Cache | None = None,
        policy: ResolverPolicy | None = None,
    ) -> None:
        self.backends = tuple(backends)
        # Only answers of remote backends are worth a cache row.
        self.cache = cache if any(b.cacheable for b in self.backends) else None
        self.policy = policy or ResolverPolicy()
        self.counters = Counters()

    async def close(self) -> None:
        for backend in self.backends:
            await backend.close()

    # -- public lookups ----------------------------------------------------------

    async def lookup_address(self, address: str) -> Lookup:
        """The mailbox with exactly this address (domain compared case-insensitively)."""
        try:
            wanted = normalise_address(address)
        except AddressError as error:
            return Lookup("not_found", reason=str(error))

        async def ask(backend: Backend) -> list[DirectoryEntry]:
            found = await backend.by_address(wanted)
            # Backends may match case-insensitively; the local part is exact.
            return [e for e in found if _same_address(e.address, wanted)]

        return await self._resolve(f"address:{wanted}", ask)

    async def lookup_idnat_ps(self, idnat_ps: str) -> Lookup:
        """Every mailbox of the professional with this idNat_PS."""
        wanted = idnat_ps.strip()

        async def ask(backend: Backend) -> list[DirectoryEntry]:
            return await backend.by_idnat_ps(wanted)

        return await self._resolve(f"idnat:{wanted}", ask)

    async def lookup_rpps(self, rpps: str) -> Lookup:
        """Every mailbox of the professional with this RPPS number (idNat_PS = 8+RPPS)."""
        return await self.lookup_idnat_ps("8" + rpps.strip())

    async def search(self, query: SearchQuery, limit: int | None = None) -> Lookup:
        """Address-book search; unlisted (liste rouge) mailboxes never appear."""
        if query.is_empty():
            return Lookup("not_found", reason="an empty search matches nothing")
        wanted = min(limit or self.policy.search_limit, self.policy.search_limit)

        async def ask(backend: Backend) -> list[DirectoryEntry]:
            found = await backend.search(query, wanted)
            return [e for e in found if not e.liste_rouge][:wanted]

        digest = hashlib.sha256(f"{query.key()}|{wanted}".encode()).hexdigest()
        return await self._resolve(f"search:{digest}", ask)

    async def is_org_pharmacy(self, address: str) -> bool | None:
        """True when the address is an ORG mailbox of a pharmacy (officine);
        None when the directory cannot say within the budget."""
        answer = await self.lookup_address(address)
        if answer.status == "unknown":
            return None
        entry = answer.entry
        return entry is not None and entry.bal_type == "ORG" and entry.is_pharmacy

    # -- the chain -----------------------------------------------------------------

    async def _resolve(
        self, key: str, ask: Callable[[Backend], Awaitable[list[DirectoryEntry]]]
    ) -> Lookup:
        self.counters.lookups += 1
        started = time.monotonic()
        ttl: float = 0
        try:
            async with asyncio.timeout(self.policy.budget_seconds):
                answer, ttl = await self._chain(key, ask)
        except TimeoutError:
            self.counters.timeouts += 1
            elapsed = time.monotonic() - started
            log.warning(
                "directory lookup %s: no answer within %.1f s (%.2f s); answering unknown",
                key,
                self.policy.budget_seconds,
                elapsed,
            )
            answer = Lookup("unknown", reason=f"no answer within {self.policy.budget_seconds} s")
        except Exception:  # a bug in a backend must not take a session down
            log.exception("directory lookup %s failed; answering unknown", key)
            answer = Lookup("unknown", reason="internal error (logged)")
        remaining = self.policy.budget_seconds - (time.monotonic() - started)
        if ttl > 0 and remaining > 0:
            await self._store(key, answer, ttl, remaining)
        if answer.status == "found":
            self.counters.found += 1
        elif answer.status == "not_found":
            self.counters.not_found += 1
        else:
            self.counters.unknown += 1
        return answer

    async def _chain(
        self, key: str, ask: Callable[[Backend], Awaitable[list[DirectoryEntry]]]
    ) -> tuple[Lookup, float]:
        """The answer, and how long to cache it (0: not)."""
        if self.cache is not None:
            try:
                cached = await self.cache.get(key)
            except Exception as error:  # a cache failure is not an answer
                log.warning("directory cache read failed for %s: %s", key, error)
                cached = None
            if cached is not None:
                self.counters.cache_hits += 1
                return cached, 0
        failures: list[str] = []
        for backend in self.backends:
            try:
                entries = await ask(backend)
            except DirectoryError as error:
                self.counters.backend_errors[backend.name] = (
                    self.counters.backend_errors.get(backend.name, 0) + 1
                )
                log.warning("directory backend %s: %s", backend.name, error)
                failures.append(f"{backend.name}: {error}")
                continue
            if entries:
                answer = Lookup("found", tuple(entries), source=backend.name)
                return answer, self.policy.cache_ttl_seconds if backend.cacheable else 0
        if failures:
            return Lookup("unknown", reason="; ".join(failures)), 0
        answer = Lookup("not_found", source=",".join(b.name for b in self.backends))
        return answer, self.policy.negative_ttl_seconds

    async def _store(self, key: str, answer: Lookup, ttl: float, remaining: float) -> None:
        """Cache an answer within what is left of the budget; the answer stands
        even when it cannot be cached."""
        if self.cache is None:
            return
        try:
            async with asyncio.timeout(remaining):
                await self.cache.put(key, answer, ttl)
        except TimeoutError:
            log.warning("directory cache write for %s: out of budget, not cached", key)
        except Exception as error:
            log.warning("directory cache write failed for %s: %s", key, error)


def _same_address(address: str, wanted: str) -> bool:
    try:
        return normalise_address(address) == wanted
    except AddressError:  # a malformed address in the directory matches nothing
        return False


def encode_entries(entries: Sequence[DirectoryEntry]) -> str:
    return json.dumps([e.to_json() for e in entries], ensure_ascii=False, sort_keys=True)


def decode_entries(text: str) -> tuple[DirectoryEntry, ...]:
    return tuple(DirectoryEntry.from_json(item) for item in json.loads(text))
