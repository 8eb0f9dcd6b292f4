"""Administrative changes: domains, mailboxes (BAL), delegations, account secrets.

Every function here changes the store and writes its audit record in the same
transaction: a change without its audit line never becomes visible. Input
shape (address syntax, idNat formats) is checked by the caller; this module
checks what needs the database (existence, duplicates, state).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mssd.store import quota
from mssd.store.audit import insert_audit
from mssd.store.engine import write_transaction
from mssd.store.errors import Conflict, Invalid, NotFound
from mssd.store.quota import QuotaInfo
from mssd.store.records import AuditEvent, BalType, Status
from mssd.store.schema import (
    accounts,
    delegations,
    domains,
    folders,
    mailbox_usage,
    mailboxes,
    placements,
)

# Folders every mailbox has (RFC 6154 special-use attributes); issue 3's IMAP
# server relies on them existing.
DEFAULT_FOLDERS: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)

# RFC 4314 §2.1 rights; "lrswipkxtea" is everything.
ACL_RIGHTS = "lrswipkxtea"
DEFAULT_DELEGATE_RIGHTS = "lrswipte"


@dataclass(frozen=True)
class MailboxInfo:
    id: int
    address: str
    bal_type: BalType
    status: Status
    owner_idnat: str
    account_login: str
    display_name: str | None
    message_count: int
    delegates: tuple[tuple[str, str, bool], ...]
    """(account login, ACL rights, may send as this mailbox)."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def add_domain(engine: AsyncEngine, name: str, *, actor: str) -> None:
    async with write_transaction(engine) as conn:
        existing = await conn.scalar(select(domains.c.id).where(domains.c.name == name))
        if existing is not None:
            raise Conflict(f"domain {name} already exists")
        await conn.execute(domains.insert().values(name=name, created_at=now()))
        await insert_audit(conn, AuditEvent(actor=actor, action="domain.add", target=name))


async def list_domains(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.scalars(select(domains.c.name).order_by(domains.c.name))).all())


async def _account_id(conn: AsyncConnection, login: str) -> int:
    found = await conn.scalar(select(accounts.c.id).where(accounts.c.login == login.lower()))
    if found is None:
        raise NotFound(f"no account with login {login}")
    return int(found)


async def _mailbox_row(conn: AsyncConnection, address: str) -> Any:
    row = (
        await conn.execute(select(mailboxes).where(mailboxes.c.address == address.lower()))
    ).one_or_none()
    if row is None:
        raise NotFound(f"no mailbox {address}")
    return row


async def create_mailbox(
    engine: AsyncEngine,
    *,
    address: str,
    bal_type: BalType,
    owner_idnat: str,
    actor: str,
    idnat_ps: str | None = None,
    cert_dn: str | None = None,
    display_name: str | None = None,
    password_hash: str | None = None,
    quota_bytes: int | None = None,
) -> int:
    """Create a BAL, its folders and, unless it exists, the account that owns it.

    PER: the account is the professional's (one per idNat_PS; a professional
    with two PER mailboxes keeps one login). ORG/APP/CAB: a functional account
    whose login is the mailbox address; ``cert_dn`` registers an organisation
    certificate for SASL EXTERNAL.
    """
    address = address.lower()
    try:
        return await _create_mailbox(
            engine,
            address=address,
            bal_type=bal_type,
            owner_idnat=owner_idnat,
            actor=actor,
            idnat_ps=idnat_ps,
            cert_dn=cert_dn,
            display_name=display_name,
            password_hash=password_hash,
            quota_bytes=quota_bytes,
        )
    except IntegrityError:
        # Another administrator created the same thing between our checks and
        # our insert: the unique constraints caught it.
        raise Conflict(
            f"mailbox {address} conflicts with a mailbox or account created concurrently"
        ) from None


async def _create_mailbox(
    engine: AsyncEngine,
    *,
    address: str,
    bal_type: BalType,
    owner_idnat: str,
    actor: str,
    idnat_ps: str | None,
    cert_dn: str | None,
    display_name: str | None,
    password_hash: str | None,
    quota_bytes: int | None,
) -> int:
    domain_name = address.rpartition("@")[2]
    stamp = now()
    async with write_transaction(engine) as conn:
        domain_id = await conn.scalar(select(domains.c.id).where(domains.c.name == domain_name))
        if domain_id is None:
            raise NotFound(
                f"domain {domain_name} is not hosted here: add it first with "
                f"`mssd domain add {domain_name}`"
            )
        if await conn.scalar(select(mailboxes.c.id).where(mailboxes.c.address == address)):
            raise Conflict(f"mailbox {address} already exists")
        if await conn.scalar(select(accounts.c.id).where(accounts.c.login == address)):
            if idnat_ps is None or not await conn.scalar(
                select(accounts.c.id).where(
                    accounts.c.login == address, accounts.c.idnat_ps == idnat_ps
                )
            ):
                raise Conflict(f"an account with login {address} already exists")
        if cert_dn is not None and await conn.scalar(
            select(accounts.c.login).where(accounts.c.cert_dn == cert_dn)
        ):
            raise Conflict(f"certificate DN {cert_dn} is already registered on another mailbox")
        account_id: int | None = None
        if idnat_ps is not None:
            found = await conn.scalar(select(accounts.c.id).where(accounts.c.idnat_ps == idnat_ps))
            account_id = int(found) if found is not None else None
        if account_id is None:
            result = await conn.execute(
                accounts.insert().values(
                    login=address,
                    status="active",
                    idnat_ps=idnat_ps,
                    cert_dn=cert_dn,
                    password_hash=password_hash,
                    created_at=stamp,
                )
            )
            assert result.inserted_primary_key is not None
            account_id = int(result.inserted_primary_key[0])
        result = await conn.execute(
            mailboxes.insert().values(
                address=address,
                domain_id=domain_id,
                bal_type=bal_type,
                status="active",
                owner_idnat=owner_idnat,
                account_id=account_id,
                display_name=display_name,
                quota_bytes=quota_bytes,
                created_at=stamp,
                updated_at=stamp,
            )
        )
        assert result.inserted_primary_key is not None
        mailbox_id = int(result.inserted_primary_key[0])
        # UIDVALIDITY: any value that never repeats for a (mailbox, name); the
        # creation time in seconds plus the folder position does (RFC 9051 §2.3.1.1).
        base = int(time.time())
        await conn.execute(
            folders.insert(),
            [
                {
                    "mailbox_id": mailbox_id,
                    "name": name,
                    "uidvalidity": base + index,
                    "uidnext": 1,
                    "highestmodseq": 1,
                    "special_use": special,
                    "subscribed": True,
                }
                for index, (name, special) in enumerate(DEFAULT_FOLDERS)
            ],
        )
        await conn.execute(mailbox_usage.insert().values(mailbox_id=mailbox_id, used_bytes=0))
        details: dict[str, Any] = {"type": bal_type, "owner": owner_idnat}
        if cert_dn:
            details["cert_dn"] = cert_dn
        if quota_bytes is not None:
            details["quota_bytes"] = quota_bytes
        await insert_audit(
            conn, AuditEvent(actor=actor, action="mailbox.create", target=address, details=details)
        )
        return mailbox_id


async def set_quota(
    engine: AsyncEngine, address: str, quota_bytes: int | None, *, actor: str
) -> None:
    """Set a mailbox's storage quota in octets (None: no limit). A mailbox already
    holding more keeps its messages and takes no new ones until it is below."""
    if quota_bytes is not None and quota_bytes < 0:
        raise Invalid("a quota cannot be negative")
    async with write_transaction(engine) as conn:
        row = await _mailbox_row(conn, address)
        await conn.execute(
            mailboxes.update()
            .where(mailboxes.c.id == row.id)
            .values(quota_bytes=quota_bytes, updated_at=now())
        )
        await insert_audit(
            conn,
            AuditEvent(
                actor=actor,
                action="mailbox.quota",
                target=address.lower(),
                details={"from": row.quota_bytes, "to": quota_bytes},
            ),
        )


async def mailbox_quota(engine: AsyncEngine, address: str) -> QuotaInfo:
    """A mailbox's usage and quota (RFC 9208 STORAGE), as last committed."""
    async with engine.connect() as conn:
        row = await _mailbox_row(conn, address)
        used, limit = await quota.read(conn, row.id)
    return QuotaInfo(row.address, used, limit)


async def set_mailbox_status(
    engine: AsyncEngine, address: str, status: Status, *, actor: str
) -> None:
    async with write_transaction(engine) as conn:
        row = await _mailbox_row(conn, address)
        if row.status == "closed":
            raise Invalid(f"mailbox {address} is closed; a closed mailbox cannot change state")
        if row.status == status:
            raise Invalid(f"mailbox {address} is already {status}")
        await conn.execute(
            mailboxes.update()
            .where(mailboxes.c.id == row.id)
            .values(status=status, updated_at=now())
        )
        await insert_audit(
            conn,
            AuditEvent(
                actor=actor,
                action=f"mailbox.{'reactivate' if status == 'active' else status}",
                target=address.lower(),
                details={"from": row.status},
            ),
        )


async def grant(
    engine: AsyncEngine,
    address: str,
    login: str,
    *,
    rights: str,
    may_send: bool,
    actor: str,
) -> None:
    """Let an account use an ORG (or CAB) mailbox with the given RFC 4314 rights."""
    async with write_transaction(engine) as conn:
        row = await _mailbox_row(conn, address)
        if row.bal_type not in ("ORG", "CAB"):
            raise Invalid(
                f"mailbox {address} is a {row.bal_type} mailbox: only ORG and CAB mailboxes "
                "are shared with delegates"
            )
        if row.status == "closed":
            raise Invalid(f"mailbox {address} is closed")
        account_id = await _account_id(conn, login)
        if account_id == row.account_id:
            raise Invalid(f"{login} is the mailbox's own account")
        existing = await conn.scalar(
            select(delegations.c.id).where(
                delegations.c.mailbox_id == row.id, delegations.c.account_id == account_id
            )
        )
        values = {"rights": rights, "may_send": may_send}
        if existing is None:
            await conn.execute(
                delegations.insert().values(
                    mailbox_id=row.id, account_id=account_id, created_at=now(), **values
                )
            )
        else:
            await conn.execute(
                delegations.update().where(delegations.c.id == existing).values(**values)
            )
        await insert_audit(
            conn,
            AuditEvent(
                actor=actor,
                action="mailbox.grant",
                target=address.lower(),
                details={"account": login.lower(), "rights": rights, "may_send": may_send},
            ),
        )


async def revoke(engine: AsyncEngine, address: str, login: str, *, actor: str) -> None:
    async with write_transaction(engine) as conn:
        row = await _mailbox_row(conn, address)
        account_id = await _account_id(conn, login)
        result = await conn.execute(
            delegations.delete().where(
                delegations.c.mailbox_id == row.id, delegations.c.account_id == account_id
            )
        )
        if result.rowcount == 0:
            raise NotFound(f"{login} has no delegation on {address}")
        await insert_audit(
            conn,
            AuditEvent(
                actor=actor,
                action="mailbox.revoke",
                target=address.lower(),
                details={"account": login.lower()},
            ),
        )


async def set_password(engine: AsyncEngine, login: str, password_hash: str, *, actor: str) -> None:
    async with write_transaction(engine) as conn:
        account_id = await _account_id(conn, login)
        await conn.execute(
            accounts.update().where(accounts.c.id == account_id).values(password_hash=password_hash)
        )
        await insert_audit(
            conn, AuditEvent(actor=actor, action="account.passwd", target=login.lower())
        )


async def set_totp(engine: AsyncEngine, login: str, secret: str | None, *, actor: str) -> None:
    async with write_transaction(engine) as conn:
        account_id = await _account_id(conn, login)
        await conn.execute(
            accounts.update()
            .where(accounts.c.id == account_id)
            .values(totp_secret=secret, totp_last_step=0)
        )
        await insert_audit(
            conn,
            AuditEvent(
                actor=actor,
                action="account.totp-enable" if secret else "account.totp-disable",
                target=login.lower(),
            ),
        )


async def list_mailboxes(engine: AsyncEngine, *, domain: str | None = None) -> list[MailboxInfo]:
    async with engine.connect() as conn:
        query = (
            select(mailboxes, accounts.c.login)
            .join(accounts, accounts.c.id == mailboxes.c.account_id)
            .order_by(mailboxes.c.address)
        )
        if domain is not None:
            query = query.join(domains, domains.c.id == mailboxes.c.domain_id).where(
                domains.c.name == domain.lower()
            )
        rows = (await conn.execute(query)).all()
        counts = {
            mailbox_id: count
            for mailbox_id, count in await conn.execute(
                select(folders.c.mailbox_id, func.count(placements.c.id))
                .join(placements, placements.c.folder_id == folders.c.id)
                .group_by(folders.c.mailbox_id)
            )
        }
        grants: dict[int, list[tuple[str, str, bool]]] = {}
        for mailbox_id, login, rights, may_send in (
            await conn.execute(
                select(
                    delegations.c.mailbox_id,
                    accounts.c.login,
                    delegations.c.rights,
                    delegations.c.may_send,
                )
                .join(accounts, accounts.c.id == delegations.c.account_id)
                .order_by(accounts.c.login)
            )
        ).tuples():
            grants.setdefault(mailbox_id, []).append((login, rights, may_send))
        return [
            MailboxInfo(
                id=row.id,
                address=row.address,
                bal_type=row.bal_type,
                status=row.status,
                owner_idnat=row.owner_idnat,
                account_login=row.login,
                display_name=row.display_name,
                message_count=int(counts.get(row.id, 0)),
                delegates=tuple(grants.get(row.id, ())),
            )
            for row in rows
        ]
