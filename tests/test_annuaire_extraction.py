"""The extraction file: parsing, import into the store, offline resolution, the
shared cache and the lookup budget, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from annuaire_population import (
    DOMAIN,
    ESCAPE_SURNAME,
    EXTRACTION_COLUMNS,
    PHARMACY_DOMAIN,
    extraction_line,
    population,
    rpps,
    write_extraction,
)
from conftest import PkiBundle, start_mssd
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from test_cli import Cli, refused

from mssd.annuaire.cache import StoreCache
from mssd.annuaire.extraction import ExtractionError, ExtractionStats, parse_extraction
from mssd.annuaire.model import DirectoryEntry, DirectoryError, SearchQuery, parse_yes_no
from mssd.annuaire.offline import ExtractionBackend, import_file
from mssd.annuaire.resolver import Resolver, ResolverPolicy
from mssd.store import annuaire as store
from mssd.store.audit import read_audit
from mssd.store.engine import create_engine, upgrade
from mssd.store.schema import annuaire_cache

PEOPLE = population(2000)
HEADER = "|".join(EXTRACTION_COLUMNS)


@pytest.fixture
async def engine(store_url: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(store_url)
    await upgrade(engine)
    path = tmp_path / "Extraction_Correspondance_MSSante.txt"
    write_extraction(path, PEOPLE)
    await import_file(engine, path, actor="test")
    yield engine
    await engine.dispose()


def resolver(engine: AsyncEngine, **policy: float) -> Resolver:
    return Resolver(
        [ExtractionBackend(engine)], cache=StoreCache(engine), policy=ResolverPolicy(**policy)
    )


# -- parsing ---------------------------------------------------------------------


def parse(*lines: str) -> list[DirectoryEntry]:
    return list(parse_extraction([HEADER, *lines]))


def test_a_line_becomes_an_entry() -> None:
    person = PEOPLE[0]
    (entry,) = parse(extraction_line(person))
    assert entry.address == person.address
    assert entry.bal_type == "PER"
    assert entry.idnat_ps == person.idnat_ps
    assert entry.rpps == person.rpps
    assert (entry.last_name, entry.first_name) == (person.last_name, person.first_name)
    assert (entry.profession_code, entry.profession_label) == ("10", "Médecin")
    assert entry.savoir_faire == "Médecine générale"
    assert (entry.postcode, entry.city) == ("75014", "PARIS")
    assert entry.street == "1 RUE DE LA SANTÉ"
    assert entry.dematerialisation is True


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("PER|x@y.test", "line 2: 2 fields separated by |, the header has 31"),
        ("XYZ" + extraction_line(PEOPLE[0])[3:], "line 2: Type de BAL is 'XYZ'"),
        (extraction_line(PEOPLE[0]).replace("@", "#", 1), "line 2: Adresse BAL: "),
        (
            extraction_line(PEOPLE[0]).replace("|899000000000|", "|8990|"),
            "line 2: Identification nationale PP: '8990' is not an idNat_PS",
        ),
        (
            extraction_line(PEOPLE[0]).replace("|True|", "|Peut-être|"),
            "line 2: Dématérialisation is 'Peut-être'",
        ),
    ],
)
def test_a_malformed_line_is_named(line: str, message: str) -> None:
    with pytest.raises(ExtractionError, match=message.replace("|", r"\|").replace("(", r"\(")):
        parse(line)


@pytest.mark.parametrize(
    ("text", "flag"),
    [("True", True), ("O", True), (" oui ", True), ("YES", True), ("1", True),
     ("False", False), ("N", False), ("Non", False), ("no", False), ("0", False),
     ("Peut-être", None), ("", None)],
)  # fmt: skip
def test_one_yes_no_reading_for_the_file_the_cli_and_ldap(text: str, flag: bool | None) -> None:
    assert parse_yes_no(text) is flag
    if flag is not None:
        (entry,) = parse(extraction_line(PEOPLE[0]).replace("|True|", f"|{text}|"))
        assert entry.dematerialisation is flag


def test_a_file_without_the_header_is_refused() -> None:
    with pytest.raises(ExtractionError, match="'Type de BAL', 'Adresse BAL'"):
        list(parse_extraction([extraction_line(PEOPLE[0])]))
    with pytest.raises(ExtractionError, match="empty"):
        list(parse_extraction([]))


def test_a_second_line_for_an_address_is_skipped_and_counted() -> None:
    stats = ExtractionStats()
    line = extraction_line(PEOPLE[0])
    entries = list(parse_extraction([HEADER, line, line, ""], stats))
    assert len(entries) == 1
    assert stats.duplicates == 1
    assert stats.duplicate_examples == [f"line 3: {PEOPLE[0].address}"]


# -- lookups from the imported file -------------------------------------------------


async def test_lookup_by_address_ignores_case_in_the_domain_only(engine: AsyncEngine) -> None:
    directory = resolver(engine)
    answer = await directory.lookup_address(f"Claire.Escape@{DOMAIN.upper()}")
    assert answer.status == "found"
    assert answer.entry is not None
    assert answer.entry.last_name == ESCAPE_SURNAME
    assert answer.source == "extraction"
    # The local part is compared exactly.
    assert (await directory.lookup_address(f"claire.escape@{DOMAIN}")).status == "not_found"


async def test_lookup_by_idnat_and_rpps_finds_every_mailbox(engine: AsyncEngine) -> None:
    directory = resolver(engine)
    by_idnat = await directory.lookup_idnat_ps("8" + rpps(900_000_002))
    assert sorted(e.address for e in by_idnat.entries) == [
        f"double.cabinet@{DOMAIN}",
        f"double@{DOMAIN}",
    ]
    by_rpps = await directory.lookup_rpps(rpps(900_000_002))
    assert by_rpps.entries == by_idnat.entries
    assert (await directory.lookup_rpps(rpps(1_999_999))).status == "not_found"


async def test_search_by_name_profession_city_postcode(engine: AsyncEngine) -> None:
    directory = resolver(engine, search_limit=500)
    # Accents and case do not matter; names match from their start.
    found = await directory.search(SearchQuery(name="lefevre", city="paris"))
    assert found.entries
    assert all(e.last_name == "LEFÈVRE" and e.city == "PARIS" for e in found.entries)
    nurses = await directory.search(SearchQuery(profession="60", postcode="29"))
    assert nurses.entries
    assert all(e.profession_code == "60" and e.postcode == "29200" for e in nurses.entries)
    by_label = await directory.search(SearchQuery(profession="chirurgien", city="Lyon"))
    assert by_label.entries
    assert {e.profession_label for e in by_label.entries} == {"Chirurgien-Dentiste"}
    # LIKE wildcards in the input are literal.
    assert (await directory.search(SearchQuery(name="%"))).status == "not_found"
    assert (await directory.search(SearchQuery(name="_ARTIN"))).status == "not_found"
    weird = await directory.search(SearchQuery(name=ESCAPE_SURNAME))
    assert [e.address for e in weird.entries] == [f"Claire.Escape@{DOMAIN}"]
    limited = await directory.search(SearchQuery(city="paris"), limit=7)
    assert len(limited.entries) == 7


async def test_unlisted_mailboxes_are_left_out_of_searches(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    # The public file leaves unlisted mailboxes out; a site's own file may carry a
    # "Liste rouge" column instead: such entries are stored, answered to whoever
    # already has the exact address, and never listed by a search.
    listed = [p for p in PEOPLE[:40] if not p.liste_rouge]
    hidden = listed[3]
    path = tmp_path / "with-liste-rouge.txt"
    lines = [extraction_line(p) + ("|O" if p is hidden else "|N") for p in listed]
    path.write_text("\n".join([HEADER + "|Liste rouge", *lines]) + "\n", encoding="utf-8")
    await import_file(engine, path, actor="test")
    directory = resolver(engine)
    exact = await directory.lookup_address(hidden.address)
    assert exact.status == "found" and [e.liste_rouge for e in exact.entries] == [True]
    by_name = await directory.search(SearchQuery(name=hidden.last_name))
    assert hidden.address not in [e.address for e in by_name.entries]
    shown = listed[4]
    assert (await directory.lookup_address(shown.address)).status == "found"
    by_name = await directory.search(SearchQuery(name=shown.last_name))
    assert shown.address in [e.address for e in by_name.entries]


async def test_is_org_pharmacy(engine: AsyncEngine) -> None:
    directory = resolver(engine)
    pharmacy = next(p for p in PEOPLE if p.address.endswith(PHARMACY_DOMAIN) and not p.liste_rouge)
    centre = next(p for p in PEOPLE if p.address.startswith("accueil.") and not p.liste_rouge)
    assert await directory.is_org_pharmacy(pharmacy.address) is True
    assert await directory.is_org_pharmacy(centre.address) is False
    assert await directory.is_org_pharmacy(PEOPLE[1].address) is False  # a pharmacist's PER
    assert await directory.is_org_pharmacy(f"nobody@{DOMAIN}") is False


# -- import ----------------------------------------------------------------------


async def test_reimport_replaces_the_previous_file_whole(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    before = await store.extraction_count(engine)
    assert before == sum(1 for p in PEOPLE if not p.liste_rouge)
    again = tmp_path / "again.txt"
    write_extraction(again, PEOPLE)
    report, _ = await import_file(engine, again, actor="test")
    assert (report.entries, report.replaced) == (before, before)
    assert await store.extraction_count(engine) == before
    # A file with a bad line changes nothing.
    broken = tmp_path / "broken.txt"
    lines = [HEADER] + [extraction_line(p) for p in PEOPLE[:1500]] + ["PER|bad"]
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ExtractionError, match="line 1502"):
        await import_file(engine, broken, actor="test")
    assert await store.extraction_count(engine) == before
    # A smaller file leaves only its own entries.
    small = tmp_path / "small.txt"
    write_extraction(small, PEOPLE[:10])
    await import_file(engine, small, actor="test")
    assert await store.extraction_count(engine) == 10
    assert (await resolver(engine).lookup_address(PEOPLE[20].address)).status == "not_found"
    events = await read_audit(engine, action_prefix="annuaire.import")
    assert events[0].details == {"entries": 10, "previous": before}


def test_a_field_too_long_for_the_store_refuses_its_line_and_the_file(
    store_url: str, tmp_path: Path
) -> None:
    # On PostgreSQL an over-long postcode or phone used to stop the import half-way
    # with a DataError; now every such line is named and nothing is imported.
    cli = Cli(store_url, tmp_path)
    cli.ok("db", "upgrade")
    first = tmp_path / "first.txt"
    write_extraction(first, PEOPLE[:50])
    cli.ok("annuaire", "import", str(first))
    postcode = EXTRACTION_COLUMNS.index("Code postal structure BAL")
    lines = []
    for person in PEOPLE[50:80]:
        fields = extraction_line(person).split("|")
        phone = "01 02 03 04 05"
        if len(lines) == 3:  # line 5
            fields[postcode] = "75014" * 4
        if len(lines) == 7:  # line 9
            phone = "0" * 70
        lines.append("|".join([*fields, phone]))
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join([HEADER + "|Téléphone", *lines]) + "\n", encoding="utf-8")
    result = cli("annuaire", "import", str(bad))
    refused(result, 2, "2 lines refused")
    assert (
        "line 5: Code postal is 20 characters long, at most 16 fit: '75014750147501475014'"
        in result.stderr
    )
    assert "line 9: Téléphone is 70 characters long, at most 64 fit" in result.stderr
    assert "nothing was imported" in result.stderr
    # The previous import is whole; nothing of the refused file is there.
    assert PEOPLE[3].address in cli.ok("annuaire", "lookup", PEOPLE[3].address)
    refused(cli("annuaire", "lookup", PEOPLE[52].address), 1, "not found")
    # The same file with the two lines mended imports, phone numbers included.
    lines[3] = lines[3].replace("75014" * 4, "75014")
    lines[7] = lines[7].replace("0" * 70, "+33 1 02 03 04 05")
    bad.write_text("\n".join([HEADER + "|Téléphone", *lines]) + "\n", encoding="utf-8")
    assert "30 mailboxes imported" in cli.ok("annuaire", "import", str(bad))
    shown = cli.ok("annuaire", "lookup", PEOPLE[57].address, "--json")
    assert '"phone": "+33 1 02 03 04 05"' in shown


async def test_a_file_that_is_not_utf8_names_the_line(engine: AsyncEngine, tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes((HEADER + "\n" + extraction_line(PEOPLE[0]) + "\n").encode("latin-1"))
    with pytest.raises(ExtractionError, match="line 1: not UTF-8"):
        await import_file(engine, path, actor="test")


# -- the cache and the budget --------------------------------------------------------


class Scripted:
    """A backend whose answers the test sets; ``delay`` makes it stall."""

    name = "scripted"
    cacheable = True

    def __init__(self) -> None:
        self.entries: list[DirectoryEntry] = []
        self.error: str | None = None
        self.delay = 0.0
        self.calls = 0

    async def by_address(self, address: str) -> list[DirectoryEntry]:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.error:
            raise DirectoryError(self.error)
        return [e for e in self.entries if e.address == address]

    async def by_idnat_ps(self, idnat_ps: str) -> list[DirectoryEntry]:
        return []

    async def search(self, query: SearchQuery, limit: int) -> list[DirectoryEntry]:
        return []

    async def close(self) -> None:
        return None


async def test_answers_are_cached_in_the_store_for_every_process(
    engine: AsyncEngine, store_url: str
) -> None:
    backend = Scripted()
    backend.entries = [DirectoryEntry(address="a@remote.test", bal_type="PER", source="x")]
    first = Resolver([backend], cache=StoreCache(engine))
    assert (await first.lookup_address("a@remote.test")).source == "scripted"
    assert (await first.lookup_address("nobody@remote.test")).status == "not_found"
    # Another process: its own engine, its own resolver, the same store.
    other_engine = create_engine(store_url)
    try:
        other_backend = Scripted()
        other = Resolver([other_backend], cache=StoreCache(other_engine))
        hit = await other.lookup_address("a@REMOTE.test")
        assert hit.status == "found"
        assert hit.source == "cache:scripted"
        assert (await other.lookup_address("nobody@remote.test")).status == "not_found"
        assert other_backend.calls == 0
        assert other.counters.cache_hits == 2
    finally:
        await other_engine.dispose()


async def test_cache_entries_expire(engine: AsyncEngine) -> None:
    backend = Scripted()
    directory = Resolver(
        [backend],
        cache=StoreCache(engine),
        policy=ResolverPolicy(cache_ttl_seconds=0.2, negative_ttl_seconds=0.2),
    )
    assert (await directory.lookup_address("late@remote.test")).status == "not_found"
    backend.entries = [DirectoryEntry(address="late@remote.test", source="x")]
    assert (await directory.lookup_address("late@remote.test")).status == "not_found"
    await asyncio.sleep(0.3)
    assert (await directory.lookup_address("late@remote.test")).status == "found"
    assert backend.calls == 2


async def cached_keys(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set((await conn.scalars(select(annuaire_cache.c.key))).all())


async def test_mssd_serve_purges_expired_cache_answers_on_schedule(
    engine: AsyncEngine, store_url: str, tmp_path: Path, test_pki: PkiBundle
) -> None:
    for key, ttl in (("address:old@remote.test", 0.01), ("address:fresh@remote.test", 3600)):
        await store.cache_put(
            engine, key, status="not_found", source="scripted", entries="[]", ttl_seconds=ttl
        )
    await asyncio.sleep(0.05)
    # Expired answers are never served, but they stay until purged.
    assert await cached_keys(engine) == {"address:old@remote.test", "address:fresh@remote.test"}
    server = await asyncio.to_thread(
        start_mssd, store_url, test_pki, tmp_path, MSSD_ANNUAIRE_CACHE_PURGE_SECONDS="0.3"
    )
    try:
        deadline = time.monotonic() + 10
        while "address:old@remote.test" in await cached_keys(engine):
            assert time.monotonic() < deadline, "the expired answer was never purged"
            await asyncio.sleep(0.1)
        assert await cached_keys(engine) == {"address:fresh@remote.test"}
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_failing_backend_gives_way_to_the_next(engine: AsyncEngine) -> None:
    broken = Scripted()
    broken.error = "connection refused"
    directory = Resolver([broken, ExtractionBackend(engine)], cache=StoreCache(engine))
    answer = await directory.lookup_address(PEOPLE[0].address)
    assert (answer.status, answer.source) == ("found", "extraction")
    assert directory.counters.backend_errors == {"scripted": 1}
    # Failing alone: unknown, and nothing cached.
    alone = Resolver([broken], cache=StoreCache(engine))
    assert (await alone.lookup_address("x@remote.test")).status == "unknown"
    broken.error = None
    assert (await alone.lookup_address("x@remote.test")).status == "not_found"


async def test_a_stalled_backend_answers_unknown_within_the_budget(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    stalled = Scripted()
    stalled.delay = 30
    directory = Resolver(
        [stalled], cache=StoreCache(engine), policy=ResolverPolicy(budget_seconds=0.3)
    )
    started = time.monotonic()
    answer = await directory.lookup_address("slow@remote.test")
    assert time.monotonic() - started < 1.0
    assert answer.status == "unknown"
    assert directory.counters.timeouts == 1
    assert await directory.is_org_pharmacy("slow@remote.test") is None
    assert "no answer within 0.3 s" in caplog.text


# -- the command line --------------------------------------------------------------


def test_cli_import_lookup_search(store_url: str, tmp_path: Path) -> None:
    cli = Cli(store_url, tmp_path)
    cli.ok("db", "upgrade")
    path = tmp_path / "extraction.txt"
    write_extraction(path, PEOPLE[:300])
    assert "mailboxes imported" in cli.ok("annuaire", "import", str(path))
    person = PEOPLE[3]
    cli.ok("annuaire", "lookup", person.address.replace(DOMAIN, DOMAIN.upper()))
    refused(cli("annuaire", "lookup", person.address.upper()), 1, "not found")
    out = cli.ok("annuaire", "lookup", person.address)
    assert out.startswith(f"{person.address}\tPER\t{person.idnat_ps}\t")
    assert "1 entry from extraction" in out
    out = cli.ok("annuaire", "lookup", "--rpps", person.rpps)
    assert person.address in out
    out = cli.ok("annuaire", "search", "--name", person.last_name, "--city", person.city)
    assert person.address in out
    refused(cli("annuaire", "search"), 2, "give at least one of")
    bad_limit = cli("annuaire", "search", "--name", "x", "--limit", "0")
    assert bad_limit.returncode == 2 and bad_limit.stdout == ""
    assert "argument --limit: a whole number of 1 or more, got '0'" in bad_limit.stderr
    refused(cli("annuaire", "lookup", "--rpps", "12"), 2, "11-digit RPPS")
    broken = tmp_path / "broken.txt"
    broken.write_text(HEADER + "\nPER|a@b.test\n", encoding="utf-8")
    refused(cli("annuaire", "import", str(broken)), 2, "line 2: 2 fields")
    refused(cli("annuaire", "import", str(tmp_path / "missing.txt")), 2, "missing.txt")
    assert person.address in cli.ok("annuaire", "lookup", person.address)
