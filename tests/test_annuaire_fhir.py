"""The FHIR backend against a local HTTPS server shaped like the Annuaire Santé
API (tests/annuaire_fhir_server.py): paged Bundles, the MSSanté extensions, 429
then success, 5xx, a server that stalls."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest
from annuaire_fhir_server import FhirServer
from annuaire_population import DOMAIN, PHARMACY_DOMAIN, Person, population, rpps
from conftest import PkiBundle

from mssd.annuaire.fhir import FhirBackend, FhirConfig
from mssd.annuaire.model import DirectoryError, SearchQuery
from mssd.annuaire.resolver import Resolver, ResolverPolicy

BUSY = Person(
    address=f"busy.labo@{DOMAIN}",
    bal_type="APP",
    structure_id="1990000777",
    finess="990000777",
    structure_name="LABORATOIRE OCCUPÉ",
    structure_category="611",
    postcode="35000",
    city="RENNES",
)
PEOPLE = [*population(300), BUSY]
LISTED = [p for p in PEOPLE if not p.liste_rouge]


@pytest.fixture(scope="module")
def fhir(test_pki: PkiBundle) -> Iterator[FhirServer]:
    server = FhirServer(PEOPLE, test_pki.dev.server_cert, test_pki.dev.server_key, stall_seconds=3)
    try:
        yield server
    finally:
        server.close()


def config(fhir: FhirServer, test_pki: PkiBundle, **changes: object) -> FhirConfig:
    values: dict[str, object] = {
        "url": fhir.url,
        "api_key": fhir.api_key,
        "ca_file": test_pki.dev.ca_bundle,
        "timeout": 2.0,
        "retries": 2,
        "backoff": 0.01,
    }
    values.update(changes)
    return FhirConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def directory(fhir: FhirServer, test_pki: PkiBundle) -> AsyncIterator[Resolver]:
    resolver = Resolver([FhirBackend(config(fhir, test_pki))], policy=ResolverPolicy())
    yield resolver
    await resolver.close()


async def test_lookup_reads_the_mailbox_and_its_holder(directory: Resolver) -> None:
    person = LISTED[0]
    answer = await directory.lookup_address(person.address.replace(DOMAIN, DOMAIN.upper()))
    assert answer.status == "found", answer.reason
    entry = answer.entry
    assert entry is not None
    assert (entry.address, entry.bal_type, entry.idnat_ps, entry.rpps) == (
        person.address,
        "PER",
        person.idnat_ps,
        person.rpps,
    )
    assert (entry.last_name, entry.first_name, entry.civility) == ("MARTIN", "Jeanne", "DR")
    assert (entry.profession_code, entry.profession_label) == ("10", "Médecin")
    assert entry.savoir_faire == "Médecine générale"
    assert entry.dematerialisation is True
    assert entry.liste_rouge is False
    assert entry.source == "fhir"
    assert (await directory.lookup_address(person.address.upper())).status == "not_found"


async def test_organization_mailbox_metadata_and_pharmacies(directory: Resolver) -> None:
    pharmacy = next(p for p in LISTED if p.address.endswith(PHARMACY_DOMAIN))
    answer = await directory.lookup_address(pharmacy.address)
    entry = answer.entry
    assert entry is not None
    assert (entry.bal_type, entry.structure_id, entry.structure_name) == (
        "ORG",
        pharmacy.structure_id,
        pharmacy.structure_name,
    )
    assert (entry.description, entry.responsible, entry.phone) == (
        pharmacy.description,
        pharmacy.responsible,
        pharmacy.phone,
    )
    assert (entry.postcode, entry.city, entry.structure_category) == (
        pharmacy.postcode,
        pharmacy.city,
        "620",
    )
    assert await directory.is_org_pharmacy(pharmacy.address) is True
    centre = next(p for p in LISTED if p.address.startswith("accueil."))
    assert await directory.is_org_pharmacy(centre.address) is False
    assert (await directory.lookup_address(centre.address)).entry.service == "Accueil"  # type: ignore[union-attr]


async def test_lookup_by_idnat_covers_practitioner_and_practitioner_role(
    directory: Resolver,
) -> None:
    answer = await directory.lookup_rpps(rpps(900_000_002))
    assert sorted(e.address for e in answer.entries) == [
        f"double.cabinet@{DOMAIN}",
        f"double@{DOMAIN}",
    ]
    assert (await directory.lookup_idnat_ps("8" + rpps(4_444_444))).status == "not_found"


async def test_search_follows_next_links(directory: Resolver, fhir: FhirServer) -> None:
    expected = {p.address for p in LISTED if p.last_name.startswith("MARTIN")}
    assert len(expected) > 5  # more than one page of the server
    before = len(fhir.requests)
    answer = await directory.search(SearchQuery(name="martin"))
    assert {e.address for e in answer.entries} == expected
    pages = [path for _, path, _ in fhir.requests[before:]]
    assert any("_getpagesoffset=5" in path for path in pages)
    doctors = await directory.search(SearchQuery(name="martin", profession="10"))
    assert doctors.entries
    assert all(e.profession_code == "10" for e in doctors.entries)
    places = await directory.search(SearchQuery(city="rennes"))
    assert places.entries
    assert all(e.city == "RENNES" for e in places.entries)


async def test_paging_stops_at_max_pages(fhir: FhirServer, test_pki: PkiBundle) -> None:
    backend = FhirBackend(config(fhir, test_pki, max_pages=1))
    try:
        found = await backend.search(SearchQuery(name="martin"), 50)
    finally:
        await backend.close()
    assert len(found) <= 5


async def test_a_429_is_retried(directory: Resolver) -> None:
    answer = await directory.lookup_address(BUSY.address)
    assert answer.status == "found", answer.reason
    backend = directory.backends[0]
    assert isinstance(backend, FhirBackend)
    assert backend.client.retried == 3  # one 429 per resource type, each retried once


async def test_a_failing_api_answers_unknown(directory: Resolver) -> None:
    answer = await directory.lookup_address(f"broken@{DOMAIN}")
    assert answer.status == "unknown"
    assert "503" in answer.reason
    assert directory.counters.backend_errors == {"fhir": 1}


async def test_a_stalled_api_answers_unknown_within_the_budget(
    fhir: FhirServer, test_pki: PkiBundle
) -> None:
    directory = Resolver(
        [FhirBackend(config(fhir, test_pki, timeout=10.0))],
        policy=ResolverPolicy(budget_seconds=0.5),
    )
    try:
        started = time.monotonic()
        answer = await directory.lookup_address(f"stall@{DOMAIN}")
        assert time.monotonic() - started < 1.5
        assert answer.status == "unknown"
        assert directory.counters.timeouts == 1
    finally:
        await directory.close()


async def test_a_wrong_api_key_is_a_clear_error(fhir: FhirServer, test_pki: PkiBundle) -> None:
    backend = FhirBackend(config(fhir, test_pki, api_key="wrong"))
    try:
        with pytest.raises(DirectoryError, match="answered 401: missing or wrong ESANTE-API-KEY"):
            await backend.by_address(LISTED[0].address)
    finally:
        await backend.close()
