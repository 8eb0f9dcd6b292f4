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

from mssd.trust import pki

B = "operateur-b.mssd.test"
B_UNICODE = "hôpital-b.mssd.test"
C = "operateur-c.mssd.test"
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
