"""The public extraction file ``Extraction_Correspondance_MSSante`` (sans I/O).

UTF-8 text, fields separated by ``|``, one header line, then one line per
mailbox. Columns are found by their header name (compared without accents,
case, punctuation, and the `` structure BAL`` suffix some publications add), so
a reordered or extended file still reads; ``Type de BAL`` and ``Adresse BAL``
are required.

Every line is checked before anything is stored, the length of each bounded
field included (``mssd.store.annuaire.FIELD_LIMITS``): a field too long for the
store refuses its line, it is never cut (a truncated phone number or postcode
is a wrong one). Refused lines do not stop the reading: the rest of the file is
still checked, and the import then fails with :class:`ExtractionError` naming
every refused line (the first :data:`REPORTED` of them) and the problem; the
store keeps the previous import whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mssd.annuaire.model import (
    BAL_TYPES,
    AddressError,
    DirectoryEntry,
    fold,
    normalise_address,
    parse_yes_no,
)
from mssd.store.annuaire import FIELD_LIMITS
from mssd.trust.idnat import IdNatError, check_idnat_ps

REPORTED = 20
"""Refused lines named in the error; the others are counted."""


class ExtractionError(ValueError):
    """The file cannot be imported; the message names the line and the field."""


def _column_key(header: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", fold(header))
    return key.removesuffix("structurebal")


# Normalised header -> DirectoryEntry field (or an address part, below).
_COLUMNS = {
    "typedebal": "bal_type",
    "adressebal": "address",
    "typeidentifiantpp": "_idpp_type",
    "typedidentifiantpp": "_idpp_type",
    "identifiantpp": "_idpp",
    "identificationnationalepp": "idnat_ps",
    "identificationstructure": "structure_id",
    "servicederattachement": "service",
    "civilitedexercice": "civility",
    "nomdexercice": "last_name",
    "prenomdexercice": "first_name",
    "codeprofession": "profession_code",
    "libelleprofession": "profession_label",
    "libellesavoirfaire": "savoir_faire",
    "dematerialisation": "dematerialisation",
    "raisonsociale": "structure_name",
    "enseignecommerciale": "trade_name",
    "l2complementlocalisation": "_l2",
    "l3complementdistribution": "_l3",
    "l4numerovoie": "_l4_number",
    "l4complementnumerovoie": "_l4_complement",
    "nl4typevoie": "_l4_type",
    "l4libellevoie": "_l4_name",
    "l5lieuditmention": "_l5",
    "l6ligneacheminement": "_l6",
    "codepostal": "postcode",
    # Not in today's publication; read when present.
    "listerouge": "liste_rouge",
    "description": "description",
    "responsable": "responsible",
    "telephone": "phone",
    "categorieetablissement": "structure_category",
    "codecategorieetablissement": "structure_category",
}
_REQUIRED = ("bal_type", "address")
_POSTCODE_PREFIX = re.compile(r"^\s*\d{5}\s+")


# Field -> the column's name in the file, for messages.
_LABELS = {
    "address": "Adresse BAL",
    "bal_type": "Type de BAL",
    "idnat_ps": "Identification nationale PP",
    "profession_code": "Code profession",
    "structure_id": "Identification structure",
    "structure_category": "Catégorie établissement",
    "postcode": "Code postal",
    "phone": "Téléphone",
}


@dataclass
class ExtractionStats:
    lines: int = 0
    entries: int = 0
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    refused: int = 0
    refused_examples: list[str] = field(default_factory=list)
    """The first :data:`REPORTED` refused lines, each ``line N: why``."""

    def refuse(self, message: str) -> None:
        self.refused += 1
        if len(self.refused_examples) < REPORTED:
            self.refused_examples.append(message)

    def refusal(self) -> ExtractionError:
        """The error that refuses the whole file, naming its refused lines."""
        if self.refused == 1:
            return ExtractionError(self.refused_examples[0])
        more = self.refused - len(self.refused_examples)
        return ExtractionError(
            f"{self.refused} lines refused: "
            + "; ".join(self.refused_examples)
            + (f"; and {more} more" if more else "")
        )


def _flag(value: str, line: int, column: str) -> bool:
    flag = parse_yes_no(value) if value.strip() else False
    if flag is not None:
        return flag
    raise ExtractionError(f"line {line}: {column} is {value!r}, expected True/False (or O/N)")


def _header(line: str) -> dict[str, int]:
    positions: dict[str, int] = {}
    for index, name in enumerate(line.rstrip("\r\n").split("|")):
        target = _COLUMNS.get(_column_key(name))
        if target is not None and target not in positions:
            positions[target] = index
    missing = [name for name in _REQUIRED if name not in positions]
    if missing:
        labels = {"bal_type": "Type de BAL", "address": "Adresse BAL"}
        raise ExtractionError(
            "line 1: the header lacks the column(s) "
            + ", ".join(repr(labels[m]) for m in missing)
            + " (is this an Extraction_Correspondance_MSSante file, separated by |?)"
        )
    return positions


def parse_extraction(
    lines: Iterable[str], stats: ExtractionStats | None = None
) -> Iterator[DirectoryEntry]:
    """Yield one entry per mailbox line; the first line is the header. A second
    line for an address already seen is skipped and counted in ``stats``. A
    malformed line is counted in ``stats`` and the reading goes on; at the end,
    :class:`ExtractionError` names the refused lines (a bad header raises at once)."""
    stats = stats if stats is not None else ExtractionStats()
    iterator = iter(lines)
    try:
        first = next(iterator)
    except StopIteration:
        raise ExtractionError("the file is empty (expected a header line)") from None
    positions = _header(first.removeprefix("\ufeff"))
    width = len(first.split("|"))
    seen: set[str] = set()
    stats.lines = 1
    for number, raw in enumerate(iterator, start=2):
        stats.lines = number
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != width:
            stats.refuse(
                f"line {number}: {len(fields)} fields separated by |, the header has {width}"
            )
            continue
        try:
            entry = _entry(fields, positions, number)
        except ExtractionError as error:
            stats.refuse(str(error))
            continue
        if stats.refused:
            continue  # the file will be refused: only the checking goes on
        if entry.address in seen:
            stats.duplicates += 1
            if len(stats.duplicate_examples) < 5:
                stats.duplicate_examples.append(f"line {number}: {entry.address}")
            continue
        seen.add(entry.address)
        stats.entries += 1
        yield entry
    if stats.refused:
        raise stats.refusal()


def _entry(fields: list[str], positions: dict[str, int], number: int) -> DirectoryEntry:
    values: dict[str, str] = {name: fields[index].strip() for name, index in positions.items()}
    raw_address = values["address"]
    try:
        address = normalise_address(raw_address)
    except AddressError as error:
        raise ExtractionError(f"line {number}: Adresse BAL: {error}") from None
    bal_type = values["bal_type"].upper()
    if bal_type not in BAL_TYPES:
        raise ExtractionError(
            f"line {number}: Type de BAL is {values['bal_type']!r}, "
            f"expected one of {', '.join(BAL_TYPES)}"
        )
    idnat = values.get("idnat_ps") or ""
    if not idnat and values.get("_idpp") and values.get("_idpp_type") in ("0", "8"):
        idnat = values["_idpp_type"] + values["_idpp"]
    if idnat:
        try:
            check_idnat_ps(idnat)
        except IdNatError as error:
            raise ExtractionError(f"line {number}: Identification nationale PP: {error}") from None
    street = " ".join(
        part
        for part in (
            values.get("_l4_number"),
            values.get("_l4_complement"),
            values.get("_l4_type"),
            values.get("_l4_name"),
        )
        if part
    )
    street = ", ".join(
        part for part in (values.get("_l2"), values.get("_l3"), street, values.get("_l5")) if part
    )
    city = _POSTCODE_PREFIX.sub("", values.get("_l6", ""))
    extra: dict[str, Any] = {}
    if "dematerialisation" in values:
        extra["dematerialisation"] = (
            _flag(values["dematerialisation"], number, "Dématérialisation")
            if values["dematerialisation"]
            else None
        )
    if "liste_rouge" in values:
        extra["liste_rouge"] = _flag(values["liste_rouge"], number, "Liste rouge")
    text_fields = (
        "civility",
        "last_name",
        "first_name",
        "profession_code",
        "profession_label",
        "savoir_faire",
        "structure_id",
        "structure_name",
        "trade_name",
        "structure_category",
        "service",
        "postcode",
        "description",
        "responsible",
        "phone",
    )
    for name in text_fields:
        if values.get(name):
            extra[name] = values[name]
    _check_lengths({"address": address, **extra}, number)
    return DirectoryEntry(
        address=address,
        bal_type=bal_type,
        idnat_ps=idnat or None,
        street=street or None,
        city=city or None,
        source="extraction",
        **extra,
    )


def _check_lengths(values: dict[str, Any], number: int) -> None:
    for name, value in values.items():
        limit = FIELD_LIMITS.get(name)
        if limit is not None and isinstance(value, str) and len(value) > limit:
            raise ExtractionError(
                f"line {number}: {_LABELS.get(name, name)} is {len(value)} characters long, "
                f"at most {limit} fit: {value[:40]!r}"
            )


def entry_row(entry: DirectoryEntry) -> dict[str, Any]:
    """The store row of an entry, with the folded columns searches use."""
    row = entry.to_json()
    row.pop("source", None)
    row["liste_rouge"] = entry.liste_rouge
    row["last_name_key"] = fold(entry.last_name)
    row["first_name_key"] = fold(entry.first_name)
    row["profession_key"] = fold(entry.profession_label)
    row["city_key"] = fold(entry.city)
    return row


def read_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Decode the file's lines as UTF-8, naming the line that is not."""
    for number, raw in enumerate(chunks, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ExtractionError(
                f"line {number}: not UTF-8 (byte {error.start + 1} of the line)"
            ) from None
