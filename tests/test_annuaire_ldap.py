"""The LDAP backend against a real OpenLDAP slapd holding 10,000+ fictitious
mailboxes (tests/annuaire_population.py) under the shipped schema."""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from annuaire_population import (
    DOMAIN,
    ESCAPE_SURNAME,
    PHARMACY_DOMAIN,
    population,
    rpps,
    write_ldif,
)
from annuaire_servers import (
    BASE_DN,
    READER_DN,
    READER_PASSWORD,
    SCHEMA_FILE,
    SCHEMA_LDIF,
    SYSTEM_SCHEMAS,
    Slapd,
    StallingServer,
    TlsOnlyServer,
    find_program,
)
from conftest import PkiBundle, unavailable

from mssd.annuaire.ldap import (
    DEFAULT_ATTRIBUTES,
    DirectoryConfigError,
    LdapBackend,
    LdapConfig,
    attribute_map,
)
from mssd.annuaire.model import DirectoryError, SearchQuery
from mssd.annuaire.resolver import Resolver, ResolverPolicy

PEOPLE = population(10_000)
LISTED = [p for p in PEOPLE if not p.liste_rouge]

# Entries shaped like a site's own directory (an Active Directory, say): no
# MSSanté class, the address in `mail`, the idNat_PS in `employeeNumber`.
SITE_LDIF = f"""
dn: ou=site,{BASE_DN}
objectClass: organizationalUnit
ou: site

dn: cn=Lina Site,ou=site,{BASE_DN}
objectClass: inetOrgPerson
cn: Lina Site
sn: SITE
givenName: Lina
mail: lina.site@hopital-local.test
employeeNumber: 8{rpps(900_000_010)}
l: QUIMPER

dn: {READER_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: lecteur
userPassword: {READER_PASSWORD}
"""


def require_slapd() -> None:
    for program in ("slapd", "slapadd", "slaptest"):
        if find_program(program) is None:
            unavailable(f"{program} is not installed (Debian package slapd)")


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle) -> Iterator[Slapd]:
    require_slapd()
    directory = tmp_path_factory.mktemp("slapd")
    ldif = directory / "population.ldif"
    write_ldif(ldif, PEOPLE, BASE_DN)
    with ldif.open("a", encoding="utf-8") as handle:
        handle.write(SITE_LDIF)
    dev = test_pki.dev
    server = Slapd(directory, dev.server_cert, dev.server_key, dev.ca_bundle)
    server.configure(ldif)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def config(slapd: Slapd, test_pki: PkiBundle, **changes: object) -> LdapConfig:
    values: dict[str, object] = {
        "url": slapd.ldap_url,
        "base_dn": BASE_DN,
        "starttls": True,
        "ca_file": test_pki.dev.ca_bundle,
        "timeout": 2.0,
        "page_size": 200,
    }
    values.update(changes)
    return LdapConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def directory(slapd: Slapd, test_pki: PkiBundle) -> AsyncIterator[Resolver]:
    resolver = Resolver(
        [LdapBackend(config(slapd, test_pki))], policy=ResolverPolicy(search_limit=20_000)
    )
    yield resolver
    await resolver.close()


# -- the schema --------------------------------------------------------------------


def _definitions(text: str, *, ldif: bool) -> list[str]:
    # RFC 2849: a continuation line's first space is dropped; schema files indent.
    text = re.sub(r"\n ", "", text) if ldif else re.sub(r"\n[ \t]+", " ", text)
    found = re.findall(
        r"^(?:attributetype|objectclass|olcAttributeTypes:|olcObjectClasses:)\s*(\(.*\))\s*$",
        text,
        re.M | re.I,
    )
    return [" ".join(d.split()) for d in found]


def test_schema_file_and_cn_config_form_agree() -> None:
    schema = _definitions(SCHEMA_FILE.read_text(), ldif=False)
    ldif = _definitions(SCHEMA_LDIF.read_text(), ldif=True)
    assert len(schema) == 11
    assert schema == ldif


def test_slaptest_accepts_the_schema_file(tmp_path: Path) -> None:
    require_slapd()
    conf = tmp_path / "slapd.conf"
    conf.write_text(
        "".join(
            f"include {path}\n"
            for path in (
                SYSTEM_SCHEMAS / "core.schema",
                SYSTEM_SCHEMAS / "cosine.schema",
                SYSTEM_SCHEMAS / "inetorgperson.schema",
                SCHEMA_FILE,
            )
        )
    )
    slaptest = find_program("slaptest")
    assert slaptest is not None
    result = subprocess.run(
        [slaptest, "-u", "-f", str(conf)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# -- lookups -----------------------------------------------------------------------


async def test_every_entry_is_there_through_paged_searches(
    slapd: Slapd, test_pki: PkiBundle
) -> None:
    # The server's size limit is 500; paging (RFC 2696) gets past it.
    backend = LdapBackend(config(slapd, test_pki, page_size=500))
    try:
        everything = await backend._search(backend._filter(), 100_000)
    finally:
        await backend.close()
    assert len(everything) == len(PEOPLE) >= 10_000


async def test_lookup_by_address_domain_case_insensitive_local_part_exact(
    directory: Resolver,
) -> None:
    person = LISTED[5]
    answer = await directory.lookup_address(person.address.replace(DOMAIN, DOMAIN.upper()))
    assert answer.status == "found"
    entry = answer.entry
    assert entry is not None
    assert (entry.address, entry.bal_type, entry.idnat_ps) == (
        person.address,
        "PER",
        person.idnat_ps,
    )
    assert (entry.last_name, entry.first_name, entry.city) == (
        person.last_name,
        person.first_name,
        person.city,
    )
    assert entry.source == "ldap"
    assert (await directory.lookup_address(f"claire.escape@{DOMAIN}")).status == "not_found"
    assert (await directory.lookup_address(f"Claire.Escape@{DOMAIN}")).status == "found"


async def test_lookup_by_idnat_and_rpps(directory: Resolver) -> None:
    answer = await directory.lookup_rpps(rpps(900_000_002))
    assert sorted(e.address for e in answer.entries) == [
        f"double.cabinet@{DOMAIN}",
        f"double@{DOMAIN}",
    ]
    assert (await directory.lookup_idnat_ps("8" + rpps(900_000_002))).entries == answer.entries
    assert (await directory.lookup_rpps(rpps(5_555_555))).status == "not_found"


async def test_search_by_name_profession_city_postcode(directory: Resolver) -> None:
    doctors = await directory.search(SearchQuery(name="dupont", profession="10", city="paris"))
    expected = {
        p.address
        for p in LISTED
        if p.last_name == "DUPONT" and p.profession_code == "10" and p.city == "PARIS"
    }
    assert expected
    assert {e.address for e in doctors.entries} == expected
    by_label = await directory.search(SearchQuery(profession="Sage", postcode="33"))
    assert by_label.entries
    assert all(e.profession_label == "Sage-Femme" for e in by_label.entries)
    assert all(e.postcode == "33000" for e in by_label.entries)
    # Paged past one page (page_size 200), and unlisted entries left out.
    brest = await directory.search(SearchQuery(city="BREST"))
    assert len(brest.entries) == sum(1 for p in LISTED if p.city == "BREST") > 200
    limited = await directory.search(SearchQuery(city="BREST"), limit=250)
    assert len(limited.entries) == 250


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (ESCAPE_SURNAME, [f"Claire.Escape@{DOMAIN}"]),
        ("ST*R", [f"Claire.Escape@{DOMAIN}"]),  # a prefix: the * is a literal star
        ("ST*", [f"Claire.Escape@{DOMAIN}"]),
        ("*", []),
        ("S*R", []),
        ("ST*R (TEST)", [f"Claire.Escape@{DOMAIN}"]),
        ("x)(objectClass=*", []),
        ("*)(|(sn=*", []),
        ("\\", []),
        ("ST*R (TEST)\\", [f"Claire.Escape@{DOMAIN}"]),
    ],
)
async def test_search_input_is_escaped(directory: Resolver, name: str, expected: list[str]) -> None:
    answer = await directory.search(SearchQuery(name=name))
    assert answer.status in ("found", "not_found"), answer.reason
    assert [e.address for e in answer.entries] == expected


async def test_addresses_with_filter_characters_match_nothing(directory: Resolver) -> None:
    for address in (f"*@{DOMAIN}", f"a)(mssanteAddress=*@{DOMAIN}", f"\\2a@{DOMAIN}"):
        assert (await directory.lookup_address(address)).status == "not_found", address


async def test_unlisted_mailboxes_stay_out_of_searches(directory: Resolver) -> None:
    unlisted = next(p for p in PEOPLE if p.liste_rouge and p.bal_type == "PER")
    found = await directory.search(SearchQuery(name=unlisted.last_name, city=unlisted.city))
    assert unlisted.address not in {e.address for e in found.entries}


async def test_is_org_pharmacy_from_the_structure_category(directory: Resolver) -> None:
    pharmacy = next(p for p in LISTED if p.address.endswith(PHARMACY_DOMAIN))
    centre = next(p for p in LISTED if p.address.startswith("accueil."))
    assert await directory.is_org_pharmacy(pharmacy.address) is True
    assert await directory.is_org_pharmacy(centre.address) is False
    assert await directory.is_org_pharmacy(LISTED[1].address) is False


# -- transport, binding, mapping ------------------------------------------------------


async def test_ldaps_and_a_bind_dn(slapd: Slapd, test_pki: PkiBundle) -> None:
    backend = LdapBackend(
        config(
            slapd,
            test_pki,
            url=slapd.ldaps_url,
            starttls=False,
            bind_dn=READER_DN,
            password=READER_PASSWORD,
        )
    )
    try:
        assert await backend.by_address(LISTED[0].address)
    finally:
        await backend.close()


async def test_a_wrong_password_or_certificate_is_a_clear_error(
    slapd: Slapd, test_pki: PkiBundle, tmp_path: Path
) -> None:
    backend = LdapBackend(config(slapd, test_pki, bind_dn=READER_DN, password="wrong"))
    with pytest.raises(DirectoryError, match=f"bind as {READER_DN} refused: invalidCredentials"):
        await backend.by_address(LISTED[0].address)
    await backend.close()
    # A CA that did not sign the server's certificate.
    other = tmp_path / "other-ca.pem"
    other.write_bytes(
        test_pki.personal.cert.read_bytes().split(b"-----END CERTIFICATE-----")[0]
        + b"-----END CERTIFICATE-----\n"
    )
    backend = LdapBackend(
        config(slapd, test_pki, url=slapd.ldaps_url, starttls=False, ca_file=other)
    )
    with pytest.raises(DirectoryError, match="LDAP server"):
        await backend.by_address(LISTED[0].address)
    await backend.close()
    backend = LdapBackend(config(slapd, test_pki, base_dn="dc=absent,dc=test"))
    with pytest.raises(DirectoryError, match="base DN 'dc=absent,dc=test' does not exist"):
        await backend.by_address(LISTED[0].address)
    await backend.close()


def test_a_bad_attribute_mapping_names_the_field() -> None:
    with pytest.raises(DirectoryConfigError, match="unknown field 'adress'"):
        attribute_map(["adress=mail"])
    assert attribute_map(["address=mail"])["address"] == "mail"
    assert set(attribute_map([])) == set(DEFAULT_ATTRIBUTES)


async def test_a_site_directory_with_its_own_attribute_names(
    slapd: Slapd, test_pki: PkiBundle
) -> None:
    mapping = attribute_map(
        [
            "object_class=inetOrgPerson",
            "address=mail",
            "idnat_ps=employeeNumber",
            "bal_type=",
            "liste_rouge=",
            "dematerialisation=",
        ]
    )
    backend = LdapBackend(config(slapd, test_pki, base_dn=f"ou=site,{BASE_DN}", attributes=mapping))
    directory = Resolver([backend])
    try:
        answer = await directory.lookup_address("lina.site@HOPITAL-LOCAL.test")
        assert answer.entry is not None
        assert (answer.entry.last_name, answer.entry.city) == ("SITE", "QUIMPER")
        assert (await directory.lookup_rpps(rpps(900_000_010))).found
        assert (await directory.search(SearchQuery(name="sit"))).found
    finally:
        await directory.close()


async def test_a_stalled_ldap_server_answers_unknown_within_the_budget(
    test_pki: PkiBundle,
) -> None:
    stalled = StallingServer()
    backend = LdapBackend(
        LdapConfig(url=f"ldap://127.0.0.1:{stalled.port}", base_dn=BASE_DN, timeout=2.0)
    )
    directory = Resolver([backend], policy=ResolverPolicy(budget_seconds=0.5))
    try:
        started = time.monotonic()
        answer = await directory.lookup_address(LISTED[0].address)
        assert time.monotonic() - started < 1.5
        assert answer.status == "unknown"
        assert directory.counters.timeouts == 1
        assert await directory.is_org_pharmacy(LISTED[0].address) is None
    finally:
        stalled.close()


async def test_a_stalled_ldap_server_does_not_starve_other_worker_threads() -> None:
    # Forty lookups against a server that never answers: they hold the LDAP
    # threads, not the threads asyncio.to_thread shares with the rest of mssd.
    stalled = StallingServer()
    backend = LdapBackend(
        LdapConfig(
            url=f"ldap://127.0.0.1:{stalled.port}", base_dn=BASE_DN, timeout=2.0, pool_size=4
        )
    )
    directory = Resolver([backend], policy=ResolverPolicy(budget_seconds=3.0))
    try:
        lookups = [
            asyncio.create_task(directory.lookup_address(f"user{n}@{DOMAIN}")) for n in range(40)
        ]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        assert await asyncio.to_thread(lambda: "free") == "free"
        assert time.monotonic() - started < 0.5
        answers = await asyncio.gather(*lookups)
        assert {a.status for a in answers} == {"unknown"}
        assert all("LDAP server" in a.reason or "within" in a.reason for a in answers)
    finally:
        await directory.close()
        stalled.close()


async def test_ldap_tls_follows_the_mssante_policy(test_pki: PkiBundle) -> None:
    # A server offering on TLS 1.2 only a suite the MSSanté rules do not name
    # (ECDHE-RSA-CHACHA20-POLY1305, which Python's own defaults accept).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(test_pki.dev.server_cert), str(test_pki.dev.server_key))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-RSA-CHACHA20-POLY1305")
    server = TlsOnlyServer(context)
    backend = LdapBackend(
        LdapConfig(
            url=f"ldaps://localhost:{server.port}",
            base_dn=BASE_DN,
            ca_file=test_pki.dev.ca_bundle,
            timeout=2.0,
        )
    )
    try:
        with pytest.raises(DirectoryError, match=f"LDAP server ldaps://localhost:{server.port}"):
            await backend.by_address(LISTED[0].address)
        outcomes = server.wait_for_outcomes()
        assert outcomes
        assert all(o.startswith("handshake failed") for o in outcomes), outcomes
    finally:
        await backend.close()
        server.close()


def test_an_unreadable_ldap_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(DirectoryConfigError, match=r"annuaire\.ldap_ca_file: CA file .* does not"):
        LdapBackend(
            LdapConfig(
                url="ldaps://localhost:636", base_dn=BASE_DN, ca_file=tmp_path / "missing.pem"
            )
        )
