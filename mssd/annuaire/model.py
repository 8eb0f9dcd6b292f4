"""Value objects of the directory: one mailbox record, a search, an answer.

Pure values and pure functions (no I/O): every backend turns what it reads into
:class:`DirectoryEntry`, and the resolver hands those to the layers above.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mssd.store.records import BAL_TYPES

__all__ = ["BAL_TYPES"]


PHARMACY_CATEGORY = "620"
"""FINESS establishment category "Pharmacie d'Officine" (TRE_R66)."""

Status = Literal["found", "not_found", "unknown"]


class DirectoryError(Exception):
    """A backend could not answer (unreachable, refused, malformed reply)."""


class DirectoryConfigError(ValueError):
    """The directory settings cannot work; the message names the setting."""


def read_secret(path: Path, key: str) -> str:
    """A secret (bind password, API key) from the file a setting names."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise DirectoryConfigError(f"{key}: cannot read {path}: {error.strerror}") from None


class AddressError(ValueError):
    """Input that cannot be a mail address; the message says why."""


def normalise_address(address: str) -> str:
    """The address as the directory compares it: the domain is case-insensitive
    (RFC 5321 §2.4), the local part is kept exactly as given."""
    text = address.strip()
    local, sep, domain = text.rpartition("@")
    if not sep or not local or not domain or "." not in domain or any(c.isspace() for c in text):
        raise AddressError(f"{address!r} is not a mail address (expected local-part@domain)")
    return f"{local}@{domain.lower()}"


_YES = frozenset({"true", "yes", "y", "oui", "o", "1"})
_NO = frozenset({"false", "no", "n", "non", "0"})


def parse_yes_no(text: str) -> bool | None:
    """A yes/no value as the directory's sources and our users write it
    (True/False, O/N, oui/non, yes/no, 1/0, any case); None when it is neither."""
    value = text.strip().lower()
    if value in _YES:
        return True
    if value in _NO:
        return False
    return None


def fold(text: str | None) -> str:
    """Text for comparisons: without accents, case-folded, single spaces."""
    if not text:
        return ""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(bare.casefold().split())


_PHARMACY = re.compile(r"\bpharmacie\b")


@dataclass(frozen=True)
class DirectoryEntry:
    """One MSSanté mailbox as the directory describes it (MOS ``BoiteLettreMSS``),
    with the professional or structure that holds it."""

    address: str
    bal_type: str | None = None
    idnat_ps: str | None = None
    """idNat_PS of the professional: ``8``+RPPS or ``0``+ADELI."""
    civility: str | None = None
    last_name: str | None = None
    first_name: str | None = None
    profession_code: str | None = None
    """TRE_G15 code: 10 médecin, 21 pharmacien, 60 infirmier..."""
    profession_label: str | None = None
    savoir_faire: str | None = None
    """Libellé savoir-faire (specialty)."""
    structure_id: str | None = None
    """Identification Structure (idNat_Struct, FINESS or SIRET as the source gives it)."""
    structure_name: str | None = None
    """Raison sociale of the structure."""
    trade_name: str | None = None
    structure_category: str | None = None
    """FINESS establishment category (TRE_R66), e.g. 620 for a pharmacy."""
    service: str | None = None
    """Service de rattachement."""
    street: str | None = None
    postcode: str | None = None
    city: str | None = None
    description: str | None = None
    responsible: str | None = None
    phone: str | None = None
    dematerialisation: bool | None = None
    liste_rouge: bool = False
    source: str = ""

    @property
    def rpps(self) -> str | None:
        if self.idnat_ps and self.idnat_ps.startswith("8"):
            return self.idnat_ps[1:]
        return None

    @property
    def is_pharmacy(self) -> bool:
        """A structure that is an officine: its FINESS category when the source
        gives it, else (the extraction file has no category) its name."""
        if self.structure_category:
            return self.structure_category == PHARMACY_CATEGORY
        return bool(_PHARMACY.search(fold(f"{self.structure_name or ''} {self.trade_name or ''}")))

    def display_name(self) -> str:
        person = " ".join(p for p in (self.first_name, self.last_name) if p)
        return person or self.structure_name or self.description or self.address

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DirectoryEntry:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class SearchQuery:
    """An address-book search: every given criterion must match. Names match
    from their start, ignoring case and accents; postcode from its start
    (``75`` finds Paris); profession is a TRE_G15 code or a label prefix."""

    name: str = ""
    first_name: str = ""
    profession: str = ""
    city: str = ""
    postcode: str = ""
    bal_type: str = ""

    def is_empty(self) -> bool:
        return not any(dataclasses.astuple(self))

    def key(self) -> str:
        return "|".join(fold(v) for v in dataclasses.astuple(self))


@dataclass(frozen=True)
class Lookup:
    """The answer to a lookup. ``unknown`` means the directory could not say
    (timeout, every backend failing): the caller decides without it."""

    status: Status
    entries: tuple[DirectoryEntry, ...] = ()
    source: str = ""
    """The backend that answered ("cache:<backend>" when from the cache)."""
    reason: str = ""

    @property
    def found(self) -> bool:
        return self.status == "found"

    @property
    def entry(self) -> DirectoryEntry | None:
        return self.entries[0] if self.entries else None
