"""The national directory's tables: extraction entries, the shared cache, and
the publication state of our own mailboxes (mssd/annuaire holds the logic).

An import replaces every extraction entry in one transaction: readers see the
old set or the new one, never a mix, and a failed import changes nothing.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import AsyncIterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, Table, and_, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from mssd.store.audit import insert_audit
from mssd.store.engine import write_transaction
from mssd.store.errors import NotFound
from mssd.store.records import AuditEvent
from mssd.store.schema import (
    annuaire_cache,
    annuaire_entries,
    annuaire_mailbox_settings,
    annuaire_publications,
    mailboxes,
)

ENTRY_FIELDS = (
    "address",
    "bal_type",
    "idnat_ps",
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
    "street",
    "postcode",
    "city",
    "description",
    "responsible",
    "phone",
    "dematerialisation",
    "liste_rouge",
)


def column_limits(table: Table, names: Sequence[str]) -> dict[str, int]:
    """The most characters each bounded text column of ``names`` holds (its length);
    unbounded (``Text``) columns are left out."""
    return {
        name: int(column.type.length)
        for name in names
        if isinstance((column := table.c[name]).type, String) and column.type.length
    }


FIELD_LIMITS = column_limits(annuaire_entries, ENTRY_FIELDS)
"""The most characters each bounded text field holds (the column's length): the
import checks them before it writes, rather than meet the database's error."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


Row = dict[str, Any]
"""An extraction entry: ENTRY_FIELDS, plus on import the folded *_key columns
(``last_name_key``, ``first_name_key``, ``profession_key``, ``city_key``)."""

_KEYS = ("last_name_key", "first_name_key", "profession_key", "city_key")


def _entry(row: Any) -> Row:
    mapping = row._mapping
    return {name: mapping[name] for name in ENTRY_FIELDS}


def _stamped(entry: Row, imported_at: dt.datetime) -> Row:
    row: Row = {name: entry.get(name) for name in ENTRY_FIELDS}
    row["liste_rouge"] = bool(entry.get("liste_rouge"))
    for key in _KEYS:
        value = entry.get(key)
        row[key] = str(value)[:255] if value else None
    row["imported_at"] = imported_at
    return row


@dataclass(frozen=True)
class ImportReport:
    entries: int
    replaced: int
    """Entries the previous import had."""


async def replace_extraction(
    engine: AsyncEngine,
    batches: AsyncIterable[Sequence[Row]],
    *,
    actor: str,
    origin: str,
) -> ImportReport:
    """Replace every extraction entry by the rows of ``batches`` (rows with
    ENTRY_FIELDS and the *_key columns, checked against :data:`FIELD_LIMITS` by
    the caller) in one transaction, and empty the cache (its answers may predate
    the new file). Each batch is inserted as it comes; an exception while
    producing one rolls everything back."""
    imported_at = now()
    count = 0
    async with write_transaction(engine) as conn:
        previous = int(await conn.scalar(select(func.count()).select_from(annuaire_entries)) or 0)
        await conn.execute(delete(annuaire_entries))
        async for batch in batches:
            if batch:
                await conn.execute(
                    annuaire_entries.insert(), [_stamped(row, imported_at) for row in batch]
                )
                count += len(batch)
        await conn.execute(delete(annuaire_cache))
        await insert_audit(
            conn,
            AuditEvent(
                actor=actor,
                action="annuaire.import",
                target=origin,
                details={"entries": count, "previous": previous},
            ),
        )
    return ImportReport(entries=count, replaced=previous)


async def extraction_by_address(engine: AsyncEngine, address: str) -> list[Row]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(annuaire_entries).where(annuaire_entries.c.address == address)
        )
        return [_entry(row) for row in rows]


async def extraction_by_idnat_ps(engine: AsyncEngine, idnat_ps: str) -> list[Row]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(annuaire_entries)
            .where(annuaire_entries.c.idnat_ps == idnat_ps)
            .order_by(annuaire_entries.c.address)
        )
        return [_entry(row) for row in rows]


def _prefix(column: Any, value: str) -> ColumnElement[bool]:
    # LIKE with our own escape character: the user's % and _ are literal.
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(f"{escaped}%", escape="\\")  # type: ignore[no-any-return]


async def extraction_search(
    engine: AsyncEngine,
    *,
    last_name: str = "",
    first_name: str = "",
    profession_code: str = "",
    profession_label: str = "",
    city: str = "",
    postcode: str = "",
    bal_type: str = "",
    limit: int,
) -> list[Row]:
    """Listed entries matching every given criterion. Names, profession label and
    city are folded prefixes (the caller folds them); the postcode a prefix."""
    c = annuaire_entries.c
    conditions: list[ColumnElement[bool]] = []
    for column, value in (
        (c.last_name_key, last_name),
        (c.first_name_key, first_name),
        (c.profession_key, profession_label),
        (c.city_key, city),
        (c.postcode, postcode),
    ):
        if value:
            conditions.append(_prefix(column, value))
    if profession_code:
        conditions.append(c.profession_code == profession_code)
    if bal_type:
        conditions.append(c.bal_type == bal_type)
    if not conditions:
        return []
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(annuaire_entries)
            .where(and_(*conditions), c.liste_rouge.is_(False))
            .order_by(c.last_name_key, c.first_name_key, c.address)
            .limit(limit)
        )
        return [_entry(row) for row in rows]


async def extraction_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(annuaire_entries)) or 0)


# -- the cache -------------------------------------------------------------------


@dataclass(frozen=True)
class CachedAnswer:
    status: str
    source: str
    entries: str
    """JSON, as the caller stored it."""


async def cache_get(engine: AsyncEngine, key: str) -> CachedAnswer | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(annuaire_cache).where(
                    annuaire_cache.c.key == key, annuaire_cache.c.expires_at > now()
                )
            )
        ).one_or_none()
    if row is None:
        return None
    return CachedAnswer(status=row.status, source=row.source, entries=row.entries)


def _upsert(conn: AsyncConnection, table: Any, values: dict[str, Any], keys: Sequence[str]) -> Any:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(**values)
    return statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={k: statement.excluded[k] for k in values if k not in keys},
    )


async def cache_put(
    engine: AsyncEngine,
    key: str,
    *,
    status: str,
    source: str,
    entries: str,
    ttl_seconds: float,
) -> None:
    values = {
        "key": key,
        "status": status,
        "source": source,
        "entries": entries,
        "expires_at": now() + dt.timedelta(seconds=ttl_seconds),
    }
    async with write_transaction(engine) as conn:
        await conn.execute(_upsert(conn, annuaire_cache, values, ["key"]))


async def cache_purge(engine: AsyncEngine, *, expired_only: bool = True) -> int:
    async with write_transaction(engine) as conn:
        statement = delete(annuaire_cache)
        if expired_only:
            statement = statement.where(annuaire_cache.c.expires_at <= now())
        result = await conn.execute(statement)
        return int(result.rowcount)


# -- our mailboxes, as the directory should show them -----------------------------


@dataclass(frozen=True)
class PublishedMailbox:
    """One of our mailboxes with its directory settings and last publication."""

    mailbox_id: int
    address: str
    bal_type: str
    status: str
    owner_idnat: str
    display_name: str | None
    liste_rouge: bool = False
    dematerialisation: bool = False
    description: str | None = None
    responsible: str | None = None
    service: str | None = None
    phone: str | None = None


@dataclass(frozen=True)
class PublicationState:
    published: bool
    fingerprint: str | None
    location: str | None
    """Where the mailbox is published, when it is (and was recorded)."""
    action: str
    outcome: str
    http_status: int | None
    message: str
    attempted_at: dt.datetime


async def our_mailboxes(engine: AsyncEngine) -> list[PublishedMailbox]:
    s = annuaire_mailbox_settings.c
    query = (
        select(
            mailboxes.c.id,
            mailboxes.c.address,
            mailboxes.c.bal_type,
            mailboxes.c.status,
            mailboxes.c.owner_idnat,
            mailboxes.c.display_name,
            s.liste_rouge,
            s.dematerialisation,
            s.description,
            s.responsible,
            s.service,
            s.phone,
        )
        .select_from(mailboxes.outerjoin(annuaire_mailbox_settings))
        .order_by(mailboxes.c.address)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        PublishedMailbox(
            mailbox_id=row.id,
            address=row.address,
            bal_type=row.bal_type,
            status=row.status,
            owner_idnat=row.owner_idnat,
            display_name=row.display_name,
            liste_rouge=bool(row.liste_rouge),
            dematerialisation=bool(row.dematerialisation),
            description=row.description,
            responsible=row.responsible,
            service=row.service,
            phone=row.phone,
        )
        for row in rows
    ]


SETTING_FLAGS = ("liste_rouge", "dematerialisation")
SETTING_TEXTS = ("description", "responsible", "service", "phone")
SETTING_LIMITS = column_limits(annuaire_mailbox_settings, SETTING_TEXTS)
"""The most characters each bounded setting holds (today only ``phone``; the
others are unbounded ``Text``)."""

# Published as LDAP telephoneNumber, a PrintableString in ITU-T E.123 form (RFC 4519
# §2.35, RFC 4517 §3.3.31), and as a FHIR valueString: digits and the usual visual
# separators ("01 23 45 67 89", "+33 (0)1 23-45-67-89"), a "+" only in front.
_PHONE = re.compile(r"\+?[0-9 .()-]*[0-9][0-9 .()-]*")


class SettingError(ValueError):
    """A directory setting the store refuses; the message names the field and the rule."""


def checked_settings(changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` as the store keeps them, or :class:`SettingError` before anything
    is written: the two flags are booleans; the texts are single-line, valid Unicode
    and fit their column, surrounding blanks dropped, an empty text clearing the
    setting (None); the phone number looks like one."""
    unknown = set(changes) - {*SETTING_FLAGS, *SETTING_TEXTS}
    if unknown:
        raise SettingError(f"unknown directory settings: {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name in SETTING_FLAGS:
            if not isinstance(value, bool):
                raise SettingError(f"{name} must be yes or no, got {value!r}")
            checked[name] = value
        elif value is None:
            checked[name] = None
        else:
            checked[name] = _checked_text(name, value)
    return checked


def _checked_text(name: str, value: Any) -> str | None:
    if not isinstance(value, str):
        raise SettingError(f"{name} must be text, got {value!r}")
    text = value.strip()
    for char in text:
        category = unicodedata.category(char)
        if category == "Cs":
            # A command-line argument that was not UTF-8 (Python's surrogateescape):
            # neither database nor directory could store it.
            raise SettingError(f"{name} is not valid UTF-8 text")
        if category == "Cc" or char in "\u2028\u2029":
            # A directory field is one line of display text (FHIR string, LDAP
            # DirectoryString); a control character has no place in it.
            raise SettingError(f"{name} contains a control character ({char!r})")
    if not text:
        return None
    limit = SETTING_LIMITS.get(name)
    if limit is not None and len(text) > limit:
        raise SettingError(f"{name} is {len(text)} characters long, at most {limit} fit")
    if name == "phone" and not _PHONE.fullmatch(text):
        raise SettingError(
            f"phone {text!r} is not a telephone number (digits, spaces and . - ( ), "
            "with an optional + in front)"
        )
    return text


async def set_mailbox_settings(
    engine: AsyncEngine, address: str, *, actor: str, **changes: Any
) -> dict[str, Any]:
    """Change the directory settings of one of our mailboxes (only the given keys,
    checked by :func:`checked_settings` before anything is written); returns the
    values stored."""
    changes = checked_settings(changes)
    async with write_transaction(engine) as conn:
        mailbox_id = await conn.scalar(
            select(mailboxes.c.id).where(mailboxes.c.address == address.lower())
        )
        if mailbox_id is None:
            raise NotFound(f"no mailbox {address}")
        current = (
            await conn.execute(
                select(annuaire_mailbox_settings).where(
                    annuaire_mailbox_settings.c.mailbox_id == mailbox_id
                )
            )
        ).one_or_none()
        values: dict[str, Any] = {
            "mailbox_id": mailbox_id,
            "liste_rouge": False,
            "dematerialisation": False,
            "description": None,
            "responsible": None,
            "service": None,
            "phone": None,
        }
        if current is not None:
            values.update({k: current._mapping[k] for k in (*SETTING_FLAGS, *SETTING_TEXTS)})
        values.update(changes)
        values["updated_at"] = now()
        await conn.execute(_upsert(conn, annuaire_mailbox_settings, values, ["mailbox_id"]))
        await insert_audit(
            conn,
            AuditEvent(
                actor=actor,
                action="annuaire.settings",
                target=address.lower(),
                details={k: v for k, v in changes.items()},
            ),
        )
    return changes


async def publication_states(engine: AsyncEngine, target: str) -> dict[int, PublicationState]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(annuaire_publications).where(annuaire_publications.c.target == target)
        )
        return {
            row.mailbox_id: PublicationState(
                published=row.published,
                fingerprint=row.fingerprint,
                location=row.location,
                action=row.action,
                outcome=row.outcome,
                http_status=row.http_status,
                message=row.message,
                attempted_at=row.attempted_at,
            )
            for row in rows
        }


async def record_publication(
    engine: AsyncEngine,
    mailbox_id: int,
    target: str,
    *,
    published: bool,
    fingerprint: str | None,
    location: str | None,
    action: str,
    outcome: str,
    http_status: int | None,
    message: str,
    actor: str,
    address: str,
) -> None:
    values = {
        "mailbox_id": mailbox_id,
        "target": target,
        "published": published,
        "fingerprint": fingerprint,
        "location": location,
        "action": action,
        "outcome": outcome,
        "http_status": http_status,
        "message": message[:2000],
        "attempted_at": now(),
    }
    async with write_transaction(engine) as conn:
        await conn.execute(_upsert(conn, annuaire_publications, values, ["mailbox_id", "target"]))
        await insert_audit(
            conn,
            AuditEvent(
                actor=actor,
                action="annuaire.publish",
                target=address,
                result=outcome,
                details={
                    "target": target,
                    "action": action,
                    "status": http_status,
                    "location": location,
                },
            ),
        )
