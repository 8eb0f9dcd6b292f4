"""Publication of our mailboxes to the national directory (FHIR PATCH) and to a
site's own directory (LDAP).

What is sent is decided from the store alone (``plan``, no I/O):

| our mailbox | already published | action |
|---|---|---|
| active, listed | no | ``insert`` the ContactPoint |
| active, listed, changed since | yes | ``replace`` it |
| unlisted (liste rouge) or closed | yes | ``delete`` it |
| unlisted or closed | no | nothing: never published |
| suspended | either | nothing: left as it is |
| active, listed, now on another resource | yes | ``move``: delete it there, insert it here |

A mailbox moves when the resource that carries it changes: a CAB mailbox whose
responsible changes belongs to the new responsible's Practitioner. Where each
mailbox was published is recorded (``location``) so that the old resource
stops listing it; rows published before that was recorded cannot be moved and
get a ``replace`` as before.

FHIR: a ``Parameters`` resource of FHIRPath Patch operations (FHIR R4 §3.1.0.6.2)
on ``<Resource>.telecom``, sent as a conditional PATCH (R4 §3.1.0.7.1): PER on
``Practitioner?identifier=urn:oid:1.2.250.1.71.4.2.1|<idNat_PS>``, CAB on the
Practitioner of its responsible's idNat_PS, ORG and APP on
``Organization?identifier=https://finess.esante.gouv.fr|<FINESS>`` (or, for a
SIRET-identified structure, ``urn:oid:1.2.250.1.71.4.2.2|<idNat_Struct>``). The
directory answers 404 when the condition matches nothing and 412 when it
matches several; the address and type of a mailbox cannot be changed, only
deleted and re-created. Fields per type follow the Annuaire Santé IG table
(PER: type, digitization, listeRouge; ORG/APP: + description, service,
responsible, phone; CAB: + description, responsible).
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.annuaire.fhir_resources import (
    BAL_TYPE_SYSTEM,
    EMAIL_TYPE,
    EMAIL_TYPE_SYSTEM,
    FINESS_SYSTEM,
    IDNAT_PS_SYSTEM,
    IDNAT_STRUCT_SYSTEM,
    MAILBOX_METADATA,
)
from mssd.annuaire.model import DirectoryError
from mssd.config import Settings
from mssd.store import annuaire as store
from mssd.store.annuaire import PublicationState, PublishedMailbox
from mssd.trust.idnat import IdNatError, check_idnat_ps

Action = Literal["insert", "replace", "delete", "move", "skip"]
Patch = Literal["insert", "replace", "delete"]


class PublicationError(ValueError):
    """A mailbox cannot be published as it stands; the message says what is missing."""


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def contact_point(mailbox: PublishedMailbox) -> dict[str, Any]:
    """The ContactPoint of a mailbox (profile as-mailbox-mss)."""
    metadata: list[dict[str, Any]] = [
        {
            "url": "type",
            "valueCodeableConcept": {
                "coding": [{"system": BAL_TYPE_SYSTEM, "code": mailbox.bal_type}]
            },
        },
        {"url": "digitization", "valueBoolean": mailbox.dematerialisation},
        # Unlisted mailboxes are never published: what is published is listed.
        {"url": "listeRouge", "valueBoolean": False},
    ]
    optional: tuple[str, ...] = ()
    if mailbox.bal_type in ("ORG", "APP"):
        optional = ("description", "service", "responsible", "phone")
    elif mailbox.bal_type == "CAB":
        optional = ("description", "responsible")
    for name in optional:
        value = getattr(mailbox, name)
        if value:
            metadata.append({"url": name, "valueString": value})
    return {
        "system": "email",
        "value": mailbox.address,
        "extension": [
            {"url": EMAIL_TYPE, "valueCoding": {"system": EMAIL_TYPE_SYSTEM, "code": "MSSANTE"}},
            {"url": MAILBOX_METADATA, "extension": metadata},
        ],
    }


def fhir_target(mailbox: PublishedMailbox) -> tuple[str, str, str]:
    """(resource type, identifier system, identifier value) of the resource that
    carries the mailbox."""
    if mailbox.bal_type == "PER":
        return "Practitioner", IDNAT_PS_SYSTEM, mailbox.owner_idnat
    if mailbox.bal_type == "CAB":
        try:
            responsible = check_idnat_ps((mailbox.responsible or "").strip())
        except IdNatError:
            raise PublicationError(
                f"{mailbox.address}: a CAB mailbox is published on its responsible's "
                f"Practitioner: set it with `mssd annuaire set {mailbox.address} "
                "--responsible <idNat_PS>`"
            ) from None
        return "Practitioner", IDNAT_PS_SYSTEM, responsible
    structure = mailbox.owner_idnat
    if structure.startswith("1"):
        return "Organization", FINESS_SYSTEM, structure[1:]
    return "Organization", IDNAT_STRUCT_SYSTEM, structure


def fhir_location(mailbox: PublishedMailbox) -> str | None:
    """Where the mailbox belongs in the FHIR directory (``resource|system|value``);
    None when it cannot be published as it stands."""
    try:
        return "|".join(fhir_target(mailbox))
    except PublicationError:
        return None


def fingerprint(mailbox: PublishedMailbox) -> str:
    try:
        target = fhir_target(mailbox)
    except PublicationError:
        target = ("", "", "")
    data = json.dumps([target, contact_point(mailbox)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


def decide(
    mailbox: PublishedMailbox,
    state: PublicationState | None,
    location: str | None = None,
    *,
    rewrite_current: bool = False,
) -> Decision:
    """What to send for ``mailbox``, given its last publication and where it
    belongs now (``location``, None when unknown). With ``rewrite_current``, a
    listed mailbox that is up to date is written again rather than skipped."""
    published = state is not None and state.published
    if mailbox.status == "closed" or mailbox.liste_rouge:
        why = "closed" if mailbox.status == "closed" else "unlisted (liste rouge)"
        if published:
            return Decision("delete", why)
        return Decision("skip", f"{why}: never published")
    if mailbox.status != "active":
        return Decision("skip", f"{mailbox.status}: left as it is")
    if not published:
        return Decision("insert", "not published yet")
    assert state is not None
    if location is not None and state.location is not None and state.location != location:
        return Decision("move", f"it now belongs on {location}, not {state.location}")
    if state.fingerprint != fingerprint(mailbox):
        return Decision("replace", "changed since the last publication")
    if rewrite_current:
        return Decision("replace", "rewritten")
    return Decision("skip", "up to date")


def _telecom_where(resource: str, address: str) -> str:
    # FHIRPath string literal (FHIRPath §3.2): quotes and backslashes escaped.
    literal = address.replace("\\", "\\\\").replace("'", "\\'")
    return f"{resource}.telecom.where(value = '{literal}')"


@dataclass(frozen=True)
class FhirPatch:
    address: str
    action: Action
    resource: str
    system: str
    value: str
    body: dict[str, Any]

    @property
    def query(self) -> str:
        """``<Resource>?identifier=<system>|<value>``, percent-encoded."""
        return f"{self.resource}?" + urllib.parse.urlencode(
            {"identifier": f"{self.system}|{self.value}"}
        )


def fhir_patch(mailbox: PublishedMailbox, action: Patch, location: str | None = None) -> FhirPatch:
    """The PATCH of ``action`` on the resource the mailbox belongs to, or on the
    one at ``location`` (where it was published before)."""
    if location is not None:
        resource, system, value = location.split("|", 2)
    else:
        resource, system, value = fhir_target(mailbox)
    parts: list[dict[str, Any]] = [{"name": "type", "valueCode": action}]
    if action == "insert":
        parts += [
            {"name": "path", "valueString": f"{resource}.telecom"},
            {"name": "index", "valueInteger": 0},
            {"name": "value", "valueContactPoint": contact_point(mailbox)},
        ]
    elif action == "replace":
        parts += [
            {"name": "path", "valueString": _telecom_where(resource, mailbox.address)},
            {"name": "value", "valueContactPoint": contact_point(mailbox)},
        ]
    elif action == "delete":
        parts.append({"name": "path", "valueString": _telecom_where(resource, mailbox.address)})
    body = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": parts}]}
    return FhirPatch(mailbox.address, action, resource, system, value, body)


# -- running it ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ledger:
    """Records each publication outcome of one target in the store."""

    engine: AsyncEngine
    target: str
    actor: str

    async def done(
        self,
        mailbox: PublishedMailbox,
        action: str,
        *,
        published: bool,
        status: int | None = None,
        message: str = "ok",
    ) -> None:
        """The directory now holds the mailbox (``published``) or no longer does."""
        await self._write(
            mailbox,
            action,
            "ok",
            status,
            message,
            published=published,
            fingerprint=fingerprint(mailbox) if published else None,
            # Only a FHIR mailbox can move: an LDAP entry's DN is its address.
            location=fhir_location(mailbox) if published and self.target == "fhir" else None,
        )

    async def failed(
        self,
        mailbox: PublishedMailbox,
        state: PublicationState | None,
        action: str,
        message: str,
        status: int | None = None,
    ) -> None:
        """Nothing changed in the directory: the previous state stands."""
        await self._write(
            mailbox,
            action,
            "error",
            status,
            message,
            published=state.published if state else False,
            fingerprint=state.fingerprint if state else None,
            location=state.location if state else None,
        )

    async def _write(
        self,
        mailbox: PublishedMailbox,
        action: str,
        outcome: str,
        status: int | None,
        message: str,
        *,
        published: bool,
        fingerprint: str | None,
        location: str | None,
    ) -> None:
        await store.record_publication(
            self.engine,
            mailbox.mailbox_id,
            self.target,
            published=published,
            fingerprint=fingerprint,
            location=location,
            action=action,
            outcome=outcome,
            http_status=status,
            message=message,
            actor=self.actor,
            address=mailbox.address,
        )


def _fhir_patches(
    mailbox: PublishedMailbox, action: Action, state: PublicationState | None
) -> list[FhirPatch]:
    """The PATCHes of an action, in order: a move deletes the mailbox where it
    was, then inserts it where it belongs."""
    if action == "move":
        assert state is not None and state.location is not None
        return [fhir_patch(mailbox, "delete", state.location), fhir_patch(mailbox, "insert")]
    if action == "skip":
        raise ValueError("no PATCH for skip")
    return [fhir_patch(mailbox, action)]


def _fhir_message(patch: FhirPatch, status: int, body: Any) -> str:
    from mssd.annuaire.fhir import outcome_text

    if 200 <= status < 300:
        return "ok"
    message = outcome_text(body)
    if status == 404:
        return f"no {patch.resource} with {patch.system}|{patch.value}: {message}"
    if status == 412:
        return f"several {patch.resource} with {patch.system}|{patch.value}: {message}"
    return message


async def _publish_fhir(
    settings: Settings,
    engine: AsyncEngine,
    mailboxes: list[PublishedMailbox],
    *,
    dry_run: bool,
    actor: str,
    out: Callable[[str], None],
) -> None:
    from mssd.annuaire.fhir import FhirClient, FhirConfig

    ledger = _Ledger(engine, "fhir", actor)
    states = await store.publication_states(engine, "fhir")
    client = None if dry_run else FhirClient(FhirConfig.from_settings(settings.annuaire))
    try:
        for mailbox in mailboxes:
            state = states.get(mailbox.mailbox_id)
            decision = decide(mailbox, state, fhir_location(mailbox))
            if decision.action == "skip":
                out(f"# fhir {mailbox.address}: nothing to send ({decision.reason})")
                continue
            try:
                patches = _fhir_patches(mailbox, decision.action, state)
            except PublicationError as error:
                out(f"# fhir {mailbox.address}: cannot publish: {error}")
                if client is not None:
                    await ledger.failed(mailbox, state, decision.action, str(error))
                continue
            if client is None:
                for patch in patches:
                    out(f"PATCH {settings.annuaire.fhir_url.rstrip('/')}/{patch.query}")
                    out(json.dumps(patch.body, ensure_ascii=False, indent=2))
                continue
            for patch in patches:
                try:
                    response = await client.request(
                        "PATCH", client.url(patch.query), body=patch.body
                    )
                except DirectoryError as error:
                    await ledger.failed(mailbox, state, decision.action, str(error))
                    out(f"fhir {mailbox.address}: {patch.action} failed: {error}")
                    break
                ok = 200 <= response.status < 300
                message = _fhir_message(patch, response.status, response.body)
                out(f"fhir {mailbox.address}: {patch.action} -> {response.status} {message}")
                if patch is not patches[-1] and (ok or response.status == 404):
                    continue  # moved away (or the old resource is gone): now insert
                if ok:
                    await ledger.done(
                        mailbox,
                        decision.action,
                        published=decision.action != "delete",
                        status=response.status,
                    )
                else:
                    await ledger.failed(
                        mailbox, state, decision.action, message, status=response.status
                    )
                break
    finally:
        if client is not None:
            await client.close()


async def _publish_ldap(
    settings: Settings,
    engine: AsyncEngine,
    mailboxes: list[PublishedMailbox],
    *,
    dry_run: bool,
    actor: str,
    out: Callable[[str], None],
) -> None:
    from mssd.annuaire.ldap_publish import LdapPublisher, ldap_attributes, mailbox_dn

    ledger = _Ledger(engine, "ldap", actor)
    base = settings.annuaire.ldap_publish_base_dn
    states = await store.publication_states(engine, "ldap")
    publisher = None if dry_run else LdapPublisher.from_settings(settings.annuaire)
    try:
        for mailbox in mailboxes:
            state = states.get(mailbox.mailbox_id)
            # The directory is the site's own: a listed mailbox is written even
            # when unchanged, so that a lost entry comes back.
            decision = decide(mailbox, state, rewrite_current=True)
            if decision.action == "skip":
                out(f"# ldap {mailbox.address}: nothing to write ({decision.reason})")
                continue
            dn = mailbox_dn(mailbox.address, base)
            if publisher is None:
                # LDIF (RFC 2849); an entry that exists gets its attributes replaced.
                out(f"# ldap {mailbox.address}: {decision.action} ({decision.reason})")
                out(f"dn: {dn}")
                if decision.action == "delete":
                    out("changetype: delete")
                else:
                    out("changetype: add")
                    for name, values in ldap_attributes(mailbox).items():
                        for value in values:
                            out(f"{name}: {value}")
                out("")
                continue
            try:
                done = await publisher.write(mailbox, decision.action == "delete")
            except DirectoryError as error:
                await ledger.failed(mailbox, state, decision.action, str(error))
                out(f"ldap {mailbox.address}: {decision.action} failed: {error}")
                continue
            await ledger.done(mailbox, done, published=decision.action != "delete")
            out(f"ldap {mailbox.address}: {done} {dn}")
    finally:
        if publisher is not None:
            await publisher.close()


async def run_publication(
    settings: Settings,
    engine: AsyncEngine,
    *,
    dry_run: bool,
    actor: str,
    out: Callable[[str], None],
) -> None:
    """Publish (or, dry run, print) every mailbox change to each configured target."""
    mailboxes = await store.our_mailboxes(engine)
    for target in settings.annuaire.publish_targets:
        if target == "fhir":
            await _publish_fhir(settings, engine, mailboxes, dry_run=dry_run, actor=actor, out=out)
        elif target == "ldap":
            await _publish_ldap(settings, engine, mailboxes, dry_run=dry_run, actor=actor, out=out)
