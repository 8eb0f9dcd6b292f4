"""A synthetic national directory: FICTITIOUS professionals and structures.

Every identity here is made up: RPPS numbers start with 99 (idNat_PS
``899...``), FINESS numbers with 99 (idNat_Struct ``199...``), every domain is
under ``.test`` (RFC 6761). The same population feeds the extraction file, the
LDAP directory (LDIF for slapadd) and the FHIR test server, so the three
backends can be checked against the same expectations.

Run as a script to write an extraction file or an LDIF:
``python tests/annuaire_population.py extraction 100000 out.txt``
``python tests/annuaire_population.py ldif 10000 out.ldif dc=annuaire,dc=test``
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SURNAMES = (
    "MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "RICHARD", "PETIT", "DURAND",
    "LEROY", "MOREAU", "SIMON", "LAURENT", "LEFÈVRE", "MICHEL", "GARCIA", "DAVID",
    "BERTRAND", "ROUX", "VINCENT", "FOURNIER", "MOREL", "GIRARD", "ANDRÉ", "MERCIER",
    "DUPONT", "LAMBERT", "BONNET", "FRANÇOIS", "MARTINEZ", "LEGRAND", "GARNIER", "FAURE",
    "ROUSSEAU", "BLANC", "GUÉRIN", "MULLER", "HENRY", "ROUSSEL", "NICOLAS", "PERRIN",
)  # fmt: skip
GIVEN = (
    "Jeanne", "Paul", "Hélène", "Louis", "Chloé", "Hugo", "Inès", "Léo", "Zoé", "Noé",
    "Anaïs", "Jules", "Maëlle", "Théo", "Emma", "Lucas", "Léna", "Gabriel", "Manon", "Adam",
)  # fmt: skip
PROFESSIONS = (
    ("10", "Médecin", "Médecine générale"),
    ("21", "Pharmacien", "Pharmacie d'officine"),
    ("60", "Infirmier", ""),
    ("40", "Chirurgien-Dentiste", "Orthopédie dento-faciale"),
    ("50", "Sage-Femme", ""),
    ("70", "Masseur-Kinésithérapeute", ""),
    ("10", "Médecin", "Cardiologie"),
)
CITIES = (
    ("75014", "PARIS"),
    ("69003", "LYON"),
    ("13005", "MARSEILLE"),
    ("33000", "BORDEAUX"),
    ("59000", "LILLE"),
    ("35000", "RENNES"),
    ("67000", "STRASBOURG"),
    ("31000", "TOULOUSE"),
    ("44000", "NANTES"),
    ("29200", "BREST"),
    ("97400", "SAINT-DENIS"),
    ("20000", "AJACCIO"),
)
DOMAIN = "annuaire.mssd.test"
PHARMACY_DOMAIN = "pharmacie.mssd.test"

# Entries the tests look for by name (besides the generated ones).
ESCAPE_SURNAME = "ST*R (TEST)\\X"
"""A last name with every character RFC 4515 escapes: `*`, `(`, `)`, `\\`."""


@dataclass(frozen=True)
class Person:
    """One mailbox line of the directory."""

    address: str
    bal_type: str
    idnat_ps: str = ""
    civility: str = ""
    last_name: str = ""
    first_name: str = ""
    profession_code: str = ""
    profession_label: str = ""
    savoir_faire: str = ""
    structure_id: str = ""
    finess: str = ""
    structure_name: str = ""
    structure_category: str = ""
    service: str = ""
    street: str = ""
    postcode: str = ""
    city: str = ""
    description: str = ""
    responsible: str = ""
    phone: str = ""
    dematerialisation: bool = False
    liste_rouge: bool = False

    @property
    def rpps(self) -> str:
        return self.idnat_ps[1:] if self.idnat_ps.startswith("8") else ""


def rpps(index: int) -> str:
    return f"{99_000_000_000 + index:011d}"


def finess(index: int) -> str:
    return f"99{index:07d}"


def population(count: int) -> list[Person]:
    """``count`` mailboxes: mostly PER, every 10th an ORG (every 3rd of those a
    pharmacy), every 25th an APP, every 40th a CAB, 4 in 100 unlisted; plus the
    special entries the tests name."""
    people: list[Person] = []
    for i in range(count):
        postcode, city = CITIES[i % len(CITIES)]
        street = f"{1 + i % 150} RUE DE LA SANTÉ"
        if i % 10 == 9:
            structure = finess(i)
            pharmacy = (i // 10) % 3 == 0
            name = f"PHARMACIE DU MARCHÉ {i}" if pharmacy else f"CENTRE DE SANTÉ {i}"
            people.append(
                Person(
                    address=f"{'officine' if pharmacy else 'accueil'}.{i}@"
                    f"{PHARMACY_DOMAIN if pharmacy else DOMAIN}",
                    bal_type="ORG",
                    structure_id="1" + structure,
                    finess=structure,
                    structure_name=name,
                    structure_category="620" if pharmacy else "124",
                    service="Accueil" if not pharmacy else "",
                    street=street,
                    postcode=postcode,
                    city=city,
                    description=f"Secrétariat {name.title()}",
                    responsible=f"Responsable {i}",
                    phone=f"01{i % 100_000_000:08d}",
                    dematerialisation=True,
                    liste_rouge=i % 50 == 49,
                )
            )
            continue
        if i % 25 == 24:
            structure = finess(i)
            people.append(
                Person(
                    address=f"labo.{i}@{DOMAIN}",
                    bal_type="APP",
                    structure_id="1" + structure,
                    finess=structure,
                    structure_name=f"LABORATOIRE {i}",
                    structure_category="611",
                    street=street,
                    postcode=postcode,
                    city=city,
                    description="Résultats de biologie",
                    dematerialisation=True,
                )
            )
            continue
        last = SURNAMES[i % len(SURNAMES)]
        first = GIVEN[(i // len(SURNAMES)) % len(GIVEN)]
        code, label, savoir = PROFESSIONS[i % len(PROFESSIONS)]
        idnat = "8" + rpps(i)
        local = f"{first}.{last}.{i}".lower()
        local = local.translate(str.maketrans("éèëçàäïâ", "eeecaaia"))
        if i % 40 == 39:
            people.append(
                Person(
                    address=f"cabinet.{i}@{DOMAIN}",
                    bal_type="CAB",
                    idnat_ps=idnat,
                    last_name=last,
                    first_name=first,
                    profession_code=code,
                    profession_label=label,
                    structure_name=f"CABINET {last}",
                    street=street,
                    postcode=postcode,
                    city=city,
                    description="Cabinet de groupe",
                    responsible=idnat,
                )
            )
            continue
        people.append(
            Person(
                address=f"{local}@{DOMAIN}",
                bal_type="PER",
                idnat_ps=idnat,
                civility="DR" if code == "10" else "M",
                last_name=last,
                first_name=first,
                profession_code=code,
                profession_label=label,
                savoir_faire=savoir,
                structure_name=f"CABINET {last}",
                street=street,
                postcode=postcode,
                city=city,
                dematerialisation=i % 2 == 0,
                liste_rouge=i % 50 == 48,
            )
        )
    people.extend(SPECIAL)
    return people


SPECIAL = (
    Person(
        address=f"Claire.Escape@{DOMAIN}",
        bal_type="PER",
        idnat_ps="8" + rpps(900_000_001),
        last_name=ESCAPE_SURNAME,
        first_name="Claire",
        profession_code="10",
        profession_label="Médecin",
        postcode="75014",
        city="PARIS",
    ),
    Person(
        address=f"double@{DOMAIN}",
        bal_type="PER",
        idnat_ps="8" + rpps(900_000_002),
        last_name="ÉCHO",
        first_name="Basile",
        profession_code="60",
        profession_label="Infirmier",
        postcode="29200",
        city="BREST",
    ),
    Person(
        address=f"double.cabinet@{DOMAIN}",
        bal_type="PER",
        idnat_ps="8" + rpps(900_000_002),
        last_name="ÉCHO",
        first_name="Basile",
        profession_code="60",
        profession_label="Infirmier",
        postcode="29200",
        city="BREST",
    ),
)


# -- the extraction file -------------------------------------------------------------

EXTRACTION_COLUMNS = (
    "Type de BAL", "Adresse BAL", "Type Identifiant PP", "Identifiant PP",
    "Identification nationale PP", "Type identifiant structure", "Identification Structure",
    "Service de rattachement", "Civilité d'exercice", "Nom d'exercice", "Prénom d'exercice",
    "Catégorie profession", "Libellé de catégorie profession", "Code Profession",
    "Libellé Profession", "Code savoir-faire", "Libellé savoir-faire", "Dématérialisation",
    "Raison Sociale structure BAL", "Enseigne commerciale structure BAL",
    "L2COMPLEMENTLOCALISATION structure BAL", "L3COMPLEMENTDISTRIBUTION structure BAL",
    "L4NUMEROVOIE structure BAL", "L4COMPLEMENTNUMEROVOIE structure BAL",
    "NL4TYPEVOIE structure BAL", "L4LIBELLEVOIE structure BAL", "L5LIEUDITMENTION structure BAL",
    "L6LIGNEACHEMINEMENT structure BAL", "Code postal structure BAL",
    "Département structure BAL", "Pays structure BAL",
)  # fmt: skip


def extraction_line(p: Person) -> str:
    number, _, street_name = p.street.partition(" ")
    fields = [
        p.bal_type,
        p.address,
        "8" if p.idnat_ps else "",
        p.rpps,
        p.idnat_ps,
        "FINESS" if p.finess else "",
        p.structure_id,
        p.service,
        p.civility,
        p.last_name,
        p.first_name,
        "C" if p.idnat_ps else "",
        "Civil" if p.idnat_ps else "",
        p.profession_code,
        p.profession_label,
        "S" if p.savoir_faire else "",
        p.savoir_faire,
        "True" if p.dematerialisation else "False",
        p.structure_name,
        "",
        "",
        "",
        number if p.street else "",
        "",
        "",
        street_name,
        "",
        f"{p.postcode} {p.city}" if p.city else "",
        p.postcode,
        p.postcode[:2],
        "FRANCE",
    ]
    return "|".join(fields)


def write_extraction(path: Path, people: list[Person]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write("|".join(EXTRACTION_COLUMNS) + "\n")
        for person in people:
            # The public file carries no liste rouge column: unlisted mailboxes
            # are simply absent from it.
            if not person.liste_rouge:
                handle.write(extraction_line(person) + "\n")


# -- LDIF (config/ldap/mssante.schema) --------------------------------------------


def _ldif_value(name: str, value: str) -> str:
    if value.isascii() and value[:1] not in (" ", ":", "<") and value[-1:] != " ":
        return f"{name}: {value}"
    return f"{name}:: {base64.b64encode(value.encode()).decode()}"


def ldif_entries(people: list[Person], base_dn: str) -> Iterator[str]:
    yield "\n".join(
        [
            f"dn: {base_dn}",
            "objectClass: dcObject",
            "objectClass: organization",
            f"dc: {base_dn.split(',')[0].split('=')[1]}",
            "o: Annuaire de test",
            "",
        ]
    )
    for p in people:
        person = p.bal_type in ("PER", "CAB")
        lines = [
            f"dn: mssanteAddress={p.address},{base_dn}",
            "objectClass: inetOrgPerson" if person else "objectClass: organizationalRole",
            "objectClass: mssanteMailbox",
            _ldif_value("cn", p.address if not person else f"{p.first_name} {p.last_name}"),
            _ldif_value("sn", p.last_name) if person else "",
            _ldif_value("givenName", p.first_name) if person and p.first_name else "",
            _ldif_value("mssanteAddress", p.address),
            f"mssanteBalType: {p.bal_type}",
            f"mssanteIdNatPs: {p.idnat_ps}" if p.idnat_ps else "",
            f"mssanteProfessionCode: {p.profession_code}" if p.profession_code else "",
            _ldif_value("title", p.profession_label) if p.profession_label else "",
            _ldif_value("mssanteSavoirFaire", p.savoir_faire) if p.savoir_faire else "",
            f"mssanteIdNatStruct: {p.structure_id}" if p.structure_id else "",
            _ldif_value("o", p.structure_name) if p.structure_name else "",
            f"mssanteStructureCategory: {p.structure_category}" if p.structure_category else "",
            _ldif_value("ou", p.service) if p.service else "",
            _ldif_value("street", p.street) if p.street else "",
            f"postalCode: {p.postcode}" if p.postcode else "",
            _ldif_value("l", p.city) if p.city else "",
            _ldif_value("description", p.description) if p.description else "",
            _ldif_value("mssanteResponsible", p.responsible) if p.responsible else "",
            f"telephoneNumber: {p.phone}" if p.phone else "",
            f"mssanteDematerialisation: {'TRUE' if p.dematerialisation else 'FALSE'}",
            f"mssanteListeRouge: {'TRUE' if p.liste_rouge else 'FALSE'}",
        ]
        yield "\n".join(line for line in lines if line) + "\n"


def write_ldif(path: Path, people: list[Person], base_dn: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for block in ldif_entries(people, base_dn):
            handle.write(block + "\n")


def main(argv: list[str]) -> None:
    kind, count, out = argv[0], int(argv[1]), Path(argv[2])
    people = population(count)
    if kind == "extraction":
        write_extraction(out, people)
    elif kind == "ldif":
        write_ldif(out, people, argv[3])
    else:
        raise SystemExit(f"unknown output {kind!r}: extraction or ldif")


if __name__ == "__main__":
    main(sys.argv[1:])
