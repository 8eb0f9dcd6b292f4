"""Durable delivery with group commit (DESIGN.md, "One message", step 3).

A protocol session hands a complete message to :meth:`GroupCommitter.store`
and answers 250 only when that call returns: by then the blob, the envelope,
its recipients, one INBOX placement per local recipient and the audit line are
committed in one transaction. Concurrent sessions share transactions: while
one commit is being flushed to disk, the next messages queue up and are
committed together, so the cost of ``fsync`` is paid once per batch rather than
once per message. Durability is never traded for speed: every message's
future resolves only after its own batch's COMMIT returned.

Invariants:
- a future is resolved only after COMMIT; a failed batch is retried message by
  message so one bad message cannot fail the others;
- UIDs are allocated from ``folders.uidnext`` inside the transaction, with the
  folder rows locked (PostgreSQL ``FOR UPDATE``, SQLite ``BEGIN IMMEDIATE``), in
  folder-id order so concurrent writers cannot deadlock;
- change notifications are published after COMMIT, never before;
- a local recipient whose mailbox has no room for the message (quota.py) gets no
  placement: its recipient row says ``over_quota`` and :attr:`StoredMessage.over_quota`
  tells the caller, who reports it to the sender. A message that reaches nobody
  at all is not stored: :class:`~mssd.store.quota.OverQuota` rolls its transaction
  back (the batch is then retried message by message, as for any failure);
- that report is owed from the message's own commit (RFC 5321 §6.1): the refused row
  keeps the refusal's reason in ``report_due`` (not when the sender is null: no report
  is ever made about a report, RFC 3461 §6.2). The reports written for a
  :class:`DueReports` clear every mark of their envelope in their transaction, and
  only if the marks were still there: "stored" and "no longer owed" commit together,
  and a report is never stored twice (``mssd.delivery.local_reports`` makes them,
  after the commit or, after a crash, in the recovery pass).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, false, literal, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.store import quota
from mssd.store.audit import audit_row, write_audit_rows
from mssd.store.engine import run_write, small_write
from mssd.store.fastpath import FastInsert
from mssd.store.quota import OverQuota, Refusal
from mssd.store.records import AuditEvent
from mssd.store.report_dues import claim_owed
from mssd.store.schema import (
    blobs,
    envelope_recipients,
    envelopes,
    folders,
    outbound_queue,
    placements,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecipientRecord:
    address: str
    mailbox_id: int | None
    """The local mailbox, or None for a recipient left to the relay."""
    dsn_notify: str | None = None
    dsn_orcpt: str | None = None


@dataclass(frozen=True)
class NewMessage:
    envelope_id: str
    """From :func:`new_envelope_id`; chosen before commit so trace headers can name it."""
    content: bytes
    sha256: str
    mail_from: str
    recipients: tuple[RecipientRecord, ...]
    source: str
    """"submission" or "mta"."""
    remote: str
    received_at: dt.datetime
    auth_login: str | None = None
    dsn_ret: str | None = None
    dsn_envid: str | None = None
    body: str | None = None
    smtputf8: bool = False
    reports: tuple[NewMessage, ...] = ()
    """Delivery reports this message causes, written in its transaction (a success
    report for a local delivery, RFC 3461 §5.2.1): never one without the other."""


@dataclass(frozen=True)
class Placement:
    mailbox_id: int
    folder_id: int
    uid: int
    modseq: int


@dataclass(frozen=True)
class StoredMessage:
    envelope_id: str
    placements: tuple[Placement, ...]
    queued: int = 0
    """Recipients left to the relay: outbound queue entries created with the message."""
    over_quota: tuple[Refusal, ...] = ()
    """Local recipients refused because their mailbox is full (nothing placed for them)."""
    reports: tuple[StoredMessage, ...] = ()
    """The reports written with it (:attr:`NewMessage.reports`)."""


@dataclass(frozen=True)
class DueReports:
    """The reports owed on an envelope's over-quota recipients (``report_due``), made:
    written, and the envelope's marks cleared, in one transaction, unless the marks
    are gone already (another writer made them). ``reports`` may be empty: nothing
    was due after all (NOTIFY=NEVER, a sender that cannot be reached), and the marks
    are cleared all the same."""

    envelope_id: str
    reports: tuple[NewMessage, ...]


def new_envelope_id() -> str:
    """Sortable by time, unguessable: milliseconds then 48 random bits."""
    return f"{int(time.time() * 1000):011X}{secrets.token_hex(6).upper()}"


# Statements are built once: SQLAlchemy memoizes a statement object's cache key, so
# reusing the objects skips rebuilding and re-keying them for every batch.
# (ON CONFLICT has no cache key: through Connection.execute it was compiled anew for
# every batch; the fast path compiles it once, mssd.store.fastpath.)
INSERT_BLOB = FastInsert(blobs, skip_conflicts_on=["sha256"])
_SELECT_INBOXES = (
    select(folders.c.id, folders.c.mailbox_id, folders.c.uidnext, folders.c.highestmodseq)
    .where(
        folders.c.mailbox_id.in_(bindparam("mailbox_ids", expanding=True)),
        folders.c.name == "INBOX",
    )
    .order_by(folders.c.id)
)
_SELECT_INBOXES_FOR_UPDATE = _SELECT_INBOXES.with_for_update()
_ADVANCE_FOLDER = (
    update(folders)
    .where(folders.c.id == bindparam("folder"))
    .values(uidnext=bindparam("next"), highestmodseq=bindparam("modseq"))
)
_INSERT_ENVELOPE = envelopes.insert()
_INSERT_RECIPIENT = envelope_recipients.insert()
_INSERT_PLACEMENT = placements.insert()
# One queue entry per recipient left to the relay, referring to its recipient row (the
# rows' ids are not known before they are inserted: read back in the same statement).
_INSERT_QUEUE = outbound_queue.insert().from_select(
    ["recipient_id", "state", "attempts", "next_attempt_at", "delay_reported"],
    select(
        envelope_recipients.c.id,
        literal("queued"),
        literal(0),
        envelopes.c.received_at,
        false(),
    )
    .join(envelopes, envelopes.c.id == envelope_recipients.c.envelope_id)
    .where(
        envelope_recipients.c.envelope_id.in_(bindparam("envelope_ids", expanding=True)),
        envelope_recipients.c.mailbox_id.is_(None),
    )
    .order_by(envelope_recipients.c.id),
)


Item = NewMessage | AuditEvent | DueReports
"""What the committer writes: a message with its delivery records, an audit
event that rides along in the same transaction (authentication outcomes), or
the reports owed on an envelope."""


def write_batch(conn: Connection, items: Sequence[Item]) -> list[StoredMessage | None]:
    """Write a batch inside the caller's transaction (synchronous form); the
    result for each item is its StoredMessage, None for an audit event, and for
    :class:`DueReports` a StoredMessage of the reported envelope (no placements)
    whose ``reports`` are those written, or None when nothing was owed any more."""
    messages = [item for item in items if isinstance(item, NewMessage)]
    audit_rows = [audit_row(item) for item in items if isinstance(item, AuditEvent)]
    stored = _write_messages(conn, messages, audit_rows) if messages else []
    # A message's reports go in its transaction, unless one of its mailboxes
    # turned out full: those reports would say "delivered" to a recipient that
    # got nothing; the refused rows are marked instead, and the reports on that
    # message come as a DueReports (mssd.delivery.local_reports).
    due: list[tuple[str, tuple[NewMessage, ...]]] = [
        (written.envelope_id, message.reports)
        for message, written in zip(messages, stored, strict=True)
        if message.reports and not written.over_quota
    ]
    owed = [item for item in items if isinstance(item, DueReports)]
    claimed = claim_owed(conn, [item.envelope_id for item in owed]) if owed else set()
    due += [(item.envelope_id, item.reports) for item in owed if item.envelope_id in claimed]
    flat = [report for _, reports in due for report in reports]
    stored_reports = iter(_write_messages(conn, flat, audit_rows) if flat else [])
    with_reports = {
        envelope_id: tuple(next(stored_reports) for _ in reports) for envelope_id, reports in due
    }
    if audit_rows:
        write_audit_rows(conn, audit_rows)
    results: list[StoredMessage | None] = []
    found = iter(stored)
    for item in items:
        if isinstance(item, NewMessage):
            message = next(found)
            reports = with_reports.get(message.envelope_id, ())
            results.append(dataclasses.replace(message, reports=reports) if reports else message)
        elif isinstance(item, DueReports) and item.envelope_id in claimed:
            reports = with_reports.get(item.envelope_id, ())
            results.append(StoredMessage(item.envelope_id, (), reports=reports))
        else:
            results.append(None)
    return results


def _write_messages(
    conn: Connection, batch: Sequence[NewMessage], audit_rows: list[dict[str, Any]]
) -> list[StoredMessage]:
    """Eight statements per batch whatever its size: the blobs, the INBOX folders
    (read and locked, then advanced), the mailboxes' usage counters (the same),
    envelopes, recipients and placements, each as one executemany; the audit rows
    are added to ``audit_rows``. Recipients left to the relay add one more: their
    outbound queue entries (DESIGN.md step 4).
    """
    postgres = conn.dialect.name == "postgresql"
    unique_blobs: dict[str, NewMessage] = {m.sha256: m for m in batch}
    INSERT_BLOB.rows(
        conn,
        [
            {"sha256": sha, "size": len(m.content), "data": m.content, "created_at": m.received_at}
            for sha, m in unique_blobs.items()
        ],
    )
    mailbox_ids = sorted(
        {r.mailbox_id for m in batch for r in m.recipients if r.mailbox_id is not None}
    )
    inbox: dict[int, list[int]] = {}
    if mailbox_ids:
        # PostgreSQL: FOR UPDATE, in folder-id order; SQLite: BEGIN IMMEDIATE already
        # holds the database's write lock.
        query = _SELECT_INBOXES_FOR_UPDATE if postgres else _SELECT_INBOXES
        rows = conn.execute(query, {"mailbox_ids": mailbox_ids}).tuples()
        for folder_id, mailbox_id, uidnext, modseq in rows:
            inbox[mailbox_id] = [folder_id, uidnext, modseq]
    # After the folders (quota.py's lock order): the room left in each mailbox.
    usages = quota.lock(conn, mailbox_ids)
    results: list[StoredMessage] = []
    envelope_rows: list[dict[str, Any]] = []
    recipient_rows: list[dict[str, Any]] = []
    placement_rows: list[dict[str, Any]] = []
    queued_envelopes: list[str] = []
    for message in batch:
        envelope_id = message.envelope_id
        envelope_rows.append(
            {
                "id": envelope_id,
                "blob_sha256": message.sha256,
                "mail_from": message.mail_from,
                "source": message.source,
                "auth_login": message.auth_login,
                "remote": message.remote,
                "dsn_ret": message.dsn_ret,
                "dsn_envid": message.dsn_envid,
                "body": message.body,
                "smtputf8": message.smtputf8,
                "received_at": message.received_at,
            }
        )
        placed: list[Placement] = []
        refused: list[Refusal] = []
        for recipient in message.recipients:
            status = "queued"
            # Our own reports to our own senders are never refused (quota.py says why).
            refusal = (
                None
                if recipient.mailbox_id is None or message.source == "report"
                else usages[recipient.mailbox_id].refusal(len(message.content))
            )
            due = None
            if refusal is not None:
                refused.append(refusal)
                status = "over_quota"
                # Owed from this commit on (module docstring); never to the null sender.
                due = refusal.reason if message.mail_from else None
            elif recipient.mailbox_id is not None:
                state = inbox.get(recipient.mailbox_id)
                if state is None:
                    raise LookupError(f"mailbox {recipient.address} has no INBOX folder")
                usages[recipient.mailbox_id].add(len(message.content))
                folder_id, uid, modseq = state
                state[1], state[2] = uid + 1, modseq + 1
                placement = Placement(recipient.mailbox_id, folder_id, uid, modseq + 1)
                placed.append(placement)
                placement_rows.append(
                    {
                        "folder_id": folder_id,
                        "uid": uid,
                        "blob_sha256": message.sha256,
                        "flags": "",
                        "modseq": placement.modseq,
                        "internal_date": message.received_at,
                        "size": len(message.content),
                    }
                )
                status = "delivered"
            recipient_rows.append(
                {
                    "envelope_id": envelope_id,
                    "address": recipient.address,
                    "mailbox_id": recipient.mailbox_id,
                    "dsn_notify": recipient.dsn_notify,
                    "dsn_orcpt": recipient.dsn_orcpt,
                    "status": status,
                    "report_due": due,
                }
            )
        queued = len(message.recipients) - len(placed) - len(refused)
        if refused and not placed and not queued:
            # RFC 5321 §4.2.2 552: nobody can take it, so nothing is kept.
            raise OverQuota(refused)
        details: dict[str, Any] = {
            "from": message.mail_from,
            "to": [r.address for r in message.recipients],
            "size": len(message.content),
            "sha256": message.sha256,
            "source": message.source,
        }
        if refused:
            details["over_quota"] = [r.address for r in refused]
        audit_rows.append(
            audit_row(
                AuditEvent(
                    actor=message.auth_login or message.mail_from or "<>",
                    action="message.accept",
                    target=envelope_id,
                    remote=message.remote,
                    details=details,
                    at=message.received_at,
                )
            )
        )
        if queued:
            queued_envelopes.append(envelope_id)
        results.append(StoredMessage(envelope_id, tuple(placed), queued, tuple(refused)))
    if inbox:
        conn.execute(
            _ADVANCE_FOLDER,
            [{"folder": f, "next": u, "modseq": m} for f, u, m in inbox.values()],
        )
    quota.save(conn, usages.values())
    conn.execute(_INSERT_ENVELOPE, envelope_rows)
    conn.execute(_INSERT_RECIPIENT, recipient_rows)
    if placement_rows:
        conn.execute(_INSERT_PLACEMENT, placement_rows)
    if queued_envelopes:
        conn.execute(_INSERT_QUEUE, {"envelope_ids": queued_envelopes})
    return results


_Pending = tuple[Item, "asyncio.Future[StoredMessage | None]"]


class GroupCommitter:
    """Commits concurrent deliveries together; see the module docstring.

    It is also an ``AuditSink``: authentication outcomes share the deliveries'
    transactions instead of paying a commit each (a password-guessing client
    cannot make the server fsync once per attempt).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = 128,
        writers: int = 1,
        on_commit: Callable[[Sequence[StoredMessage]], None] | None = None,
    ) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._writers = writers
        self._on_commit = on_commit
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name=f"group-commit-{i}")
                for i in range(self._writers)
            ]

    async def stop(self) -> None:
        """Commit what is queued, then stop the writers."""
        await self._queue.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _submit(self, item: Item) -> StoredMessage | None:
        if not self._tasks:
            raise RuntimeError("the group committer is not running")
        future: asyncio.Future[StoredMessage | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def store(self, message: NewMessage) -> StoredMessage:
        """Returns once the message and its delivery records are committed."""
        stored = await self._submit(message)
        assert stored is not None
        return stored

    async def record(self, event: AuditEvent) -> None:
        """Returns once the audit event is committed."""
        await self._submit(event)

    async def fulfil(self, due: DueReports) -> tuple[StoredMessage, ...] | None:
        """Returns once the reports owed on an envelope are committed, and its marks
        cleared with them: the reports written, or None when none were owed any more
        (made by someone else: nothing was written)."""
        stored = await self._submit(due)
        return None if stored is None else stored.reports

    async def _commit(self, batch: Sequence[_Pending]) -> None:
        items = [item for item, _ in batch]
        # A whole batch is one transaction; on SQLite it runs in one call
        # (``run_write``: on the event loop when small, else on the store's
        # writer thread), not one event-loop round trip per statement. Leaving
        # it without an exception means COMMIT returned.
        messages = [item for item in items if isinstance(item, NewMessage)]
        small = small_write(
            len(items) + sum(len(message.recipients) for message in messages),
            sum(len(message.content) for message in messages),
        )
        results = await run_write(self._engine, lambda conn: write_batch(conn, items), small=small)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
        stored = [s for result in results if result is not None for s in (result, *result.reports)]
        if self._on_commit is not None and stored:
            try:
                self._on_commit(stored)
            except Exception:
                log.exception("change notification failed after commit")

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                try:
                    await self._commit(batch)
                except Exception as error:
                    if len(batch) == 1:
                        raise
                    log.warning("batch of %d failed (%s); retrying one by one", len(batch), error)
                    for pending in batch:
                        try:
                            await self._commit([pending])
                        except Exception as single:
                            if not pending[1].done():
                                pending[1].set_exception(single)
            except Exception as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            finally:
                for _ in batch:
                    self._queue.task_done()
