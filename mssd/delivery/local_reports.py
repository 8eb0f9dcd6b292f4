"""Reports on a local delivery that a full mailbox cut short, made at least once.

A recipient passes RCPT; by DATA its mailbox has no room left (``mssd.store.quota``).
The message is placed for the others and the session answers 250, and from then on
the failure must be reported, never dropped (RFC 5321 §6.1). The final delivery MTA
also reports the successes NOTIFY asked for (RFC 3461 §5.2.1).

Why these reports are not written in the message's own transaction, as the success
report of a message that reached everyone is (``DeliveryPipeline._success_report``):
which recipients got the message is known only inside that transaction, and finding
where a report goes (:meth:`Reporter.addressee`) reads the store, which a transaction
on the writer must not wait for; building reports before every commit in case a
mailbox turns out full would add those reads to every message. So:

1. the message's transaction marks each refused row with the refusal's reason
   (``envelope_recipients.report_due``, ``mssd.store.report_dues``): the duty to report
   is durable with the 250;
2. right after the commit the pipeline makes the reports (:func:`make_reports`) and
   writes them as a :class:`~mssd.store.delivery.DueReports`, whose transaction clears
   the marks, and only if they were still there;
3. a crash, a failed write or a cancelled session in between leaves the marks:
   :class:`OwedReports`, run by ``mssd serve`` at start and then every minute, makes
   the reports on every marked envelope (after :data:`RECOVERY_GRACE`, but for the
   round at start).

The success report on such a message is covered by the same marks: it is made with
the failure report, from the same rows, and written in the same transaction. (The one
the pipeline built before the commit named every local recipient; the store drops it
when a mailbox turned out full.)

Invariants:
- nothing is marked, so nothing is reported, when the sender is null: no report is
  ever made about a report (RFC 3461 §6.2, RFC 5321 §6.1);
- a mark is cleared only in the transaction that stores the reports, so a report
  is made at least once; the clearing is a claim (``report_dues.claim_owed``), so it is
  stored at most once, whoever (pipeline, recovery pass, another process) makes it;
- a recovered report says what the pipeline's would have: the reason is in the mark.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd import background
from mssd.delivery.dsn import Action, RecipientStatus, ReportedMessage, Reporter, wants_report
from mssd.store.delivery import DueReports, GroupCommitter, NewMessage, RecipientRecord
from mssd.store.messages import read_blob
from mssd.store.report_dues import OwedEnvelope, owed_envelopes

log = logging.getLogger(__name__)

RECOVERY_INTERVAL = 60.0
"""Seconds between two rounds of the recovery pass."""
RECOVERY_GRACE = 60.0
"""A round after the first leaves alone the envelopes younger than this: their
pipeline is making their reports right now (the claim would let only one of the two
store them, but both would build them)."""
_BATCH = 100


@dataclass(frozen=True)
class LocalOutcome:
    """What became of one local recipient of a message a full mailbox cut short."""

    recipient: RecipientRecord
    refused: str | None
    """Why its mailbox refused the message (``Refusal.reason``); None: delivered."""


def statuses(
    outcomes: Sequence[LocalOutcome], envelope_id: str, hostname: str
) -> dict[Action, list[RecipientStatus]]:
    """The per-recipient blocks of each report due (RFC 3464 §2.3), failures first:
    failures unless NOTIFY says otherwise, successes when it asks (RFC 3461 §4.1)."""
    due: dict[Action, list[RecipientStatus]] = {"failed": [], "delivered": []}
    for outcome in outcomes:
        r, refused = outcome.recipient, outcome.refused
        action: Action = "failed" if refused is not None else "delivered"
        if r.mailbox_id is None or not wants_report(r.dsn_notify, action):
            continue
        due[action].append(
            RecipientStatus(
                final_recipient=r.address,
                action=action,
                # RFC 3463 §3.3: X.2.2 mailbox full.
                status="5.2.2" if refused is not None else "2.0.0",
                original_recipient=r.dsn_orcpt,
                diagnostic=(
                    f"552 5.2.2 <{r.address}>: {refused}"
                    if refused is not None
                    else f"250 2.0.0 delivered to the mailbox as {envelope_id}"
                ),
                remote_mta=hostname,
            )
        )
    return due


async def make_reports(
    reporter: Reporter,
    message: ReportedMessage,
    outcomes: Sequence[LocalOutcome],
    hostname: str,
) -> tuple[NewMessage, ...]:
    """The reports due on ``message`` (none when the sender cannot be reached): one per
    action, since the action titles the report."""
    if not message.mail_from:
        return ()  # RFC 3461 §6.2
    due = [s for s in statuses(outcomes, message.envelope_id, hostname).values() if s]
    if not due:
        return ()
    addressee = await reporter.addressee(message)
    if addressee is None:
        return ()
    return tuple(reporter.build(message, blocks, addressee) for blocks in due)


class OwedReports:
    """The recovery pass: makes the reports a crash or a failed write left owed.

    Every process of ``mssd serve`` may run one: the claim in the reports' transaction
    decides which one stores each report (on PostgreSQL, ``SKIP LOCKED``: none waits).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        committer: GroupCommitter,
        reporter: Reporter,
        *,
        hostname: str,
        interval: float = RECOVERY_INTERVAL,
        grace: float = RECOVERY_GRACE,
    ) -> None:
        self._engine = engine
        self._committer = committer
        self._reporter = reporter
        self._hostname = hostname
        self._interval = interval
        self._grace = grace
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="owed-reports")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await background.cancel(task)

    async def run_once(self, *, grace: float = 0.0) -> int:
        """One round over the envelopes received more than ``grace`` seconds ago that
        still owe reports; returns how many this round reported on."""
        before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=grace)
        made, after = 0, ""
        while True:
            owed = await owed_envelopes(
                self._engine, received_before=before, after=after, limit=_BATCH
            )
            for envelope in owed:
                try:
                    made += await self._recover(envelope)
                except Exception:
                    # Its marks stay: the next round tries again.
                    log.exception("%s: the reports owed on it could not be made",
                                  envelope.envelope_id)  # fmt: skip
            if len(owed) < _BATCH:
                return made
            after = owed[-1].envelope_id

    async def _recover(self, envelope: OwedEnvelope) -> int:
        message = ReportedMessage(
            envelope_id=envelope.envelope_id,
            mail_from=envelope.mail_from,
            content=await read_blob(self._engine, envelope.blob_sha256),
            arrival=envelope.received_at,
            dsn_ret=envelope.dsn_ret,
            dsn_envid=envelope.dsn_envid,
        )
        outcomes = [
            LocalOutcome(
                RecipientRecord(r.address, r.mailbox_id, r.dsn_notify, r.dsn_orcpt), r.report_due
            )
            for r in envelope.recipients
            if r.report_due is not None or r.status == "delivered"
        ]
        reports = await make_reports(self._reporter, message, outcomes, self._hostname)
        written = await self._committer.fulfil(DueReports(envelope.envelope_id, reports))
        if written is None:
            return 0  # made meanwhile by the pipeline or another process
        log.warning("%s: %d report(s) owed since %s made by the recovery pass",
                    envelope.envelope_id, len(written), envelope.received_at)  # fmt: skip
        return 1

    async def _run(self) -> None:
        grace = 0.0  # at start: whatever a crash left, however recent
        while True:
            try:
                await self.run_once(grace=grace)  # each report made is logged
            except Exception:
                # A store outage must not end the schedule; the next round retries.
                log.exception("recovery of owed reports failed")
            grace = self._grace
            await asyncio.sleep(self._interval)
