"""The FHIR backend (httpx): the Annuaire Santé API v2 (``ESANTE-API-KEY`` header).

Searches use the API's ``mailbox-mss`` parameter (string: case-insensitive,
from the start) on Practitioner, PractitionerRole and Organization, asked
concurrently; Bundles are followed through their ``next`` links (FHIR R4
§3.1.1.5.6, "Paging") up to ``fhir_max_pages`` pages, and only on the API's own
host, so the key never travels elsewhere. A 429 or 5xx answer is retried with
exponential back-off (or the server's ``Retry-After``); the resolver's budget
bounds the whole. The same client sends publication PATCHes (mssd.annuaire.publish).
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mssd.annuaire.fhir_resources import (
    IDNAT_PS_SYSTEM,
    bundle_resources,
    entries_of,
    next_link,
)
from mssd.annuaire.model import (
    DirectoryConfigError,
    DirectoryEntry,
    DirectoryError,
    SearchQuery,
    fold,
    read_secret,
)
from mssd.config import AnnuaireSettings
from mssd.trust.tls import TlsConfigError, client_context

FHIR_JSON = "application/fhir+json"
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_MAX_RETRY_AFTER = 30.0


@dataclass(frozen=True)
class FhirConfig:
    url: str
    api_key: str = field(default="", repr=False)
    ca_file: Path | None = None
    timeout: float = 1.5
    retries: int = 2
    backoff: float = 0.2
    max_pages: int = 10
    page_size: int = 50

    @classmethod
    def from_settings(cls, settings: AnnuaireSettings) -> FhirConfig:
        key = ""
        if settings.fhir_api_key_file is not None:
            key = read_secret(settings.fhir_api_key_file, "annuaire.fhir_api_key_file")
        return cls(
            url=settings.fhir_url,
            api_key=key,
            ca_file=settings.fhir_ca_file,
            timeout=settings.fhir_timeout_seconds,
            retries=settings.fhir_retries,
            backoff=settings.fhir_backoff_seconds,
            max_pages=settings.fhir_max_pages,
        )


@dataclass(frozen=True)
class FhirResponse:
    status: int
    body: Any
    """Parsed JSON, or the text when the body is not JSON."""


class FhirClient:
    """HTTP to the FHIR API with the key, timeouts and retries."""

    def __init__(self, config: FhirConfig) -> None:
        self.config = config
        self.base = config.url.rstrip("/") + "/"
        self._origin = urllib.parse.urlsplit(self.base)[:2]
        try:
            # The project's TLS policy (mssd.trust.tls), the system's roots by default.
            verify = client_context(ca_file=config.ca_file)
        except TlsConfigError as error:
            raise DirectoryConfigError(f"annuaire.fhir_ca_file: {error}") from None
        headers = {"Accept": FHIR_JSON}
        if config.api_key:
            headers["ESANTE-API-KEY"] = config.api_key
        self.http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(config.timeout),
            verify=verify,
            follow_redirects=False,
        )
        self.retried = 0

    async def close(self) -> None:
        await self.http.aclose()

    def url(self, path: str) -> str:
        return urllib.parse.urljoin(self.base, path)

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> FhirResponse:
        if urllib.parse.urlsplit(url)[:2] != self._origin:
            raise DirectoryError(f"FHIR: refusing to follow a link off the API host: {url}")
        content = None
        headers = {}
        if body is not None:
            content = json.dumps(body, ensure_ascii=False).encode()
            headers["Content-Type"] = FHIR_JSON
        delay = self.config.backoff
        for attempt in range(self.config.retries + 1):
            try:
                response = await self.http.request(
                    method, url, params=params, content=content, headers=headers
                )
            except httpx.TimeoutException:
                raise DirectoryError(
                    f"FHIR {method} {url}: no answer within {self.config.timeout} s"
                ) from None
            except httpx.HTTPError as error:
                if attempt < self.config.retries:
                    self.retried += 1
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                raise DirectoryError(f"FHIR {method} {url}: {error}") from None
            if response.status_code in _RETRY_STATUSES and attempt < self.config.retries:
                self.retried += 1
                await asyncio.sleep(_retry_after(response, delay))
                delay *= 2
                continue
            try:
                parsed: Any = response.json()
            except ValueError:
                parsed = response.text
            return FhirResponse(response.status_code, parsed)
        raise AssertionError("unreachable")  # pragma: no cover

    async def search(
        self, resource: str, params: Mapping[str, str], limit: int
    ) -> list[Mapping[str, Any]]:
        """Resources of a search, following ``next`` links."""
        url = self.url(resource)
        query: Mapping[str, str] | None = {**params, "_count": str(min(limit, 1000))}
        found: list[Mapping[str, Any]] = []
        for _ in range(self.config.max_pages):
            response = await self.request("GET", url, params=query)
            if response.status != 200:
                detail = outcome_text(response.body)
                raise DirectoryError(f"FHIR search {resource} answered {response.status}: {detail}")
            if not isinstance(response.body, Mapping):
                raise DirectoryError(f"FHIR search {resource}: the answer is not JSON")
            try:
                found.extend(bundle_resources(response.body))
            except ValueError as error:
                raise DirectoryError(f"FHIR search {resource}: {error}") from None
            link = next_link(response.body)
            if link is None or len(found) >= limit:
                break
            url, query = urllib.parse.urljoin(self.base, link), None
        return found


def _retry_after(response: httpx.Response, default: float) -> float:
    value = response.headers.get("Retry-After", "")
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER)
    except ValueError:
        return default


def outcome_text(body: Any) -> str:
    """The diagnostics of an OperationOutcome, or the start of the body."""
    if isinstance(body, Mapping) and body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue") or []
        texts = [
            str(i.get("diagnostics") or i.get("code") or "")
            for i in issues
            if isinstance(i, Mapping)
        ]
        return "; ".join(t for t in texts if t) or "OperationOutcome"
    return str(body)[:200]


class FhirBackend:
    name = "fhir"
    cacheable = True

    def __init__(self, config: FhirConfig) -> None:
        self.config = config
        self.client = FhirClient(config)

    @classmethod
    def from_settings(cls, settings: AnnuaireSettings) -> FhirBackend:
        return cls(FhirConfig.from_settings(settings))

    async def close(self) -> None:
        await self.client.close()

    async def _entries(
        self, searches: list[tuple[str, dict[str, str]]], limit: int
    ) -> list[DirectoryEntry]:
        results = await asyncio.gather(
            *(self.client.search(resource, params, limit) for resource, params in searches)
        )
        entries: list[DirectoryEntry] = []
        seen: set[str] = set()
        for resources in results:
            for resource in resources:
                for entry in entries_of(resource):
                    if entry.address not in seen:
                        seen.add(entry.address)
                        entries.append(entry)
        return entries

    async def by_address(self, address: str) -> list[DirectoryEntry]:
        searches = [
            (resource, {"mailbox-mss": address})
            for resource in ("Practitioner", "PractitionerRole", "Organization")
        ]
        found = await self._entries(searches, 10)
        return [e for e in found if e.address.lower() == address.lower()]

    async def by_idnat_ps(self, idnat_ps: str) -> list[DirectoryEntry]:
        token = f"{IDNAT_PS_SYSTEM}|{idnat_ps}"
        found = await self._entries(
            [
                ("Practitioner", {"identifier": token}),
                ("PractitionerRole", {"practitioner.identifier": token}),
            ],
            100,
        )
        return [e for e in found if e.idnat_ps == idnat_ps]

    async def search(self, query: SearchQuery, limit: int) -> list[DirectoryEntry]:
        """Names go to Practitioner (family, given); a search by place only goes to
        Organization (address-city, address-postalcode). Profession and the other
        criteria are checked on the answers."""
        if query.name or query.first_name:
            params = {k: v for k, v in (("family", query.name), ("given", query.first_name)) if v}
            searches = [("Practitioner", params)]
        elif query.city or query.postcode:
            params = {
                k: v
                for k, v in (("address-city", query.city), ("address-postalcode", query.postcode))
                if v
            }
            searches = [("Organization", params)]
        else:
            return []
        found = await self._entries(searches, limit)
        return [e for e in found if _matches(e, query)][:limit]


def _matches(entry: DirectoryEntry, query: SearchQuery) -> bool:
    checks = (
        (query.name, entry.last_name),
        (query.first_name, entry.first_name),
        (query.city, entry.city),
        (query.postcode, entry.postcode),
    )
    if not all(not wanted or fold(value).startswith(fold(wanted)) for wanted, value in checks):
        return False
    if query.profession:
        wanted = query.profession.strip()
        if wanted.isdigit():
            if entry.profession_code != wanted:
                return False
        elif not fold(entry.profession_label).startswith(fold(wanted)):
            return False
    return not query.bal_type or entry.bal_type == query.bal_type.upper()
