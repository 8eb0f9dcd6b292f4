"""Publication of our mailboxes: FHIR PATCH payloads field by field, sending them
to the FHIR stand-in (404, 412, outcomes recorded), and writing a real slapd."""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import ldap3
import pytest
from annuaire_fhir_server import FhirServer, resources
from annuaire_population import population, rpps, write_ldif
from annuaire_servers import ADMIN_DN, ADMIN_PASSWORD, BASE_DN, PUBLISH_DN, Slapd, find_program
from conftest import PkiBundle, unavailable
from sqlalchemy.ext.asyncio import AsyncEngine
from test_cli import Cli

from mssd.annuaire.publish import (
    Decision,
    decide,
    fhir_location,
    fhir_patch,
    run_publication,
)
from mssd.config import Settings
from mssd.store import admin
from mssd.store.annuaire import (
    PublicationState,
    PublishedMailbox,
    publication_states,
    set_mailbox_settings,
)
from mssd.store.engine import create_engine, upgrade

METADATA = "https://interop.esante.gouv.fr/ig/fhir/annuaire/StructureDefinition/as-ext-mailbox-mss-metadata"
EMAIL_TYPE = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-contact-point-email-type"
TYPE_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_R257-TypeBAL/FHIR/TRE-R257-TypeBAL"
PEOPLE = population(60)
KNOWN_PS = PEOPLE[0].idnat_ps
ORG_PERSON = next(p for p in PEOPLE if p.bal_type == "ORG")
APP_PERSON = next(p for p in PEOPLE if p.bal_type == "APP")
TWICE_PS = "8" + rpps(900_000_050)
OTHER_PS = next(
    p.idnat_ps
    for p in PEOPLE
    if p.bal_type == "PER"
    and p.idnat_ps != KNOWN_PS
    and "." in p.address.split("@")[0]
    and not p.address.startswith("double")
)
OURS = "ours.mssd.test"


def mailbox(bal_type: str, **changes: Any) -> PublishedMailbox:
    values: dict[str, Any] = {
        "mailbox_id": 1,
        "address": f"{bal_type.lower()}@{OURS}",
        "bal_type": bal_type,
        "status": "active",
        "owner_idnat": KNOWN_PS if bal_type == "PER" else "1990000009",
        "display_name": None,
        "dematerialisation": True,
        "description": "Secrétariat",
        "responsible": KNOWN_PS if bal_type == "CAB" else "Dr Responsable",
        "service": "Cardiologie",
        "phone": "0102030405",
    }
    values.update(changes)
    return PublishedMailbox(**values)


def parts(body: dict[str, Any]) -> dict[str, Any]:
    assert body["resourceType"] == "Parameters"
    (operation,) = body["parameter"]
    assert operation["name"] == "operation"
    return {p["name"]: p for p in operation["part"]}


def metadata(contact: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert contact["system"] == "email"
    email_type, meta = contact["extension"]
    assert email_type["url"] == EMAIL_TYPE
    assert email_type["valueCoding"]["code"] == "MSSANTE"
    assert meta["url"] == METADATA
    return {e["url"]: e for e in meta["extension"]}


@pytest.mark.parametrize(
    ("bal_type", "resource", "identifier", "fields"),
    [
        ("PER", "Practitioner", f"urn:oid:1.2.250.1.71.4.2.1|{KNOWN_PS}", set()),
        (
            "ORG",
            "Organization",
            "https://finess.esante.gouv.fr|990000009",
            {"description", "service", "responsible", "phone"},
        ),
        (
            "APP",
            "Organization",
            "https://finess.esante.gouv.fr|990000009",
            {"description", "service", "responsible", "phone"},
        ),
        (
            "CAB",
            "Practitioner",
            f"urn:oid:1.2.250.1.71.4.2.1|{KNOWN_PS}",
            {"description", "responsible"},
        ),
    ],
)
def test_payloads_field_by_field(
    bal_type: str, resource: str, identifier: str, fields: set[str]
) -> None:
    box = mailbox(bal_type)
    insert = fhir_patch(box, "insert")
    assert insert.query == f"{resource}?" + urllib.parse.urlencode({"identifier": identifier})
    found = parts(insert.body)
    assert found["type"] == {"name": "type", "valueCode": "insert"}
    assert found["path"] == {"name": "path", "valueString": f"{resource}.telecom"}
    assert found["index"] == {"name": "index", "valueInteger": 0}
    contact = found["value"]["valueContactPoint"]
    assert contact["value"] == box.address
    meta = metadata(contact)
    assert set(meta) == {"type", "digitization", "listeRouge"} | fields
    assert meta["type"]["valueCodeableConcept"]["coding"] == [
        {"system": TYPE_SYSTEM, "code": bal_type}
    ]
    assert meta["digitization"]["valueBoolean"] is True
    assert meta["listeRouge"]["valueBoolean"] is False
    for name in fields:
        assert meta[name]["valueString"] == getattr(box, name)

    replace = parts(fhir_patch(box, "replace").body)
    where = f"{resource}.telecom.where(value = '{box.address}')"
    assert replace["type"]["valueCode"] == "replace"
    assert replace["path"]["valueString"] == where
    assert replace["value"]["valueContactPoint"] == contact
    delete = parts(fhir_patch(box, "delete").body)
    assert delete == {
        "type": {"name": "type", "valueCode": "delete"},
        "path": {"name": "path", "valueString": where},
    }


def test_a_siret_structure_is_addressed_by_its_idnat_struct() -> None:
    patch = fhir_patch(mailbox("ORG", owner_idnat="312345678901234"), "insert")
    assert patch.system == "urn:oid:1.2.250.1.71.4.2.2"
    assert patch.value == "312345678901234"


def state(published: bool, box: PublishedMailbox | None = None) -> PublicationState:
    import datetime as dt

    from mssd.annuaire.publish import fhir_location, fingerprint

    return PublicationState(
        published=published,
        fingerprint=fingerprint(box) if box else None,
        location=fhir_location(box) if box else None,
        action="insert",
        outcome="ok",
        http_status=200,
        message="ok",
        attempted_at=dt.datetime.now(dt.UTC),
    )


def test_what_is_sent_for_each_state() -> None:
    box = mailbox("PER")
    assert decide(box, None).action == "insert"
    assert decide(box, state(True, box)).action == "skip"
    changed = dataclasses.replace(box, dematerialisation=False)
    assert decide(changed, state(True, box)).action == "replace"
    unlisted = dataclasses.replace(box, liste_rouge=True)
    assert decide(unlisted, None).action == "skip"  # never published
    assert decide(unlisted, state(True, box)).action == "delete"
    closed = dataclasses.replace(box, status="closed")
    assert decide(closed, None).action == "skip"
    assert decide(closed, state(True, box)).action == "delete"
    suspended = dataclasses.replace(box, status="suspended")
    assert decide(suspended, state(True, box)).action == "skip"
    # A site's own LDAP directory gets listed mailboxes written again even when
    # unchanged (a lost entry comes back); what is not listed stays unwritten.
    assert decide(box, state(True, box), rewrite_current=True) == Decision("replace", "rewritten")
    assert decide(unlisted, None, rewrite_current=True).action == "skip"
    # A CAB follows its responsible's Practitioner: a new responsible moves it.
    cab = mailbox("CAB")
    handed_over = dataclasses.replace(cab, responsible=OTHER_PS)
    moved = decide(handed_over, state(True, cab), fhir_location(handed_over))
    assert moved.action == "move"
    assert moved.reason == (
        f"it now belongs on Practitioner|urn:oid:1.2.250.1.71.4.2.1|{OTHER_PS}, "
        f"not Practitioner|urn:oid:1.2.250.1.71.4.2.1|{KNOWN_PS}"
    )


# -- sending ----------------------------------------------------------------------------


@pytest.fixture
def fhir(test_pki: PkiBundle) -> Iterator[FhirServer]:
    server = FhirServer(PEOPLE, test_pki.dev.server_cert, test_pki.dev.server_key)
    # Two Practitioner resources answer to TWICE_PS: a conditional PATCH gets 412.
    for index in range(2):
        twin = resources([dataclasses.replace(PEOPLE[0], idnat_ps=TWICE_PS)])[0]
        twin["id"] = f"twin-{index}"
        twin["telecom"] = []
        server.resources.append(twin)
    try:
        yield server
    finally:
        server.close()


async def seed_ours(engine: AsyncEngine) -> None:
    await upgrade(engine)
    await admin.add_domain(engine, OURS, actor="test")
    for address, bal_type, owner in (
        (f"jeanne@{OURS}", "PER", KNOWN_PS),
        (f"inconnu@{OURS}", "PER", "8" + rpps(7_777_777)),
        (f"doublon@{OURS}", "PER", TWICE_PS),
        (f"accueil@{OURS}", "ORG", ORG_PERSON.structure_id),
        (f"labo@{OURS}", "APP", APP_PERSON.structure_id),
        (f"cabinet@{OURS}", "CAB", "1750000000"),
        (f"secret@{OURS}", "ORG", ORG_PERSON.structure_id),
        (f"ancien@{OURS}", "PER", "8" + rpps(7_777_778)),
    ):
        await admin.create_mailbox(
            engine,
            address=address,
            bal_type=bal_type,  # type: ignore[arg-type]
            owner_idnat=owner,
            idnat_ps=owner if bal_type == "PER" else None,
            actor="test",
        )
    await set_mailbox_settings(engine, f"cabinet@{OURS}", actor="test", responsible=KNOWN_PS)
    await set_mailbox_settings(
        engine, f"accueil@{OURS}", actor="test", description="Accueil", dematerialisation=True
    )
    await set_mailbox_settings(engine, f"secret@{OURS}", actor="test", liste_rouge=True)
    await admin.set_mailbox_status(engine, f"ancien@{OURS}", "closed", actor="test")


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(store_url)
    await seed_ours(engine)
    yield engine
    await engine.dispose()


def fhir_settings(fhir: FhirServer, test_pki: PkiBundle, tmp_path: Path) -> Settings:
    key = tmp_path / "api-key"
    key.write_text(fhir.api_key + "\n")
    annuaire = dataclasses.replace(
        Settings().annuaire,
        fhir_url=fhir.url,
        fhir_api_key_file=key,
        fhir_ca_file=test_pki.dev.ca_bundle,
        fhir_backoff_seconds=0.01,
    )
    return dataclasses.replace(Settings(), annuaire=annuaire)


def telecoms(fhir: FhirServer, resource_id: str) -> list[str]:
    (resource,) = [r for r in fhir.resources if r["id"] == resource_id]
    return [t["value"] for t in resource.get("telecom", [])]


async def by_address(engine: AsyncEngine, target: str) -> dict[str, PublicationState]:
    from mssd.store.annuaire import our_mailboxes

    addresses = {m.mailbox_id: m.address for m in await our_mailboxes(engine)}
    return {addresses[k]: v for k, v in (await publication_states(engine, target)).items()}


async def test_publish_to_fhir_records_each_outcome(
    engine: AsyncEngine, fhir: FhirServer, test_pki: PkiBundle, tmp_path: Path
) -> None:
    settings = fhir_settings(fhir, test_pki, tmp_path)
    lines: list[str] = []
    await run_publication(settings, engine, dry_run=True, actor="test", out=lines.append)
    assert not [r for r in fhir.requests if r[0] == "PATCH"]
    printed = "\n".join(lines)
    practitioner = urllib.parse.quote(f"urn:oid:1.2.250.1.71.4.2.1|{KNOWN_PS}", safe="")
    assert f"PATCH {fhir.url}/Practitioner?identifier={practitioner}" in printed
    assert (
        f"# fhir secret@{OURS}: nothing to send (unlisted (liste rouge): never published)" in lines
    )
    assert f"# fhir ancien@{OURS}: nothing to send (closed: never published)" in lines
    first_payload = json.loads(printed[printed.index("{") : printed.index("\n}") + 2])
    assert first_payload["resourceType"] == "Parameters"

    lines.clear()
    await run_publication(settings, engine, dry_run=False, actor="test", out=lines.append)
    states = await by_address(engine, "fhir")
    outcome = {a: (s.outcome, s.http_status, s.published) for a, s in states.items()}
    assert outcome == {
        f"jeanne@{OURS}": ("ok", 200, True),
        f"inconnu@{OURS}": ("error", 404, False),
        f"doublon@{OURS}": ("error", 412, False),
        f"accueil@{OURS}": ("ok", 200, True),
        f"labo@{OURS}": ("ok", 200, True),
        f"cabinet@{OURS}": ("ok", 200, True),
    }
    assert "several Practitioner" in states[f"doublon@{OURS}"].message
    assert f"pra-{KNOWN_PS}" in {r["id"] for r in fhir.resources}
    # Inserted at index 0, in address order: cabinet, then jeanne.
    assert telecoms(fhir, f"pra-{KNOWN_PS}")[:2] == [f"jeanne@{OURS}", f"cabinet@{OURS}"]
    assert f"accueil@{OURS}" in telecoms(fhir, f"org-{ORG_PERSON.structure_id}")
    assert f"secret@{OURS}" not in telecoms(fhir, f"org-{ORG_PERSON.structure_id}")

    # Nothing changed: nothing is sent for what is published.
    sent = len(fhir.requests)
    await run_publication(settings, engine, dry_run=False, actor="test", out=lines.append)
    again = [path for method, path, _ in fhir.requests[sent:] if method == "PATCH"]
    assert len(again) == 2  # the 404 and the 412, tried again
    # A change is a replace; closing and unlisting delete.
    await set_mailbox_settings(
        engine, f"accueil@{OURS}", actor="test", description="Nouvel accueil"
    )
    await admin.set_mailbox_status(engine, f"jeanne@{OURS}", "closed", actor="test")
    await set_mailbox_settings(engine, f"labo@{OURS}", actor="test", liste_rouge=True)
    sent = len(fhir.requests)
    await run_publication(settings, engine, dry_run=False, actor="test", out=lines.append)
    actions = {
        a: s.action for a, s in (await by_address(engine, "fhir")).items() if s.outcome == "ok"
    }
    assert actions == {
        f"jeanne@{OURS}": "delete",
        f"accueil@{OURS}": "replace",
        f"labo@{OURS}": "delete",
        f"cabinet@{OURS}": "insert",
    }
    assert f"jeanne@{OURS}" not in telecoms(fhir, f"pra-{KNOWN_PS}")
    assert f"labo@{OURS}" not in telecoms(fhir, f"org-{APP_PERSON.structure_id}")
    (organization,) = [r for r in fhir.resources if r["id"] == f"org-{ORG_PERSON.structure_id}"]
    (accueil,) = [t for t in organization["telecom"] if t["value"] == f"accueil@{OURS}"]
    assert metadata(accueil)["description"]["valueString"] == "Nouvel accueil"
    assert len([m for m, _, _ in fhir.requests[sent:] if m == "PATCH"]) == 5


async def test_a_cab_whose_responsible_changes_leaves_the_old_practitioner(
    engine: AsyncEngine, fhir: FhirServer, test_pki: PkiBundle, tmp_path: Path
) -> None:
    settings = fhir_settings(fhir, test_pki, tmp_path)
    lines: list[str] = []
    await run_publication(settings, engine, dry_run=False, actor="test", out=lines.append)
    cabinet = f"cabinet@{OURS}"
    assert cabinet in telecoms(fhir, f"pra-{KNOWN_PS}")
    assert cabinet not in telecoms(fhir, f"pra-{OTHER_PS}")
    # The practice changes hands.
    await set_mailbox_settings(engine, cabinet, actor="test", responsible=OTHER_PS)
    lines.clear()
    await run_publication(settings, engine, dry_run=True, actor="test", out=lines.append)
    printed = "\n".join(lines)
    old = urllib.parse.quote(f"urn:oid:1.2.250.1.71.4.2.1|{KNOWN_PS}", safe="")
    new = urllib.parse.quote(f"urn:oid:1.2.250.1.71.4.2.1|{OTHER_PS}", safe="")
    assert printed.index(f"/Practitioner?identifier={old}") < printed.index(
        f"/Practitioner?identifier={new}"
    )
    await run_publication(settings, engine, dry_run=False, actor="test", out=lines.append)
    assert cabinet not in telecoms(fhir, f"pra-{KNOWN_PS}")
    assert telecoms(fhir, f"pra-{OTHER_PS}")[0] == cabinet
    assert f"jeanne@{OURS}" in telecoms(fhir, f"pra-{KNOWN_PS}")  # the others stay
    assert f"fhir {cabinet}: delete -> 200 ok" in lines
    assert f"fhir {cabinet}: insert -> 200 ok" in lines
    moved = (await by_address(engine, "fhir"))[cabinet]
    assert (moved.action, moved.outcome, moved.published) == ("move", "ok", True)
    assert moved.location == f"Practitioner|urn:oid:1.2.250.1.71.4.2.1|{OTHER_PS}"
    # Published where it belongs: nothing more to send.
    sent = len(fhir.requests)
    await run_publication(settings, engine, dry_run=False, actor="test", out=lines.append)
    assert cabinet not in {path for _, path, _ in fhir.requests[sent:]}
    assert f"# fhir {cabinet}: nothing to send (up to date)" in lines


def test_cli_set_and_publish_dry_run(store_url: str, tmp_path: Path) -> None:
    cli = Cli(store_url, tmp_path)
    cli.ok("db", "upgrade")
    cli.ok("domain", "add", OURS)
    cli.ok(
        "mailbox",
        "create",
        "--type",
        "ORG",
        "--structure",
        ORG_PERSON.structure_id,
        "--address",
        f"accueil@{OURS}",
    )
    out = cli.ok(
        "annuaire",
        "set",
        f"accueil@{OURS}",
        "--description",
        "Accueil",
        "--dematerialisation",
        "yes",
    )
    assert "description=Accueil" in out
    out = cli.ok("annuaire", "publish", "--dry-run")
    finess = ORG_PERSON.structure_id[1:]
    assert "PATCH https://gateway.api.esante.gouv.fr/fhir/v2/Organization?identifier=" in out
    assert urllib.parse.quote(f"https://finess.esante.gouv.fr|{finess}", safe="") in out
    assert '"valueString": "Accueil"' in out
    result = cli("annuaire", "set", f"nobody@{OURS}", "--liste-rouge", "yes")
    assert result.returncode == 1 and "no mailbox" in result.stderr


# -- LDAP ---------------------------------------------------------------------------


@pytest.fixture
def slapd(tmp_path: Path, test_pki: PkiBundle) -> Iterator[Slapd]:
    for program in ("slapd", "slapadd"):
        if find_program(program) is None:
            unavailable(f"{program} is not installed (Debian package slapd)")
    ldif = tmp_path / "population.ldif"
    write_ldif(ldif, PEOPLE[:5], BASE_DN)
    with ldif.open("a") as handle:
        handle.write(f"\ndn: {PUBLISH_DN}\nobjectClass: organizationalUnit\nou: publication\n")
    dev = test_pki.dev
    server = Slapd(tmp_path, dev.server_cert, dev.server_key, dev.ca_bundle)
    server.configure(ldif)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def published_entries(slapd: Slapd) -> dict[str, dict[str, Any]]:
    connection = ldap3.Connection(
        ldap3.Server("127.0.0.1", port=slapd.ldap_port), ADMIN_DN, ADMIN_PASSWORD, auto_bind=True
    )
    connection.search(PUBLISH_DN, "(objectClass=mssanteMailbox)", attributes=["*"])
    found = {str(e.mssanteAddress): e.entry_attributes_as_dict for e in connection.entries}
    connection.unbind()
    return found


async def test_publish_to_ldap(
    engine: AsyncEngine, slapd: Slapd, test_pki: PkiBundle, tmp_path: Path
) -> None:
    password = tmp_path / "ldap-password"
    password.write_text(ADMIN_PASSWORD)
    annuaire = dataclasses.replace(
        Settings().annuaire,
        publish_targets=("ldap",),
        ldap_url=slapd.ldap_url,
        ldap_starttls=True,
        ldap_ca_file=test_pki.dev.ca_bundle,
        ldap_bind_dn=ADMIN_DN,
        ldap_bind_password_file=password,
        ldap_publish_base_dn=PUBLISH_DN,
    )
    settings = dataclasses.replace(Settings(), annuaire=annuaire)
    lines: list[str] = []
    await run_publication(settings, engine, dry_run=True, actor="test", out=lines.append)
    assert f"dn: mssanteAddress=jeanne@{OURS},{PUBLISH_DN}" in lines
    assert published_entries(slapd) == {}
    await run_publication(settings, engine, dry_run=False, actor="test", out=lines.append)
    entries = published_entries(slapd)
    assert set(entries) == {
        f"{name}@{OURS}" for name in ("jeanne", "inconnu", "doublon", "accueil", "labo", "cabinet")
    }
    accueil = entries[f"accueil@{OURS}"]
    assert accueil["mssanteBalType"] == ["ORG"]
    assert accueil["description"] == ["Accueil"]
    assert accueil["mssanteDematerialisation"] == [True]
    assert entries[f"jeanne@{OURS}"]["mssanteIdNatPs"] == [KNOWN_PS]
    await admin.set_mailbox_status(engine, f"jeanne@{OURS}", "closed", actor="test")
    await set_mailbox_settings(engine, f"accueil@{OURS}", actor="test", liste_rouge=True)
    await set_mailbox_settings(engine, f"labo@{OURS}", actor="test", description="Biologie")
    await run_publication(settings, engine, dry_run=False, actor="test", out=lines.append)
    entries = published_entries(slapd)
    assert f"jeanne@{OURS}" not in entries
    assert f"accueil@{OURS}" not in entries
    assert entries[f"labo@{OURS}"]["description"] == ["Biologie"]
    states = await by_address(engine, "ldap")
    assert states[f"jeanne@{OURS}"].action == "delete"
    assert not states[f"jeanne@{OURS}"].published
