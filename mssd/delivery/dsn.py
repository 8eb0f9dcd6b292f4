"""Delivery status notifications: RFC 3464 reports, built here and delivered like mail.

:func:`build_report` is pure: values in, the bytes of a ``multipart/report`` out (a French
and English text part from ``templates/dsn.txt.j2``, the ``message/delivery-status`` part,
then the original message or only its header, per RET, RFC 3461 §4.3). :class:`Reporter`
decides whether a report is due and to whom (the sender's INBOX when the sender is ours,
the relay otherwise), and builds the message the store writes in the same transaction
as what caused it.

Invariants:
- A report has the null reverse-path (RFC 3461 §6.2, RFC 5321 §4.5.5), and no report is
  ever made about a message with the null reverse-path: reports never loop.
- NOTIFY is honoured per recipient (RFC 3461 §4.1): NEVER means no report at all; without
  NOTIFY, failures and delays are reported, successes are not.
- A relay to a server that does not offer DSN reports ``relayed`` when SUCCESS was asked
  (RFC 3461 §5.2.2); a relay to one that does leaves the report to that server.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import logging
import quopri
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.header import Header
from pathlib import Path
from typing import Literal

import jinja2

from mssd.store.accounts import StoreAccounts
from mssd.store.delivery import NewMessage, RecipientRecord, new_envelope_id
from mssd.trust.whitelist import Whitelist

log = logging.getLogger(__name__)

Action = Literal["failed", "delayed", "delivered", "relayed"]
_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent.parent / "templates"),
    autoescape=False,  # plain text, never HTML
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)
_SUBJECTS: dict[Action, str] = {
    "failed": "Message non distribué / Undelivered Mail Returned to Sender",
    "delayed": "Remise retardée / Delayed Mail (still being retried)",
    "delivered": "Message distribué / Successful Mail Delivery Report",
    "relayed": "Message relayé / Relayed Mail Report",
}
_MONTHS_FR = (
    "janvier février mars avril mai juin juillet août septembre octobre novembre décembre"
).split()


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block of a report (RFC 3464 §2.3)."""

    final_recipient: str
    action: Action
    status: str
    """RFC 3463 code, e.g. ``5.1.1``."""
    original_recipient: str | None = None
    """The ORCPT parameter as received (``rfc822;`` + xtext)."""
    diagnostic: str | None = None
    """The remote server's reply, e.g. ``550 5.1.1 no such user``."""
    remote_mta: str | None = None
    will_retry_until: dt.datetime | None = None


@dataclass(frozen=True)
class ReportedMessage:
    """What a report says about the message it reports on."""

    envelope_id: str
    mail_from: str
    content: bytes
    arrival: dt.datetime
    dsn_ret: str | None = None
    dsn_envid: str | None = None


def wants_report(notify: str | None, action: Action) -> bool:
    """RFC 3461 §4.1 (see the module docstring)."""
    if notify is None:
        return action in ("failed", "delayed")
    wanted = set(notify.upper().split(","))
    if "NEVER" in wanted:
        return False
    kind = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS", "relayed": "SUCCESS"}
    return kind[action] in wanted


def _header_block(content: bytes) -> bytes:
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[: end + 2]


def _subject(content: bytes) -> str | None:
    # RFC 5322 §2.2.3: a folded field goes on over lines that start with white space.
    match = re.search(
        rb"^subject:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", _header_block(content), re.I | re.M
    )
    if match is None:
        return None
    raw = re.sub(rb"\r?\n", b"", match[1]).decode("utf-8", "replace")
    try:
        decoded = str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError):
        decoded = raw
    return decoded[:200]


def _french_date(moment: dt.datetime) -> str:
    local = moment.astimezone(dt.UTC)
    return f"{local.day} {_MONTHS_FR[local.month - 1]} {local.year} à {local:%H:%M} UTC"


def _lines(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def build_report(
    *,
    reporting_mta: str,
    message: ReportedMessage,
    recipients: Sequence[RecipientStatus],
    moment: dt.datetime | None = None,
) -> bytes:
    """The bytes of an RFC 3464 report on ``message`` to its sender."""
    if not recipients:
        raise ValueError("a report needs at least one recipient")
    moment = moment or dt.datetime.now(dt.UTC)
    action = recipients[0].action
    retry_until = recipients[0].will_retry_until
    text = _TEMPLATES.get_template("dsn.txt.j2").render(
        action=action,
        recipients=recipients,
        reporting_mta=reporting_mta,
        subject=_subject(message.content),
        arrival_fr=_french_date(message.arrival),
        arrival_en=email.utils.format_datetime(message.arrival.astimezone(dt.UTC)),
        retry_until_fr=_french_date(retry_until) if retry_until else "",
        retry_until_en=email.utils.format_datetime(retry_until) if retry_until else "",
    )
    boundary = f"=_mssd_report_{secrets.token_hex(12)}"
    # RFC 3464 §2.2: per-message fields, then one block per recipient.
    status = [f"Reporting-MTA: dns; {reporting_mta}"]
    if message.dsn_envid:
        status.append(f"Original-Envelope-Id: {message.dsn_envid}")
    status.append(f"Arrival-Date: {email.utils.format_datetime(message.arrival)}")
    for r in recipients:
        status.append("")
        if r.original_recipient:
            kind, _, value = r.original_recipient.partition(";")
            status.append(f"Original-Recipient: {kind.strip()}; {value.strip()}")
        status.append(f"Final-Recipient: rfc822; {r.final_recipient}")
        status.append(f"Action: {r.action}")
        status.append(f"Status: {r.status}")
        if r.remote_mta:
            status.append(f"Remote-MTA: dns; {r.remote_mta}")
        if r.diagnostic:
            status.append(f"Diagnostic-Code: smtp; {' '.join(r.diagnostic.split())[:900]}")
        status.append(f"Last-Attempt-Date: {email.utils.format_datetime(moment)}")
        if r.will_retry_until:
            status.append(f"Will-Retry-Until: {email.utils.format_datetime(r.will_retry_until)}")
    full = (message.dsn_ret or "").upper() == "FULL" and action != "delivered"
    original = message.content if full else _header_block(message.content)
    eight_bit = not original.isascii()
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{message.mail_from}>",
        "Subject: " + Header(_SUBJECTS[action], "utf-8").encode(),
        f"Date: {email.utils.format_datetime(moment)}",
        f"Message-ID: <{secrets.token_hex(10)}.report@{reporting_mta}>",
        "MIME-Version: 1.0",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    parts = [
        _lines("\n".join(headers) + "\n\nThis is a MIME-formatted delivery status report.\n"),
        _lines(
            f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: quoted-printable\n\n"
        ),
        _lines(quopri.encodestring(text.encode("utf-8")).decode("ascii")),
        _lines(f"\n--{boundary}\nContent-Type: message/delivery-status\n\n"),
        _lines("\n".join(status) + "\n"),
        _lines(
            f"\n--{boundary}\nContent-Type: "
            + ("message/rfc822" if full else "text/rfc822-headers")
            + ("\nContent-Transfer-Encoding: 8bit" if eight_bit else "")
            + "\n\n"
        ),
        original if original.endswith(b"\r\n") else original + b"\r\n",
        _lines(f"\n--{boundary}--\n"),
    ]
    return b"".join(parts)


class Reporter:
    """Builds reports for the store to write with what causes them.

    A report is written in the transaction that records its cause (the relay's outcome,
    the local delivery), never after it: a crash in between would lose it. So this class
    does not store anything; :meth:`prepare` gives the message to store, and the caller
    writes it with the cause.
    """

    def __init__(
        self,
        accounts: StoreAccounts,
        *,
        hostname: str,
        trust_space: Callable[[], Whitelist | None],
    ) -> None:
        self._accounts = accounts
        self._hostname = hostname
        self._trust_space = trust_space

    async def addressee(self, message: ReportedMessage) -> RecipientRecord | None:
        """Where a report on ``message`` goes: the sender's mailbox when it is ours, the
        relay when its domain is in the trust space; None when no report is due (a
        report about a report) or the sender cannot be reached."""
        if not message.mail_from:
            return None  # RFC 3461 §6.2: never a report about a report.
        sender = message.mail_from
        domain = sender.rpartition("@")[2].lower()
        if domain in await self._accounts.local_domains():
            mailbox = await self._accounts.local_mailbox(sender)
            if mailbox is None or mailbox.status == "closed":
                log.warning("%s: report to <%s> dropped: no such mailbox",
                            message.envelope_id, sender)  # fmt: skip
                return None
            return RecipientRecord(mailbox.address, mailbox.id)
        listed = self._trust_space()
        if listed is None or not listed.has_domain(domain):
            log.warning("%s: report to <%s> dropped: outside the trust space",
                        message.envelope_id, sender)  # fmt: skip
            return None
        return RecipientRecord(sender, None)

    def build(
        self,
        message: ReportedMessage,
        recipients: Sequence[RecipientStatus],
        addressee: RecipientRecord,
    ) -> NewMessage:
        """The report to store (pure: no I/O, so it can be built inside a transaction)."""
        content = build_report(reporting_mta=self._hostname, message=message, recipients=recipients)
        report = NewMessage(
            envelope_id=new_envelope_id(),
            content=content,
            sha256=hashlib.sha256(content).hexdigest(),
            mail_from="",
            recipients=(addressee,),
            source="report",
            remote="127.0.0.1",
            received_at=dt.datetime.now(dt.UTC),
        )
        log.info(
            "%s: %s report for %s is %s",
            message.envelope_id,
            recipients[0].action,
            ", ".join(r.final_recipient for r in recipients),
            report.envelope_id,
        )
        return report

    async def prepare(
        self, message: ReportedMessage, recipients: Sequence[RecipientStatus]
    ) -> NewMessage | None:
        """The report to store with its cause, or None when none is due."""
        if not recipients:
            return None
        addressee = await self.addressee(message)
        return None if addressee is None else self.build(message, recipients, addressee)
