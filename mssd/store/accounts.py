"""Read side of accounts and mailboxes for authentication and delivery policy.

Implements ``mssd.auth.AccountLookup``; the delivery pipeline asks here who may
send as which address and where a recipient address lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store.engine import run_read, write_transaction
from mssd.store.fastpath import FastStatement
from mssd.store.records import Account, BalType, Status
from mssd.store.schema import accounts, delegations, domains, mailbox_usage, mailboxes


@dataclass(frozen=True)
class LocalMailbox:
    id: int
    address: str
    bal_type: BalType
    status: Status
    used_bytes: int = 0
    """What it holds as last committed (quota.py); a hint for RCPT, not a reservation."""
    quota_bytes: int | None = None


_ACCOUNT_COLUMNS = (
    accounts.c.id,
    accounts.c.login,
    accounts.c.status,
    accounts.c.idnat_ps,
    accounts.c.cert_dn,
    accounts.c.password_hash,
    accounts.c.totp_secret,
)


def _account(row: tuple[Any, ...]) -> Account:
    """An :data:`_ACCOUNT_COLUMNS` row."""
    id_, login, status, idnat_ps, cert_dn, password_hash, totp_secret = row
    return Account(
        id=int(id_),
        login=str(login),
        status=status,
        idnat_ps=idnat_ps,
        cert_dn=cert_dn,
        password_hash=password_hash,
        totp_secret=totp_secret,
    )


_BY_COLUMN = {
    column.key: FastStatement(select(*_ACCOUNT_COLUMNS).where(column == bindparam("b_value")))
    for column in (accounts.c.login, accounts.c.idnat_ps, accounts.c.cert_dn)
}
"""Every login reads one (mssd.store.fastpath)."""
_LOCAL_MAILBOX = FastStatement(
    select(
        mailboxes.c.id,
        mailboxes.c.address,
        mailboxes.c.bal_type,
        mailboxes.c.status,
        mailbox_usage.c.used_bytes,
        mailboxes.c.quota_bytes,
    )
    .select_from(mailboxes.outerjoin(mailbox_usage, mailbox_usage.c.mailbox_id == mailboxes.c.id))
    .where(mailboxes.c.address == bindparam("b_address"))
)
"""Every RCPT TO of a local address reads one (mssd.store.fastpath)."""


class StoreAccounts:
    """Account and mailbox look-ups backed by the database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def _one(self, column: Column[str], value: str) -> Account | None:
        query = _BY_COLUMN[column.key]
        rows = await run_read(self._engine, lambda conn: query.rows(conn, {"b_value": value}))
        row = rows[0] if rows else None
        return None if row is None else _account(row)

    async def by_login(self, login: str) -> Account | None:
        return await self._one(accounts.c.login, login.lower())

    async def by_idnat_ps(self, idnat_ps: str) -> Account | None:
        return await self._one(accounts.c.idnat_ps, idnat_ps)

    async def by_cert_dn(self, normalised_dn: str) -> Account | None:
        return await self._one(accounts.c.cert_dn, normalised_dn)

    async def claim_totp_step(self, account_id: int, step: int) -> bool:
        # RFC 6238 §5.2: a code is accepted once. The conditional UPDATE makes the
        # claim atomic across sessions and processes.
        async with write_transaction(self._engine) as conn:
            result = await conn.execute(
                update(accounts)
                .where(accounts.c.id == account_id, accounts.c.totp_last_step < step)
                .values(totp_last_step=step)
            )
            return result.rowcount == 1

    async def sendable_addresses(self, account_id: int) -> frozenset[str]:
        """Addresses the account may use as MAIL FROM: its own active mailboxes and
        the ORG/CAB mailboxes it is delegated on with the right to send."""
        own = select(mailboxes.c.address).where(
            mailboxes.c.account_id == account_id, mailboxes.c.status == "active"
        )
        delegated = (
            select(mailboxes.c.address)
            .join(delegations, delegations.c.mailbox_id == mailboxes.c.id)
            .where(
                delegations.c.account_id == account_id,
                delegations.c.may_send.is_(True),
                mailboxes.c.status == "active",
            )
        )
        rows = await run_read(self._engine, lambda conn: list(conn.scalars(own.union(delegated))))
        return frozenset(str(address) for address in rows)

    async def local_mailbox(self, address: str) -> LocalMailbox | None:
        rows = await run_read(
            self._engine, lambda conn: _LOCAL_MAILBOX.rows(conn, {"b_address": address.lower()})
        )
        if not rows:
            return None
        id_, stored, bal_type, status, used_bytes, quota_bytes = rows[0]
        return LocalMailbox(
            id=id_,
            address=stored,
            bal_type=bal_type,
            status=status,
            used_bytes=int(used_bytes or 0),
            quota_bytes=quota_bytes,
        )

    async def local_domains(self) -> frozenset[str]:
        names = await run_read(
            self._engine, lambda conn: list(conn.scalars(select(domains.c.name)))
        )
        return frozenset(str(name) for name in names)
