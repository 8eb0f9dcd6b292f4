"""Annuaire Santé FHIR resources <-> directory entries (sans I/O).

A mailbox is a ``telecom`` (ContactPoint, system ``email``) of a Practitioner,
PractitionerRole or Organization, marked as MSSanté by the FR Core email-type
extension (code ``MSSANTE``) and/or described by the Annuaire Santé extension
``as-ext-mailbox-mss-metadata`` (sub-extensions type, listeRouge, description,
responsible, service, phone, digitization, publication). References: ANS,
IG FHIR Annuaire Santé, StructureDefinition as-mailbox-mss and
as-ext-mailbox-mss-metadata; HL7 France FR Core, fr-core-contact-point-email-type.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from mssd.annuaire.model import DirectoryEntry

MAILBOX_METADATA = "https://interop.esante.gouv.fr/ig/fhir/annuaire/StructureDefinition/as-ext-mailbox-mss-metadata"
EMAIL_TYPE = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-contact-point-email-type"
EMAIL_TYPE_SYSTEM = (
    "https://mos.esante.gouv.fr/NOS/TRE_R256-TypeMessagerie/FHIR/TRE-R256-TypeMessagerie"
)
BAL_TYPE_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_R257-TypeBAL/FHIR/TRE-R257-TypeBAL"
IDNAT_PS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
IDNAT_STRUCT_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2"
FINESS_SYSTEM = "https://finess.esante.gouv.fr"
PROFESSION_SYSTEM_PART = "TRE_G15"
CATEGORY_SYSTEM_PART = "TRE_R66"
SAVOIR_FAIRE_SYSTEM_PARTS = ("TRE_R38", "TRE_R39", "TRE_R40", "TRE_R42", "TRE_R43", "TRE_R44")

Json = Mapping[str, Any]


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _codings(concept: Any) -> Iterator[Json]:
    if isinstance(concept, Mapping):
        for coding in concept.get("coding") or ():
            if isinstance(coding, Mapping):
                yield coding


def _extension_value(extension: Json) -> Any:
    for key, value in extension.items():
        if key.startswith("value"):
            if key == "valueCodeableConcept":
                return next((c.get("code") for c in _codings(value)), None)
            if key == "valueCoding" and isinstance(value, Mapping):
                return value.get("code")
            return value
    return None


def mailbox_metadata(telecom: Json) -> dict[str, Any] | None:
    """The sub-extensions of as-ext-mailbox-mss-metadata, by url (None if absent)."""
    for extension in telecom.get("extension") or ():
        if isinstance(extension, Mapping) and extension.get("url") == MAILBOX_METADATA:
            return {
                str(sub.get("url")): _extension_value(sub)
                for sub in extension.get("extension") or ()
                if isinstance(sub, Mapping)
            }
    return None


def is_mss_telecom(telecom: Json) -> bool:
    if telecom.get("system") != "email" or not _text(telecom.get("value")):
        return False
    for extension in telecom.get("extension") or ():
        if not isinstance(extension, Mapping):
            continue
        if extension.get("url") == MAILBOX_METADATA:
            return True
        if extension.get("url") == EMAIL_TYPE and _extension_value(extension) == "MSSANTE":
            return True
    return False


def _identifier(resource: Json, *systems: str) -> tuple[str, str] | None:
    for identifier in resource.get("identifier") or ():
        if isinstance(identifier, Mapping) and identifier.get("system") in systems:
            value = _text(identifier.get("value"))
            if value:
                return str(identifier["system"]), value
    return None


def _holder(resource: Json) -> dict[str, Any]:
    """What a resource says about the professional or structure holding its mailboxes."""
    kind = resource.get("resourceType")
    info: dict[str, Any] = {}
    if kind in ("Practitioner", "PractitionerRole"):
        found = _identifier(resource, IDNAT_PS_SYSTEM)
        if found is None and kind == "PractitionerRole":
            reference = resource.get("practitioner") or {}
            ident = reference.get("identifier") if isinstance(reference, Mapping) else None
            if isinstance(ident, Mapping) and ident.get("system") == IDNAT_PS_SYSTEM:
                found = (IDNAT_PS_SYSTEM, str(ident.get("value")))
        if found:
            info["idnat_ps"] = found[1]
        names = resource.get("name") or ()
        name = names[0] if names and isinstance(names[0], Mapping) else {}
        info["last_name"] = _text(name.get("family"))
        given = name.get("given") or ()
        info["first_name"] = _text(given[0]) if given else None
        prefix = name.get("prefix") or ()
        info["civility"] = _text(prefix[0]) if prefix else None
        concepts = [
            q.get("code") for q in resource.get("qualification") or () if isinstance(q, Mapping)
        ]
        concepts += list(resource.get("code") or ()) + list(resource.get("specialty") or ())
        for concept in concepts:
            for coding in _codings(concept):
                system = str(coding.get("system") or "")
                if PROFESSION_SYSTEM_PART in system and "profession_code" not in info:
                    info["profession_code"] = _text(coding.get("code"))
                    info["profession_label"] = _text(coding.get("display"))
                elif any(p in system for p in SAVOIR_FAIRE_SYSTEM_PARTS):
                    info.setdefault("savoir_faire", _text(coding.get("display")))
    if kind == "Organization":
        found = _identifier(resource, IDNAT_STRUCT_SYSTEM, FINESS_SYSTEM)
        if found:
            info["structure_id"] = found[1] if found[0] == IDNAT_STRUCT_SYSTEM else "1" + found[1]
        info["structure_name"] = _text(resource.get("name"))
        for concept in resource.get("type") or ():
            for coding in _codings(concept):
                if CATEGORY_SYSTEM_PART in str(coding.get("system") or ""):
                    info["structure_category"] = _text(coding.get("code"))
        addresses = resource.get("address") or ()
        if addresses and isinstance(addresses[0], Mapping):
            address = addresses[0]
            lines = [str(x) for x in address.get("line") or () if isinstance(x, str)]
            info["street"] = ", ".join(lines) or None
            info["postcode"] = _text(address.get("postalCode"))
            info["city"] = _text(address.get("city"))
    return {k: v for k, v in info.items() if v is not None}


def entries_of(resource: Json) -> list[DirectoryEntry]:
    """One entry per MSSanté mailbox of a Practitioner, PractitionerRole or Organization."""
    if resource.get("resourceType") not in ("Practitioner", "PractitionerRole", "Organization"):
        return []
    holder = _holder(resource)
    entries = []
    for telecom in resource.get("telecom") or ():
        if not isinstance(telecom, Mapping) or not is_mss_telecom(telecom):
            continue
        meta = mailbox_metadata(telecom) or {}
        values = dict(holder)
        bal_type = meta.get("type")
        if isinstance(bal_type, str) and bal_type:
            values["bal_type"] = bal_type.upper()
        for source, target in (
            ("description", "description"),
            ("responsible", "responsible"),
            ("service", "service"),
            ("phone", "phone"),
        ):
            if isinstance(meta.get(source), str) and meta[source].strip():
                values[target] = meta[source].strip()
        if isinstance(meta.get("digitization"), bool):
            values["dematerialisation"] = meta["digitization"]
        values["liste_rouge"] = meta.get("listeRouge") is True
        entries.append(
            DirectoryEntry(address=str(telecom["value"]).strip(), source="fhir", **values)
        )
    return entries


def bundle_resources(bundle: Json) -> list[Json]:
    if bundle.get("resourceType") != "Bundle":
        raise ValueError(f"expected a Bundle, got {bundle.get('resourceType')!r}")
    return [
        entry["resource"]
        for entry in bundle.get("entry") or ()
        if isinstance(entry, Mapping) and isinstance(entry.get("resource"), Mapping)
    ]


def next_link(bundle: Json) -> str | None:
    for link in bundle.get("link") or ():
        if isinstance(link, Mapping) and link.get("relation") == "next":
            return _text(link.get("url"))
    return None
