"""In-memory stand-ins for the store's side of authentication, for unit tests of
``mssd.auth`` (the SMTP tests use the real store)."""

from __future__ import annotations

from mssd.store.records import Account, AuditEvent

NOW = 1_700_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MemoryAccounts:
    """An ``AccountLookup`` over a list, recording the logins looked up."""

    def __init__(self, *accounts: Account) -> None:
        self.accounts = list(accounts)
        self.last_step: dict[int, int] = {}
        self.lookups: list[str] = []

    async def by_login(self, login: str) -> Account | None:
        self.lookups.append(login)
        return next((a for a in self.accounts if a.login.lower() == login.lower()), None)

    async def by_idnat_ps(self, idnat_ps: str) -> Account | None:
        return next((a for a in self.accounts if a.idnat_ps == idnat_ps), None)

    async def by_cert_dn(self, normalised_dn: str) -> Account | None:
        return next((a for a in self.accounts if a.cert_dn == normalised_dn), None)

    async def claim_totp_step(self, account_id: int, step: int) -> bool:
        if step <= self.last_step.get(account_id, -1):
            return False
        self.last_step[account_id] = step
        return True


class AuditList:
    """An ``AuditSink`` keeping events in memory."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def record(self, event: AuditEvent) -> None:
        self.events.append(event)

    @property
    def results(self) -> list[str]:
        return [e.result for e in self.events]
