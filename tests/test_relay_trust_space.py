"""Three operators of a test trust space, each a real ``mssd serve`` with its own domain,
store and server certificate: A and B whitelist each other, C is whitelisted by nobody.
Mail flows A→B and B→A over mutual TLS with delivery reports; A→C is refused at RCPT;
C→A is refused at MAIL; a peer with B's CN and another OU is refused both ways.
On SQLite and PostgreSQL."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MssdProcess, PkiBundle, run, store_url_for
from relay_helpers import (
    Operator,
    make_operator,
    messages,
    queue_entries,
    seed_operator,
    start_operator,
    submission,
    submit,
    wait_for,
    wait_messages,
)

from mssd.delivery.dkim import generate_key
from mssd.trust import pki

MSS_HEADERS = (
    b"X-MSS-NIL: LogicielMetier/4.2\r\n"
    b"X-MSS-CODECDA: 11488-4^^^2.16.840.1.113883.6.1\r\n"
    b"X-MSS-INS: 1234567890123456789^1.2.250.1.213.1.4.10\r\n"
    b"X-MSS-MES: MES-0001\r\n"
)


@dataclass
class Space:
    a: MssdProcess
    b: MssdProcess
    c: MssdProcess
    d: MssdProcess
    op_a: Operator
    op_b: Operator
    op_c: Operator
    b_other_ou: pki.IssuedCertificate


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def space(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[Space]:
    dev = test_pki.dev
    op_a = make_operator(dev, "A", "operateur-a.mssd.test", "1750000011")
    op_b = make_operator(dev, "B", "operateur-b.mssd.test", "1750000012")
    op_c = make_operator(dev, "C", "operateur-c.mssd.test", "1750000013")
    # D: B's host name (CN), another organisation (OU): an impostor for B's domains.
    op_d = make_operator(dev, "D", "operateur-b.mssd.test", "1750000099")
    op_d.domain = "operateur-d.mssd.test"
    op_d_b_alias = Operator("D", "alias-b.mssd.test", op_b.structure, op_b.cert, op_d.mta_port)
    base = tmp_path_factory.mktemp(f"space-{request.param}")
    started: list[MssdProcess] = []
    generators = [store_url_for(request.param, base / name) for name in "abcd"]
    try:
        urls = []
        for name, generator in zip("abcd", generators, strict=True):
            (base / name).mkdir()
            urls.append(next(generator))
        for url, operator in zip(urls, (op_a, op_b, op_c, op_d), strict=True):
            run(seed_operator(url, operator, ("docteur", "secretariat")))
        # A signs with DKIM (key under its var directory); B verifies with A's published
        # record, read from a file instead of DNS.
        _, record = generate_key(base / "a" / "dkim", op_a.domain, "mssd")
        records = base / "b" / "dkim-records.txt"
        records.write_text(f"mssd._domainkey.{op_a.domain} {record}\n")
        # A's list names B's domain and an alias domain of B that A routes to D.
        a = start_operator(
            op_a, urls[0], test_pki, base / "a",
            whitelisted=[op_a, op_b, op_d_b_alias], routes=[op_b, op_c, op_d_b_alias],
        )  # fmt: skip
        started.append(a)
        b = start_operator(
            op_b, urls[1], test_pki, base / "b", whitelisted=[op_a, op_b], routes=[op_a],
            MSSD_DKIM_VERIFY_INBOUND="true", MSSD_DKIM_TXT_RECORDS_FILE=str(records),
        )  # fmt: skip
        started.append(b)
        c = start_operator(
            op_c, urls[2], test_pki, base / "c", whitelisted=[op_a, op_b, op_c], routes=[op_a]
        )
        started.append(c)
        d = start_operator(op_d, urls[3], test_pki, base / "d", whitelisted=[op_d], routes=[])
        started.append(d)
        yield Space(a, b, c, d, op_a, op_b, op_c, op_d.cert)
    finally:
        for server in started:
            server.stop()
        for generator in generators:
            for _ in generator:
                pass


def _body(subject: str, sender: str, to: str) -> bytes:
    return (
        f"From: <{sender}>\nTo: <{to}>\nSubject: {subject}\n".encode()
        + MSS_HEADERS.replace(b"\r\n", b"\n")
        + b"\nCompte rendu de consultation.\n.ligne qui commence par un point\n"
    )


def _report_fields(report: bytes) -> dict[str, str]:
    part = report.split(b"Content-Type: message/delivery-status", 1)[1].split(b"\r\n--", 1)[0]
    return {
        m[1].decode(): m[2].decode() for m in re.finditer(rb"^([A-Za-z-]+): (.*?)\r$", part, re.M)
    }


def _report_text(report: bytes) -> str:
    """The human-readable part of a report (RFC 3464 §2: the first part), decoded."""
    parsed = email.message_from_bytes(report, policy=email.policy.default)
    first = next(part for part in parsed.walk() if part.get_content_type() == "text/plain")
    text = first.get_content()
    assert isinstance(text, str)
    return text


def test_mail_flows_both_ways_with_success_reports(space: Space) -> None:
    a_user, b_user = space.op_a.user(), space.op_b.user()
    code, text = submit(
        space.a,
        a_user,
        [(b_user, "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;" + b_user)],
        _body("A vers B", a_user, b_user),
        "RET=HDRS ENVID=envoi-a-b-1",
    )
    assert code == 250, text
    [received] = wait_messages(space.b, b_user, 1)
    # The MSSanté fields pass through untouched, and dot-stuffing round-trips.
    assert MSS_HEADERS in received
    assert b"\r\n.ligne qui commence par un point\r\n" in received
    assert f"by {space.op_b.host}".encode() in received  # B's Received field
    head = received.split(b"\r\n\r\n")[0]
    assert b"TLS" in head
    # A signed, B verified against the published key (RFC 6376, RFC 8601).
    assert (
        f"Authentication-Results: {space.op_b.host}; dkim=pass header.d={space.op_a.domain} "
        "header.s=mssd"
    ).encode() in head
    assert head.index(b"Received:") < head.index(b"Authentication-Results:")
    assert b"DKIM-Signature: " in head
    # B delivered with NOTIFY=SUCCESS: its report travels back B→A with the null sender.
    [report] = wait_messages(space.a, a_user, 1)
    assert b"multipart/report; report-type=delivery-status" in report
    fields = _report_fields(report)
    assert fields["Action"] == "delivered" and fields["Status"] == "2.0.0"
    assert fields["Original-Envelope-Id"] == "envoi-a-b-1"
    assert fields["Final-Recipient"] == f"rfc822; {b_user}"
    assert fields["Original-Recipient"] == f"rfc822; {b_user}"
    assert fields["Reporting-MTA"] == f"dns; {space.op_b.host}"
    assert b"text/rfc822-headers" in report and b"Compte rendu" not in report  # RET=HDRS
    assert "Votre message a été remis dans la boîte aux lettres de" in _report_text(report)
    # And the other way, from B's secretariat to A, with a report too.
    b_sec = space.op_b.user("secretariat")
    code, _ = submit(space.b, b_sec, [(a_user, "NOTIFY=SUCCESS")], _body("B vers A", b_sec, a_user))
    assert code == 250
    wait_for(lambda: any(b"B vers A" in m for m in messages(space.a, a_user)), what="B->A message")
    [report_b] = wait_messages(space.b, b_sec, 1)
    assert _report_fields(report_b)["Action"] == "delivered"
    assert not queue_entries(space.a) and not queue_entries(space.b)


def test_a_refusal_by_the_peer_gives_exactly_one_failure_report(space: Space) -> None:
    a_user = space.op_a.user("secretariat")
    nobody = f"personne@{space.op_b.domain}"
    code, _ = submit(space.a, a_user, [(nobody, "")], _body("inconnu", a_user, nobody))
    assert code == 250
    [report] = wait_messages(space.a, a_user, 1)
    fields = _report_fields(report)
    assert fields["Action"] == "failed" and fields["Status"] == "5.1.1"
    assert "550 5.1.1" in fields["Diagnostic-Code"]
    [failed] = [e for e in queue_entries(space.a, ("failed",)) if e.address == nobody]
    assert failed.attempts == 1
    time.sleep(1.5)  # several relay rounds: no second report comes
    assert len(messages(space.a, a_user)) == 1


def test_a_domain_outside_the_trust_space_is_refused_at_rcpt(space: Space) -> None:
    with submission(space.a, space.op_a.user()) as client:
        assert client.docmd("MAIL", f"FROM:<{space.op_a.user()}>")[0] == 250
        code, text = client.docmd("RCPT", f"TO:<{space.op_c.user()}>")
        assert (code, text) == (
            550,
            f"5.7.1 <{space.op_c.user()}>: recipient domain is outside the MSSanté trust "
            "space".encode(),
        )


def _peer(server: MssdProcess, cert: pki.IssuedCertificate) -> smtplib.SMTP:
    context = ssl.create_default_context(cafile=str(server.pki.dev.ca_bundle))
    context.check_hostname = False
    context.load_cert_chain(str(cert.cert), str(cert.key))
    client = smtplib.SMTP("127.0.0.1", server.mta, timeout=30)
    client.starttls(context=context)
    client.ehlo("peer.mssd.test")
    return client


def test_an_operator_outside_the_list_is_refused_at_mail(space: Space) -> None:
    with _peer(space.a, space.op_c.cert) as client:
        code, text = client.docmd("MAIL", f"FROM:<{space.op_c.user()}>")
        assert code == 550 and text.startswith(b"5.7.1") and b"not in the MSSant" in text
    # Through C's own relay: A refuses, C's sender gets a failure report.
    c_user, a_user = space.op_c.user(), space.op_a.user()
    code, _ = submit(space.c, c_user, [(a_user, "")], _body("C vers A", c_user, a_user))
    assert code == 250
    [report] = wait_messages(space.c, c_user, 1)
    fields = _report_fields(report)
    assert fields["Action"] == "failed" and fields["Status"] == "5.7.1"
    assert not any(b"C vers A" in m for m in messages(space.a, a_user))


def test_b_common_name_with_another_ou_is_refused_both_ways(space: Space) -> None:
    with _peer(space.a, space.b_other_ou) as client:
        code, text = client.docmd("MAIL", f"FROM:<{space.op_b.user()}>")
        assert code == 550 and text.startswith(b"5.7.1") and b"is not listed for" in text
    # Outbound: A routes the alias domain to D, which shows B's CN with another OU.
    a_user, target = space.op_a.user("secretariat"), "docteur@alias-b.mssd.test"
    code, _ = submit(space.a, a_user, [(target, "NOTIFY=NEVER")], _body("alias", a_user, target))
    assert code == 250

    def deferred() -> object:
        found = [e for e in queue_entries(space.a) if e.address == target and e.last_error]
        return found and found[0]

    entry = wait_for(deferred, what="a deferral of the alias domain")
    assert entry.state in ("queued", "sending")
    assert "OU=1750000099" in entry.last_error and "does not list" in entry.last_error
    assert str(space.op_b.structure) not in entry.last_error.split("presented certificate")[1]


def test_queue_cli_shows_a_deferral_reason(space: Space, tmp_path: Path) -> None:
    from test_cli import Cli

    listing = Cli(space.a.url, tmp_path).ok("queue", "list")
    assert "alias-b.mssd.test" in listing and "does not list" in listing
