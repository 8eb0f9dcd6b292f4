"""Delivery reports (RFC 3464) as a mail client reads them, the NOTIFY rules of RFC 3461,
and the relay's sans-I/O SMTP reply parser."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mssd.delivery.dsn import (
    RecipientStatus,
    ReportedMessage,
    Reporter,
    build_report,
    wants_report,
)
from mssd.smtp.client import ConnectionFailed, Reply, ReplyParser, dot_stuff
from mssd.smtp.outcomes import backoff_seconds
from mssd.smtp.relay import xtext

ORIGINAL = (
    b"From: <docteur@a.mssd.test>\r\nTo: <confrere@b.mssd.test>\r\n"
    b"Subject: =?utf-8?q?R=C3=A9sultats?=\r\nX-MSS-INS: 1234\r\n\r\nCorps du message\r\n"
)
ARRIVAL = dt.datetime(2026, 3, 4, 10, 30, tzinfo=dt.UTC)


def _message(ret: str | None, envid: str | None = "ENV1") -> ReportedMessage:
    return ReportedMessage("E1", "docteur@a.mssd.test", ORIGINAL, ARRIVAL, ret, envid)


def _parse(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=email.policy.default)


def test_failure_report_with_the_full_original() -> None:
    report = build_report(
        reporting_mta="mx.a.mssd.test",
        message=_message("FULL"),
        recipients=[
            RecipientStatus(
                "confrere@b.mssd.test",
                "failed",
                "5.1.1",
                original_recipient="rfc822;confrere@b.mssd.test",
                diagnostic="550 5.1.1 no such user",
                remote_mta="mx.b.mssd.test",
            )
        ],
    )
    parsed = _parse(report)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["To"] == "docteur@a.mssd.test"
    assert "Undelivered" in str(parsed["Subject"]) and "non distribué" in str(parsed["Subject"])
    text, status, original = parsed.iter_parts()
    body = text.get_content()
    assert "n'a pas pu être remis" in body and "could not be delivered" in body
    assert "Résultats" in body and "550 5.1.1 no such user" in body
    assert status.get_content_type() == "message/delivery-status"
    raw = status.as_bytes()
    for field in (
        b"Reporting-MTA: dns; mx.a.mssd.test",
        b"Original-Envelope-Id: ENV1",
        b"Original-Recipient: rfc822; confrere@b.mssd.test",
        b"Final-Recipient: rfc822; confrere@b.mssd.test",
        b"Action: failed",
        b"Status: 5.1.1",
        b"Remote-MTA: dns; mx.b.mssd.test",
        b"Diagnostic-Code: smtp; 550 5.1.1 no such user",
    ):
        assert field in raw
    assert original.get_content_type() == "message/rfc822"
    assert b"Corps du message" in report


@pytest.mark.parametrize(
    ("ret", "action"), [("HDRS", "failed"), (None, "failed"), ("FULL", "delivered")]
)
def test_headers_only_unless_full_was_asked_for_a_failure(ret: str | None, action: str) -> None:
    report = build_report(
        reporting_mta="mx.a.mssd.test",
        message=_message(ret, envid=None),
        recipients=[RecipientStatus("confrere@b.mssd.test", action, "2.0.0")],  # type: ignore[arg-type]
    )
    parts = list(_parse(report).iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"X-MSS-INS: 1234" in report and b"Corps du message" not in report
    assert b"Original-Envelope-Id" not in report


def test_delay_report_says_until_when() -> None:
    until = ARRIVAL + dt.timedelta(days=5)
    report = build_report(
        reporting_mta="mx.a.mssd.test",
        message=_message(None),
        recipients=[RecipientStatus("c@b.mssd.test", "delayed", "4.4.1", will_retry_until=until)],
    )
    text = next(_parse(report).iter_parts()).get_content()
    assert "9 mars 2026" in text and "Mon, 09 Mar 2026" in text
    assert b"Will-Retry-Until: Mon, 09 Mar 2026 10:30:00 +0000" in report


@pytest.mark.parametrize(
    ("notify", "action", "wanted"),
    [
        (None, "failed", True),
        (None, "delayed", True),
        (None, "delivered", False),
        ("NEVER", "failed", False),
        ("SUCCESS", "delivered", True),
        ("SUCCESS", "relayed", True),
        ("FAILURE,SUCCESS", "delayed", False),
        ("DELAY,FAILURE", "delayed", True),
    ],
)
def test_notify_rules(notify: str | None, action: str, wanted: bool) -> None:
    assert wants_report(notify, action) is wanted  # type: ignore[arg-type]


async def test_never_a_report_about_a_report() -> None:
    # RFC 3461 §6.2: a message with the null reverse-path gets no report; nothing else is
    # even consulted.
    reporter = Reporter(None, hostname="mx", trust_space=lambda: None)  # type: ignore[arg-type]
    message = ReportedMessage("E2", "", ORIGINAL, ARRIVAL)
    status = RecipientStatus("x@b.mssd.test", "failed", "5.0.0")
    assert await reporter.prepare(message, [status]) is None


def test_reply_parser_multiline_and_split() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250-mx.b.test\r\n250-PIPE") == []
    [ehlo] = parser.feed(b"LINING\r\n250 DSN\r\n")
    assert ehlo == Reply(250, ("mx.b.test", "PIPELINING", "DSN"))
    [a, b] = parser.feed(b"550 5.1.1 no such user\r\n451 4.3.0 later\r\n")
    assert (a.code, a.enhanced, a.permanent) == (550, "5.1.1", True)
    assert (b.code, b.enhanced, b.permanent, b.positive) == (451, "4.3.0", False, False)
    assert parser.feed(b"354\r\n") == [Reply(354, ("",))]


@pytest.mark.parametrize("bad", [b"hello\r\n", b"250-a\r\n251 b\r\n", b"25x ok\r\n", b"2500\r\n"])
def test_reply_parser_refuses_garbage(bad: bytes) -> None:
    with pytest.raises(ConnectionFailed):
        ReplyParser().feed(bad)


@given(st.binary(max_size=300))
def test_reply_parser_fuzz(data: bytes) -> None:
    parser = ReplyParser()
    try:
        for reply in parser.feed(data):
            assert 200 <= reply.code < 600
    except ConnectionFailed:
        pass


def test_dot_stuffing_and_xtext_and_backoff() -> None:
    assert dot_stuff(b".a\r\nb\r\n.\r\n..c") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"
    assert xtext("a+b=c@d é") == "a+2Bb+3Dc@d+20+C3+A9"
    import random

    from mssd.config import RelaySettings

    settings = RelaySettings(retry_base_seconds=60, retry_max_seconds=600, retry_jitter=0.2)
    rng = random.Random(1)
    waits = [backoff_seconds(n, settings, rng) for n in (1, 2, 3, 4, 5, 9)]
    for wait, nominal in zip(waits, (60, 120, 240, 480, 600, 600), strict=True):
        assert nominal * 0.8 <= wait <= nominal * 1.2


@pytest.mark.parametrize(
    ("header", "subject"),
    [
        (b"Subject: =?utf-8?q?R=C3=A9sultats?=\r\n", "Résultats"),
        # RFC 5322 §2.2.3: unfolded, and no line break of the message left in it.
        (b"Subject: Compte rendu\r\n de biologie\r\n", "Compte rendu de biologie"),
        (b"Subject: Compte rendu\r\n", "Compte rendu"),
    ],
)
def test_the_report_quotes_the_subject_without_line_breaks(header: bytes, subject: str) -> None:
    report = build_report(
        reporting_mta="mx.a.mssd.test",
        message=ReportedMessage(
            "E1", "docteur@a.mssd.test", header + b"X-A: 1\r\n\r\nCorps\r\n", ARRIVAL, None, None
        ),
        recipients=[RecipientStatus("confrere@b.mssd.test", "failed", "5.1.1")],
    )
    text = _parse(report).get_body(("plain",)).get_content()
    assert f"objet « {subject} »." in text
    assert f'subject "{subject}".' in text
