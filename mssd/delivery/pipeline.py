"""Sender and recipient policy, and acceptance of a complete message."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from mssd import metrics
from mssd.delivery.dsn import RecipientStatus, ReportedMessage, Reporter, wants_report
from mssd.delivery.local_reports import LocalOutcome, make_reports
from mssd.mime import OFFLOAD_BYTES
from mssd.mime.headers import complete_submission, received_field
from mssd.store.accounts import LocalMailbox, StoreAccounts
from mssd.store.delivery import (
    DueReports,
    GroupCommitter,
    NewMessage,
    RecipientRecord,
    StoredMessage,
    new_envelope_id,
)
from mssd.store.quota import OverQuota, Usage
from mssd.trust.whitelist import Whitelist, mailbox_key

Source = Literal["submission", "mta"]
log = logging.getLogger(__name__)

MSS_NIL = metrics.counter(
    "mssd_mss_nil_total",
    "Messages accepted per X-MSS-NIL value (the sending software, reported by operators)",
    ("nil",),
)
_MSS_NIL = re.compile(rb"^x-mss-nil:[ \t]*(.*(?:\r\n[ \t].*)*)", re.I | re.M)


def count_mss_nil(data: bytes) -> list[str]:
    """Count the message's ``X-MSS-NIL`` values (the field itself is never changed)."""
    end = data.find(b"\r\n\r\n")
    head = data[: end + 2] if end >= 0 else data
    values = []
    for match in _MSS_NIL.finditer(head):
        value = " ".join(match[1].decode("utf-8", "replace").split())[:64]
        if value:
            values.append(value)
            MSS_NIL.inc(value)
    return values


# How long look-ups may be served from memory: a new domain, or a mailbox
# suspended, closed or delegated, takes effect within this many seconds in every
# process. Nothing stored depends on it; it spares a database round trip per
# RCPT (bench/README.md: 250 -> 478 msg/s on SQLite).
_DOMAINS_TTL = 5.0
_LOOKUP_TTL = 2.0
_LOOKUP_MAX = 50_000

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Values remembered for a few seconds, bounded in number."""

    def __init__(self, ttl: float, max_entries: int = _LOOKUP_MAX) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[K, tuple[float, V]] = {}

    async def get(self, key: K, load: Callable[[K], Awaitable[V]]) -> V:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            return entry[1]
        value = await load(key)
        if len(self._entries) >= self._max:
            self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
            while len(self._entries) >= self._max:
                del self._entries[next(iter(self._entries))]
        self._entries[key] = (now + self._ttl, value)
        return value


class PolicyRefusal(Exception):
    """A refusal with its exact SMTP reply (RFC 5321 §4.2, RFC 3463 enhanced code)."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True)
class SessionInfo:
    """What policy needs to know about the connection."""

    source: Source
    remote_ip: str
    helo: str
    tls: str | None
    """Protocol and cipher when encrypted (for trace fields), else None."""
    account_id: int | None = None
    login: str | None = None
    peer_certificate: bytes | None = None
    """DER of the verified TLS client certificate (the operator's, on port 25)."""


@dataclass
class Transaction:
    """One MAIL transaction as policy sees it."""

    session: SessionInfo
    mail_from: str
    smtputf8: bool = False
    body: str | None = None
    dsn_ret: str | None = None
    dsn_envid: str | None = None
    size: int | None = None
    """The SIZE declared on MAIL (RFC 1870), if any."""
    recipients: list[RecipientRecord] = field(default_factory=list)


class PolicyCheck(Protocol):
    """A hook consulted before acceptance (DESIGN.md: trust space on port 25,
    patient conversation rules). Raise :class:`PolicyRefusal` to refuse."""

    async def check_sender(self, transaction: Transaction) -> None: ...

    async def check_recipient(self, transaction: Transaction, recipient: str) -> None: ...


class DeliveryPipeline:
    def __init__(
        self,
        accounts: StoreAccounts,
        committer: GroupCommitter,
        *,
        hostname: str,
        checks: Sequence[PolicyCheck] = (),
    ) -> None:
        self._accounts = accounts
        self._committer = committer
        self._hostname = hostname
        self._checks = list(checks)
        self._domains: TtlCache[None, frozenset[str]] = TtlCache(_DOMAINS_TTL)
        self._mailboxes: TtlCache[str, LocalMailbox | None] = TtlCache(_LOOKUP_TTL)
        self._senders: TtlCache[int, frozenset[str]] = TtlCache(_LOOKUP_TTL)
        self._trust_space: Callable[[], Whitelist | None] = lambda: None
        self._reporter: Reporter | None = None
        self._authenticate: Callable[[bytes], Awaitable[bytes]] | None = None

    def add_check(self, check: PolicyCheck) -> None:
        self._checks.append(check)

    def set_inbound_authentication(self, header: Callable[[bytes], Awaitable[bytes]]) -> None:
        """On port 25: a function giving the Authentication-Results field (RFC 8601) to
        add to a received message (DKIM; never a reason to refuse)."""
        self._authenticate = header

    def set_reporter(self, reporter: Reporter) -> None:
        """Who makes delivery reports (mssd answers NOTIFY=SUCCESS for local deliveries)."""
        self._reporter = reporter

    def set_trust_space(self, whitelist: Callable[[], Whitelist | None]) -> None:
        """Where the ANS whitelist in force is read: the domains mail may be relayed to."""
        self._trust_space = whitelist

    async def local_domains(self) -> frozenset[str]:
        return await self._domains.get(None, lambda _: self._accounts.local_domains())

    async def check_sender(self, transaction: Transaction) -> None:
        session = transaction.session
        if session.source == "submission":
            if session.account_id is None:
                raise PolicyRefusal(530, "5.7.0", "Authentication required")
            if not transaction.mail_from:
                raise PolicyRefusal(
                    550, "5.7.1", "A submitted message needs a sender address (MAIL FROM:<>)"
                )
            allowed = await self._senders.get(session.account_id, self._accounts.sendable_addresses)
            if mailbox_key(transaction.mail_from) not in allowed:
                raise PolicyRefusal(
                    550,
                    "5.7.1",
                    f"<{transaction.mail_from}>: {session.login} may not send as this address "
                    "(only as its own mailboxes or an ORG mailbox it is delegated on)",
                )
        for check in self._checks:
            await check.check_sender(transaction)

    async def check_recipient(self, transaction: Transaction, address: str) -> RecipientRecord:
        # Our domains and mailboxes are stored with A-label domains (RFC 5890 §2.3.2.1):
        # a recipient written with U-labels (RFC 6531 SMTPUTF8) is the same mailbox.
        key = mailbox_key(address)
        domain = key.rpartition("@")[2]
        if domain not in await self.local_domains():
            return await self._remote_recipient(transaction, address, domain)
        mailbox = await self._mailboxes.get(key, self._accounts.local_mailbox)
        if mailbox is None:
            raise PolicyRefusal(550, "5.1.1", f"<{address}>: no such mailbox here")
        if mailbox.status == "suspended":
            raise PolicyRefusal(
                450, "4.2.1", f"<{address}>: mailbox temporarily suspended, try again later"
            )
        if mailbox.status == "closed":
            raise PolicyRefusal(550, "5.2.1", f"<{address}>: mailbox closed")
        # RFC 5321 §4.2.2 (552) and RFC 3463 §3.3 (X.2.2 mailbox full): refused now when
        # the mailbox is full or the declared SIZE does not fit. As last committed, a
        # few seconds old at most: the store decides again when it places the message.
        usage = Usage(mailbox.id, mailbox.address, mailbox.used_bytes, mailbox.quota_bytes)
        refusal = usage.refusal(max(transaction.size or 0, 1))
        if refusal is not None:
            raise PolicyRefusal(552, "5.2.2", f"<{address}>: {refusal.reason}")
        for check in self._checks:
            await check.check_recipient(transaction, address)
        return RecipientRecord(address=mailbox.address, mailbox_id=mailbox.id)

    async def _remote_recipient(
        self, transaction: Transaction, address: str, domain: str
    ) -> RecipientRecord:
        """A recipient of another operator: queued for the relay when its domain is in the
        trust space (DESIGN.md step 2), for our own users only."""
        if transaction.session.source != "submission":
            # Port 25 takes mail for this operator's domains only: never an open relay.
            raise PolicyRefusal(
                550, "5.7.1", f"<{address}>: domain {domain} is not hosted here; relaying denied"
            )
        listed = self._trust_space()
        if listed is None or not listed.has_domain(domain):
            raise PolicyRefusal(
                550,
                "5.7.1",
                f"<{address}>: recipient domain is outside the MSSanté trust space",
            )
        for check in self._checks:
            await check.check_recipient(transaction, address)
        return RecipientRecord(address=address, mailbox_id=None)

    def _prepare(
        self, transaction: Transaction, data: bytes, envelope_id: str, moment: dt.datetime
    ) -> tuple[bytes, str]:
        session = transaction.session
        if session.source == "submission":
            data = complete_submission(
                data, envelope_id=envelope_id, hostname=self._hostname, moment=moment
            )
        protocol = "UTF8SMTP" if transaction.smtputf8 else "ESMTP"
        if session.tls:
            protocol += "S"
        if session.account_id is not None:
            protocol += "A"
        single = transaction.recipients[0].address if len(transaction.recipients) == 1 else None
        trace = received_field(
            helo=session.helo,
            remote_ip=session.remote_ip,
            hostname=self._hostname,
            protocol=protocol,
            envelope_id=envelope_id,
            tls=session.tls,
            recipient=single,
            moment=moment,
        )
        content = trace + data
        return content, hashlib.sha256(content).hexdigest()

    async def accept(self, transaction: Transaction, data: bytes) -> StoredMessage:
        """Store the message for every recipient; returns after COMMIT."""
        moment = dt.datetime.now(dt.UTC)
        envelope_id = new_envelope_id()
        count_mss_nil(data)
        if transaction.session.source == "mta" and self._authenticate is not None:
            # RFC 8601 §5: added at the top, like a trace field, below our Received.
            data = await self._authenticate(data) + data
        if len(data) > OFFLOAD_BYTES:
            content, digest = await asyncio.to_thread(
                self._prepare, transaction, data, envelope_id, moment
            )
        else:
            content, digest = self._prepare(transaction, data, envelope_id, moment)
        session = transaction.session
        report = await self._success_report(transaction, envelope_id, content, moment)
        try:
            stored = await self._committer.store(
                NewMessage(
                    envelope_id=envelope_id,
                    content=content,
                    sha256=digest,
                    mail_from=transaction.mail_from,
                    recipients=tuple(transaction.recipients),
                    source=session.source,
                    remote=session.remote_ip,
                    received_at=moment,
                    auth_login=session.login,
                    dsn_ret=transaction.dsn_ret,
                    dsn_envid=transaction.dsn_envid,
                    body=transaction.body,
                    smtputf8=transaction.smtputf8,
                    reports=(report,) if report is not None else (),
                )
            )
        except OverQuota as full:
            # No recipient has room (RFC 5321 §4.2.2 552): nothing was stored.
            raise PolicyRefusal(
                552, "5.2.2", "; ".join(f"<{r.address}>: {r.reason}" for r in full.refusals)
            ) from None
        if stored.over_quota:
            await self._report_local_outcomes(transaction, stored, content, moment)
        return stored

    async def _success_report(
        self, transaction: Transaction, envelope_id: str, content: bytes, moment: dt.datetime
    ) -> NewMessage | None:
        """RFC 3461 §5.2.1: the final delivery MTA reports success when NOTIFY asked for it.
        The report is committed with the message, in the same transaction (no second
        commit before the 250, and no crash can keep one without the other); the null
        sender never gets one (§6.2). It is built before the commit, so it names every
        local recipient: when a mailbox turns out full in that transaction, the store
        drops it and marks the refused rows instead, and the success report is made
        with the failure report, under the same marks (:meth:`_report_local_outcomes`)."""
        if self._reporter is None or not transaction.mail_from:
            return None
        delivered = [
            RecipientStatus(
                final_recipient=r.address,
                action="delivered",
                status="2.0.0",
                original_recipient=r.dsn_orcpt,
                diagnostic=f"250 2.0.0 delivered to the mailbox as {envelope_id}",
                remote_mta=self._hostname,
            )
            for r in transaction.recipients
            if r.mailbox_id is not None and wants_report(r.dsn_notify, "delivered")
        ]
        if not delivered:
            return None
        return await self._reporter.prepare(
            ReportedMessage(
                envelope_id=envelope_id,
                mail_from=transaction.mail_from,
                content=content,
                arrival=moment,
                dsn_ret=transaction.dsn_ret,
                dsn_envid=transaction.dsn_envid,
            ),
            delivered,
        )

    async def _report_local_outcomes(
        self, transaction: Transaction, stored: StoredMessage, content: bytes, moment: dt.datetime
    ) -> None:
        """When a mailbox turned out full as the message was placed (after the others
        were accepted at RCPT): the failure report, and the success report NOTIFY asked
        for (RFC 3461 §5.2.1), made after the commit. The message's transaction marked
        them owed (RFC 5321 §6.1: once 250 is given, a failure is reported, never
        dropped); this writes them and clears the marks in one transaction. If that
        fails, or the process dies first, the marks stay and the recovery pass makes
        them (``mssd.delivery.local_reports``). The null sender never gets one (§6.2)."""
        for refused in stored.over_quota:
            log.warning("%s: not delivered to <%s>: %s", stored.envelope_id, refused.address,
                        refused.reason)  # fmt: skip
        if self._reporter is None or not transaction.mail_from:
            return
        full = {refused.address: refused.reason for refused in stored.over_quota}
        outcomes = [
            LocalOutcome(r, full.get(r.address))
            for r in transaction.recipients
            if r.mailbox_id is not None
        ]
        reported = ReportedMessage(
            envelope_id=stored.envelope_id,
            mail_from=transaction.mail_from,
            content=content,
            arrival=moment,
            dsn_ret=transaction.dsn_ret,
            dsn_envid=transaction.dsn_envid,
        )
        try:
            reports = await make_reports(self._reporter, reported, outcomes, self._hostname)
            await self._committer.fulfil(DueReports(stored.envelope_id, reports))
        except Exception:
            log.exception("%s: the reports on it could not be stored now; they stay owed, "
                          "for the recovery pass", stored.envelope_id)  # fmt: skip
