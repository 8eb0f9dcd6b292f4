"""Port 25 trust-space policy: real ``mssd serve``, real TLS client certificates from the
development PKI, a whitelist in the ANS format, on SQLite and PostgreSQL."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    DOMAIN,
    PER,
    PER2,
    MssdProcess,
    PkiBundle,
    inbox,
    require_program,
    run,
    seed,
    start_mssd,
    store_url_for,
    write_whitelist,
)
from test_cli import Cli

from mssd.trust import pki

B = "operateur-b.mssd.test"
B_UNICODE = "hôpital-b.mssd.test"
C = "operateur-c.mssd.test"
LOCAL_IDN = "clinique-ébène.mssd.test"
"""A domain hosted here, created with its U-labels through the command line."""
LOCAL_IDN_A = LOCAL_IDN.encode("idna").decode()
R = "operateur-r.mssd.test"


@dataclass(frozen=True)
class Operators:
    b: pki.IssuedCertificate
    b_other_ou: pki.IssuedCertificate
    """B's CN, another OU: another organisation's certificate."""
    c: pki.IssuedCertificate
    foreign_b: pki.IssuedCertificate
    """B's exact DN, issued by a CA outside the configured IGC-Santé roots."""
    whitelist: Path


def _server_cert(dev: pki.DevPki, host: str, ou: str, org: str, name: str) -> pki.IssuedCertificate:
    return pki.issue_server_certificate(
        dev, common_name=host, idnat_struct=ou, organisation=org, name=name
    )


def _revocable(dev: pki.DevPki, name: str) -> pki.IssuedCertificate:
    return _server_cert(dev, f"mx.{R}", "1750000005", "Operateur R", name)


@pytest.fixture(scope="module")
def operators(test_pki: PkiBundle, tmp_path_factory: pytest.TempPathFactory) -> Operators:
    dev = test_pki.dev
    b = _server_cert(dev, f"mx.{B}", "1750000002", "Operateur B", "inbound-b")
    b_other_ou = _server_cert(dev, f"mx.{B}", "1750000003", "Operateur B", "inbound-b-other-ou")
    c = _server_cert(dev, f"mx.{C}", "1750000004", "Operateur C", "inbound-c")
    foreign = pki.init_dev_pki(tmp_path_factory.mktemp("foreign-pki"))
    foreign_b = _server_cert(foreign, f"mx.{B}", "1750000002", "Operateur B", "impostor")

    # The DNs as ANS writes them: ", " separators, C first in the string, ST= like most.
    def listed(cert: pki.IssuedCertificate) -> str:
        return cert.subject_dn.replace(",", ", ")

    r_dn = f"CN=mx.{R},OU=1750000005,O=Operateur R,C=FR"
    whitelist = write_whitelist(
        tmp_path_factory.mktemp("whitelist") / "listeblanchemssante.xml",
        {B: [listed(b)], B_UNICODE: [listed(b)], C: [listed(c)], R: [r_dn]},
        close_root=False,  # as ANS publishes it
    )
    return Operators(b, b_other_ou, c, foreign_b, whitelist)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    test_pki: PkiBundle,
    operators: Operators,
) -> Iterator[MssdProcess]:
    workdir = tmp_path_factory.mktemp(f"inbound-{request.param}")
    for url in store_url_for(request.param, workdir):
        run(seed(url, test_pki))
        cli = Cli(url, workdir)
        assert f"({LOCAL_IDN_A}) added" in cli.ok("domain", "add", LOCAL_IDN)
        cli.ok(
            "mailbox", "create", "--type", "PER", "--idnat", "899700000001",
            "--address", f"Accueil@{LOCAL_IDN}",
        )  # fmt: skip
        process = start_mssd(
            url,
            test_pki,
            workdir,
            MSSD_WHITELIST_SOURCE=str(operators.whitelist),
            # Operator certificates come from the organisation CA, not the personal one.
            MSSD_TLS_OPERATOR_CA_FILE=str(test_pki.dev.org_ca),
        )
        try:
            yield process
        finally:
            process.stop()


def session(
    server: MssdProcess, cert: pki.IssuedCertificate | tuple[Path, Path] | None
) -> smtplib.SMTP:
    context = ssl.create_default_context(cafile=str(server.pki.dev.ca_bundle))
    if isinstance(cert, pki.IssuedCertificate):
        context.load_cert_chain(str(cert.cert), str(cert.key))
    elif cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    client = smtplib.SMTP("127.0.0.1", server.mta, timeout=30)
    client.ehlo("mx.peer.mssd.test")
    client.starttls(context=context)
    client.ehlo("mx.peer.mssd.test")
    return client


def mail_from(
    server: MssdProcess, cert: pki.IssuedCertificate | tuple[Path, Path] | None, sender: str
) -> tuple[int, str]:
    with session(server, cert) as client:
        code, text = client.docmd("MAIL", f"FROM:<{sender}>")
        return code, text.decode()


def message(subject: str, sender: str) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{PER}>\r\nSubject: {subject}\r\n"
        "Message-ID: <inbound@mssd.test>\r\n\r\nBonjour.\r\n"
    ).encode()


def test_whitelisted_peer_is_accepted(server: MssdProcess, operators: Operators) -> None:
    sender = f"dr.martin@{B}"
    with session(server, operators.b) as client:
        refused = client.sendmail(sender, [PER], message("de B", sender))
    assert refused == {}
    assert any(b"Subject: de B" in content for _, content in inbox(server, PER))


def test_unknown_domain_is_refused(server: MssdProcess, operators: Operators) -> None:
    code, text = mail_from(server, operators.b, "x@inconnu.mssd.test")
    assert code == 550 and text.startswith("5.7.1")
    assert "inconnu.mssd.test is not in the MSSanté whitelist (unknown domain)" in text


def test_dn_not_listed_for_that_domain_is_refused(
    server: MssdProcess, operators: Operators
) -> None:
    code, text = mail_from(server, operators.c, f"x@{B}")
    assert code == 550 and text.startswith("5.7.1")
    assert f"is not listed for domain {B}" in text and "mx.operateur-c.mssd.test" in text
    assert mail_from(server, operators.c, f"x@{C}")[0] == 250


def test_same_cn_with_another_ou_is_refused(server: MssdProcess, operators: Operators) -> None:
    code, text = mail_from(server, operators.b_other_ou, f"x@{B}")
    assert code == 550 and "OU=1750000003" in text and f"not listed for domain {B}" in text


def test_untrusted_chain_never_gets_past_starttls(
    server: MssdProcess, operators: Operators
) -> None:
    # B's exact DN, from another CA: the handshake fails with the unknown_ca alert.
    assert server.log is not None
    with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected)):
        mail_from(server, operators.foreign_b, f"x@{B}")
    for _ in range(50):  # the server logs once its side of the handshake has failed
        if "client certificate not trusted (untrusted chain)" in server.log.read_text():
            break
        time.sleep(0.1)
    assert "client certificate not trusted (untrusted chain)" in server.log.read_text()


def test_certificate_from_a_ca_not_trusted_for_operators_is_refused(
    server: MssdProcess, test_pki: PkiBundle
) -> None:
    # A CPS card chains to the listener's CAs (it logs in on 587) but is no operator.
    code, text = mail_from(server, test_pki.personal, f"x@{B}")
    assert code == 550 and text.startswith("5.7.1")
    assert "(untrusted chain)" in text and "not one of the CAs trusted" in text


def test_revoked_certificate_is_refused(server: MssdProcess, test_pki: PkiBundle) -> None:
    cert = _revocable(test_pki.dev, f"inbound-r-{server.mta}")
    assert mail_from(server, cert, f"x@{R}")[0] == 250
    pki.revoke(test_pki.dev, cert.cert)  # the CRL is re-read: no restart
    code, text = mail_from(server, cert, f"x@{R}")
    assert code == 550 and text.startswith("5.7.1")
    assert "(certificate revoked)" in text and f"serial {int(cert.serial):x}" in text


def test_client_certificate_is_required(server: MssdProcess) -> None:
    code, text = mail_from(server, None, f"x@{B}")
    assert code == 550 and text.startswith("5.7.1")
    assert "client certificate is required" in text


def test_null_sender_from_a_whitelisted_peer(server: MssdProcess, operators: Operators) -> None:
    with session(server, operators.b) as client:
        assert client.docmd("MAIL", "FROM:<>")[0] == 250
        assert client.docmd("RCPT", f"TO:<{PER2}>")[0] == 250
        assert client.data(b"Subject: Delivery Status Notification\r\n\r\nreport\r\n")[0] == 250
    code, text = mail_from(server, operators.b_other_ou, "")
    assert code == 550 and "not listed in the MSSanté whitelist for any domain" in text


def test_unicode_sender_domain_compares_as_idna(server: MssdProcess, operators: Operators) -> None:
    with session(server, operators.b) as client:
        client.command_encoding = "utf-8"  # RFC 6531 §3.2: UTF-8 once SMTPUTF8 is offered
        code, _ = client.docmd("MAIL", f"FROM:<x@{B_UNICODE}> SMTPUTF8")
        assert code == 250
        client.rset()
        a_label = B_UNICODE.encode("idna").decode()
        assert client.docmd("MAIL", f"FROM:<x@{a_label.upper()}>")[0] == 250


def test_local_domains_need_our_own_certificate(
    server: MssdProcess, operators: Operators, test_pki: PkiBundle
) -> None:
    own = (test_pki.dev.server_cert, test_pki.dev.server_key)
    with session(server, own) as client:
        refused = client.sendmail(PER2, [PER], message("interne", PER2))
    assert refused == {}
    code, text = mail_from(server, operators.b, PER2)
    assert code == 550 and f"domain {DOMAIN} is hosted here" in text
    # Our own certificate vouches for our domains only: another operator's domain
    # is checked against the whitelist like anyone's.
    code, text = mail_from(server, own, f"secretariat@{B}")
    assert code == 550
    assert text.startswith(f"5.7.1 <secretariat@{B}>: certificate"), text


def test_an_idn_domain_hosted_here_is_one_domain_however_it_is_written(
    server: MssdProcess, operators: Operators, test_pki: PkiBundle
) -> None:
    own = (test_pki.dev.server_cert, test_pki.dev.server_key)
    with session(server, own) as client:
        client.command_encoding = "utf-8"  # RFC 6531 §3.2
        # Our own certificate vouches for our IDN domain written as an A-label...
        assert client.docmd("MAIL", f"FROM:<secretariat@{LOCAL_IDN_A}>")[0] == 250
        # ...and its mailbox is found under the A-label...
        assert client.docmd("RCPT", f"TO:<ACCUEIL@{LOCAL_IDN_A.upper()}>")[0] == 250
        code, _ = client.data(message("idn", f"secretariat@{LOCAL_IDN_A}"))
        assert code == 250
        # ...and under the U-labels (RFC 6531: with SMTPUTF8).
        assert client.docmd("MAIL", f"FROM:<secretariat@{LOCAL_IDN}> SMTPUTF8")[0] == 250
        assert client.docmd("RCPT", f"TO:<accueil@{LOCAL_IDN}>")[0] == 250
        code, _ = client.data(message("idn-utf8", f"secretariat@{LOCAL_IDN_A}"))
        assert code == 250
    stored = inbox(server, f"accueil@{LOCAL_IDN_A}")
    assert [b"Subject: idn\r\n" in data for _, data in stored] == [True, False]
    assert b"Subject: idn-utf8\r\n" in stored[1][1]
    # Another operator may not send as our IDN domain, in either spelling.
    for domain in (LOCAL_IDN_A, LOCAL_IDN):
        with session(server, operators.b) as client:
            client.command_encoding = "utf-8"
            code, text = client.docmd("MAIL", f"FROM:<x@{domain}> SMTPUTF8")
        assert code == 550 and "is hosted here" in text.decode(), text


def test_without_any_whitelist_every_operator_is_refused(
    store_url: str, tmp_path: Path, test_pki: PkiBundle, operators: Operators
) -> None:
    # No source configured and none ever stored: nobody is in the trust space yet.
    run(seed(store_url, test_pki))
    server = start_mssd(
        store_url,
        test_pki,
        tmp_path,
        MSSD_WHITELIST_SOURCE="",
        MSSD_SMTP_MTA_CLIENT_CA_FILE=str(test_pki.dev.org_ca),
    )
    try:
        code, text = mail_from(server, operators.b, f"x@{B}")
        assert (code, text) == (
            550,
            "5.7.1 No MSSanté whitelist is loaded on this server yet; try again later",
        )
        code, _ = mail_from(server, operators.b, "")
        assert code == 550
        # Our own server still delivers for our own domains: the list need not name it.
        own = (test_pki.dev.server_cert, test_pki.dev.server_key)
        with session(server, own) as client:
            assert client.sendmail(PER2, [PER], message("sans liste", PER2)) == {}
    finally:
        server.stop()


def test_refusals_are_counted_by_reason(test_pki: PkiBundle, operators: Operators) -> None:
    from mssd import metrics
    from mssd.delivery import PolicyRefusal
    from mssd.delivery.pipeline import SessionInfo, Transaction
    from mssd.smtp.inbound import REFUSED, InboundTrustCheck
    from mssd.trust.verify import TrustFiles
    from mssd.trust.whitelist import Whitelist, parse_whitelist

    revoked = _revocable(test_pki.dev, "inbound-counted-revoked")
    pki.revoke(test_pki.dev, revoked.cert)
    listed = parse_whitelist(operators.whitelist.read_bytes())
    whitelist: list[Whitelist | None] = [None]

    async def local_domains() -> frozenset[str]:
        return frozenset({DOMAIN})

    check = InboundTrustCheck(
        whitelist=lambda: whitelist[0],
        trust=TrustFiles(test_pki.dev.org_ca, test_pki.dev.crl),
        local_domains=local_domains,
        own_dn="CN=mx.ours.mssd.test,O=Nous,C=FR",
    )

    def refusal(cert: pki.IssuedCertificate | None, sender: str) -> str:
        der = None if cert is None else ssl.PEM_cert_to_DER_cert(cert.cert.read_text())
        session = SessionInfo("mta", "192.0.2.7", "mx.peer", "TLSv1.3", peer_certificate=der)
        with pytest.raises(PolicyRefusal) as caught:
            run(check.check_sender(Transaction(session, sender)))
        assert (caught.value.code, caught.value.enhanced) == (550, "5.7.1")
        return caught.value.text

    cases = [
        ("no_certificate", None, f"x@{B}", "A client certificate is required"),
        ("untrusted_chain", operators.foreign_b, f"x@{B}", "Client certificate refused"),
        ("revoked", revoked, f"x@{R}", "Client certificate refused (certificate revoked)"),
        ("no_whitelist", operators.b, f"x@{B}", "No MSSanté whitelist is loaded"),
        ("unknown_domain", operators.b, "x@inconnu.mssd.test", "not in the MSSanté whitelist"),
        ("dn_not_listed", operators.b, f"x@{C}", "is not listed for domain"),
        ("dn_not_listed", operators.b, f"x@{DOMAIN}", "is hosted here"),
    ]
    for reason, cert, sender, text in cases:
        if reason == "unknown_domain":
            whitelist[0] = listed
        before = REFUSED.value(reason)
        assert text in refusal(cert, sender)
        assert REFUSED.value(reason) == before + 1, reason
    exported = metrics.render()
    for reason in {case[0] for case in cases}:
        assert f'mssd_mta_senders_refused_total{{reason="{reason}"}}' in exported


def test_swaks_presenting_an_operator_certificate(
    server: MssdProcess, operators: Operators
) -> None:
    swaks = require_program("swaks")
    common = [swaks, "--server", f"127.0.0.1:{server.mta}", "--tls", "--to", PER]
    common += ["--helo", "mx.operateur-b.mssd.test", "--header", "Subject: par swaks"]
    accepted = subprocess.run(
        [*common, "--from", f"secretariat@{B}", "--tls-cert", str(operators.b.cert),
         "--tls-key", str(operators.b.key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert any(b"Subject: par swaks" in content for _, content in inbox(server, PER))
    refused = subprocess.run(
        [*common, "--from", f"secretariat@{B}", "--tls-cert", str(operators.c.cert),
         "--tls-key", str(operators.c.key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0
    assert f"550 5.7.1 <secretariat@{B}>: certificate" in refused.stdout
