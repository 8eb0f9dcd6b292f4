"""What became of each relayed recipient, recorded in the queue with the reports it causes.

The relay (``mssd.smtp.relay``) judges the peer's replies into :class:`Result` values and
hands them to a :class:`Recorder`; :class:`OutcomeWriter` turns them into queue outcomes
(delivered, failed, or deferred with backoff) and delivery reports, and writes both in
one transaction (``mssd.store.queue.record``).

Invariants:
- A report is written in the transaction that records the outcome causing it, never
  after: a crash in between cannot lose it, and an outcome that cannot be written with
  its report is not written at all (the entry comes back after its lease).
- A deferral past ``relay.give_up_seconds`` fails (RFC 5321 §4.5.4.1); a delay report is
  made once, after ``relay.delay_report_seconds``; reports follow NOTIFY (RFC 3461 §4.1).
- Nothing here talks to a peer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd import metrics
from mssd.config import RelaySettings
from mssd.delivery.dsn import Action, RecipientStatus, ReportedMessage, Reporter, wants_report
from mssd.store import queue
from mssd.store.delivery import NewMessage, RecipientRecord, StoredMessage
from mssd.store.queue import Outcome, QueueEntry

log = logging.getLogger(__name__)

RELAYED = metrics.counter(
    "mssd_relay_recipients_total", "Queue entries relayed, by outcome", ("outcome",)
)


def backoff_seconds(attempts: int, settings: RelaySettings, rng: random.Random) -> float:
    """Wait after the ``attempts``-th failed attempt: doubling from the base, capped,
    with jitter so that deferred messages do not all come back at the same instant."""
    base = min(settings.retry_max_seconds, settings.retry_base_seconds * 2 ** max(0, attempts - 1))
    jitter = settings.retry_jitter
    return float(base * rng.uniform(1.0 - jitter, 1.0 + jitter))


@dataclass
class Result:
    """Per-entry outcome of one attempt before it is recorded."""

    entry: QueueEntry
    kind: str  # "delivered", "deferred", "failed"
    reply: str
    status: str
    remote: str | None = None
    relayed: bool = False
    """Delivered to a peer that does not offer DSN (RFC 3461 §5.2.2)."""


def all_results(entries: Sequence[QueueEntry], kind: str, reason: str, status: str) -> list[Result]:
    return [Result(e, kind, reason, status) for e in entries]


class Recorder:
    """Records outcomes as soon as the peer has answered, while the next message is sent.

    One record transaction at a time, each taking every outcome that arrived meanwhile (a
    group commit), so the store's commit latency does not slow the conversation down.

    Why as soon as possible: this is the only place where the relay loses track of a
    message it handed over. Responsibility passes to the peer with its 250 after the data
    (RFC 5321 §6.1); if this process dies after that 250 and before the "delivered"
    record commits, the entry is still ``sending`` and is claimed again when its lease
    ends, so the peer receives the message twice. SMTP cannot do better: the peer's 250
    and our record cannot be made atomic, and a sender that waited for some further
    acknowledgement would only move the window (the "duplicate messages" problem of
    RFC 1047). Delivery is therefore at least once; RFC 5321 §6.1 prefers a duplicate to
    a loss. Recording each outcome at once bounds the duplicates after a crash to the
    messages accepted during the last record transaction and the one in the pipe, instead
    of a whole claimed batch; the hard bound stays ``relay.batch_size`` (what one worker
    may hold unrecorded), and ``tests/test_relay_outage.py`` counts them after a SIGKILL.
    """

    def __init__(self, record: Callable[[list[Result]], Awaitable[None]]) -> None:
        self._record = record
        self._waiting: list[Result] = []
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self.handed: set[int] = set()
        """Ids of the entries whose outcome was handed over (recorded or not)."""
        self.done: set[int] = set()
        """Ids of the entries whose outcome is recorded."""

    @property
    def failed(self) -> bool:
        """Recording failed: nothing more may be sent, its outcome could not be kept."""
        return self._error is not None

    def add(self, results: list[Result]) -> None:
        self._waiting += results
        self.handed.update(r.entry.id for r in results)
        if self._error is None and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self._record(batch)
            except Exception as error:
                # These entries stay claimed until their lease ends, as after a crash (the
                # peer may hold them already); ``close`` raises.
                self._error = error
                log.error("relay: recording outcomes failed (%s); sending stops", error)
                return
            self.done.update(r.entry.id for r in batch)

    async def close(self) -> None:
        """Wait until everything handed over is recorded; raise if recording failed."""
        if self._task is not None:
            await self._task
        if self._error is not None:
            raise self._error


@dataclass
class _Report:
    """One report to make: about one envelope, one action, for some of its recipients."""

    message: ReportedMessage
    addressee: RecipientRecord
    recipients: list[tuple[int, RecipientStatus]]
    """(queue entry id, what the report says about it)."""


class OutcomeWriter:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: RelaySettings,
        *,
        reporter: Reporter | None,
        on_stored: Callable[[Sequence[StoredMessage]], None] | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._reporter = reporter
        self._on_stored = on_stored
        self._rng = random.Random()

    async def record(self, results: list[Result]) -> None:
        """Record ``results`` and the reports they cause, in one transaction."""
        now = dt.datetime.now(dt.UTC)
        outcomes: list[Outcome] = []
        due: dict[tuple[str, Action], list[tuple[Result, RecipientStatus]]] = defaultdict(list)
        give_up = dt.timedelta(seconds=self._settings.give_up_seconds)
        for r in results:
            entry, token = r.entry, r.entry.claim_token or ""
            if r.kind == "deferred" and now - entry.created_at >= give_up:
                r = Result(entry, "failed", f"gave up after {entry.attempts} attempts over "
                           f"{give_up}: {r.reply}", "4.4.7", r.remote)  # fmt: skip
            if r.kind == "delivered":
                outcomes.append(Outcome(entry.id, token, "delivered", r.reply, r.remote))
                if r.relayed and wants_report(entry.dsn_notify, "relayed"):
                    due[(entry.envelope_id, "relayed")].append((r, self._status(r, "relayed")))
            elif r.kind == "failed":
                outcomes.append(Outcome(entry.id, token, "failed", r.reply, r.remote))
                if wants_report(entry.dsn_notify, "failed"):
                    due[(entry.envelope_id, "failed")].append((r, self._status(r, "failed")))
            else:
                wait = backoff_seconds(entry.attempts, self._settings, self._rng)
                later = now + dt.timedelta(seconds=wait)
                delay_due = (
                    not entry.delay_reported
                    and now - entry.created_at
                    >= dt.timedelta(seconds=self._settings.delay_report_seconds)
                    and wants_report(entry.dsn_notify, "delayed")
                )
                outcomes.append(
                    Outcome(entry.id, token, "queued", r.reply, r.remote, later, delay_due)
                )
                if delay_due:
                    status = self._status(r, "delayed", until=entry.created_at + give_up)
                    due[(entry.envelope_id, "delayed")].append((r, status))
        reports = await self._reports(due)
        recorded = await queue.record(
            self._engine, outcomes, lambda updated: self._build(reports, updated)
        )
        for outcome, r in zip(outcomes, results, strict=True):
            if outcome.entry_id in recorded.updated:
                self._log(outcome, r.entry)
        if recorded.reports and self._on_stored is not None:
            self._on_stored(recorded.reports)

    async def _reports(
        self, due: dict[tuple[str, Action], list[tuple[Result, RecipientStatus]]]
    ) -> list[_Report]:
        """What each report needs from the store, read before the record transaction."""
        if self._reporter is None:
            return []
        reports: list[_Report] = []
        contents: dict[str, bytes] = {}
        for items in due.values():
            entry = items[0][0].entry
            if entry.blob_sha256 not in contents:
                contents[entry.blob_sha256] = await queue.read_content(
                    self._engine, entry.blob_sha256
                )
            message = ReportedMessage(
                envelope_id=entry.envelope_id,
                mail_from=entry.mail_from,
                content=contents[entry.blob_sha256],
                arrival=entry.created_at,
                dsn_ret=entry.dsn_ret,
                dsn_envid=entry.dsn_envid,
            )
            addressee = await self._reporter.addressee(message)
            if addressee is not None:
                reports.append(_Report(message, addressee, [(r.entry.id, s) for r, s in items]))
        return reports

    def _build(self, reports: list[_Report], updated: set[int]) -> list[NewMessage]:
        """Inside the record transaction: the reports on the outcomes recorded."""
        made: list[NewMessage] = []
        for report in reports:
            kept = [status for entry_id, status in report.recipients if entry_id in updated]
            if kept and self._reporter is not None:
                made.append(self._reporter.build(report.message, kept, report.addressee))
        return made

    def _log(self, outcome: Outcome, entry: QueueEntry) -> None:
        if outcome.state == "delivered":
            RELAYED.inc("delivered")
            log.info("%s relayed to <%s> via %s: %s", entry.envelope_id, entry.address,
                     outcome.remote_mta, outcome.error)  # fmt: skip
        elif outcome.state == "failed":
            RELAYED.inc("failed")
            log.warning("%s to <%s> failed: %s", entry.envelope_id, entry.address, outcome.error)
        else:
            RELAYED.inc("deferred")
            log.info("%s to <%s> deferred until %s: %s", entry.envelope_id, entry.address,
                     outcome.next_attempt_at, outcome.error)  # fmt: skip

    def _status(
        self, r: Result, action: Action, *, until: dt.datetime | None = None
    ) -> RecipientStatus:
        return RecipientStatus(
            final_recipient=r.entry.address,
            action=action,
            status=r.status if action != "relayed" else "2.0.0",
            original_recipient=r.entry.dsn_orcpt,
            diagnostic=r.reply,
            remote_mta=r.remote,
            will_retry_until=until,
        )
