"""Submission (587 STARTTLS, 465 implicit TLS): authentication, sender rights,
recipient states, extensions, and what ends up in the store."""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess

import pytest
from conftest import (
    APP,
    CLOSED,
    ORG,
    PASSWORD,
    PER,
    PER2,
    SUSPENDED,
    MssdProcess,
    inbox,
    require_program,
    run,
)
from store_faults import allow, refuse

from mssd.store.audit import read_audit
from mssd.store.engine import create_engine


async def _audit(url: str, prefix: str) -> list[object]:
    engine = create_engine(url)
    try:
        return list(await read_audit(engine, action_prefix=prefix, limit=200))
    finally:
        await engine.dispose()


def message(subject: str, sender: str = PER, extra: bytes = b"") -> bytes:
    return (
        f"From: <{sender}>\r\nSubject: {subject}\r\n".encode()
        + extra
        + b"\r\nCorps du message.\r\n"
    )


def test_submission_delivers_to_local_inbox_with_trace(mssd: MssdProcess) -> None:
    before = len(inbox(mssd, PER2))
    with mssd.smtp() as client:
        assert client.sendmail(PER, [PER2], message("compte rendu")) == {}
    messages = inbox(mssd, PER2)
    assert len(messages) == before + 1
    uid, content = messages[-1]
    assert uid == messages[-2][0] + 1 if before else uid == 1
    assert content.startswith(b"Received: from client.mssd.test ([127.0.0.1])")
    assert b"with ESMTPSA id " in content
    assert f"for <{PER2}>;".encode() in content
    assert content.endswith(b"\r\nCorps du message.\r\n")


def test_one_blob_however_many_recipients(mssd: MssdProcess) -> None:
    subject = "deux destinataires"
    with mssd.smtp() as client:
        client.sendmail(PER, [PER2, ORG], message(subject))
    first = [c for _, c in inbox(mssd, PER2) if subject.encode() in c]
    second = [c for _, c in inbox(mssd, ORG) if subject.encode() in c]
    assert len(first) == len(second) == 1
    assert first[0] == second[0]
    assert b"\tfor <" not in first[0]  # several recipients: none is named in the trace

    async def blob_count() -> int:
        from sqlalchemy import func, select

        from mssd.store.schema import blobs

        engine = create_engine(mssd.url)
        try:
            async with engine.connect() as conn:
                import hashlib

                digest = hashlib.sha256(first[0]).hexdigest()
                return int(
                    await conn.scalar(
                        select(func.count()).select_from(blobs).where(blobs.c.sha256 == digest)
                    )
                    or 0
                )
        finally:
            await engine.dispose()

    assert run(blob_count()) == 1


def test_implicit_tls_port_465(mssd: MssdProcess) -> None:
    context = mssd.pki.client_context()
    with smtplib.SMTP_SSL("127.0.0.1", mssd.submissions, context=context, timeout=30) as client:
        code, features = client.ehlo("client.mssd.test")
        assert code == 250
        assert b"STARTTLS" not in features  # already encrypted
        assert b"AUTH " in features
        client.login(PER, PASSWORD)
        assert client.sendmail(PER, [PER2], message("via 465")) == {}
    assert any(b"via 465" in c for _, c in inbox(mssd, PER2))


def test_ehlo_advertises_extensions(mssd: MssdProcess) -> None:
    with smtplib.SMTP("127.0.0.1", mssd.submission, timeout=30) as client:
        client.ehlo("client.mssd.test")
        for extension in (
            "pipelining",
            "8bitmime",
            "smtputf8",
            "enhancedstatuscodes",
            "dsn",
            "starttls",
        ):
            assert client.has_extn(extension), extension
        assert client.esmtp_features["size"] == str(25 * 1024 * 1024)
        assert not client.has_extn("auth")  # no AUTH offered before TLS
        client.starttls(context=mssd.pki.client_context())
        client.ehlo("client.mssd.test")
        assert set(client.esmtp_features["auth"].split()) >= {"PLAIN", "LOGIN"}
        assert not client.has_extn("starttls")


def test_mail_before_starttls_is_refused(mssd: MssdProcess) -> None:
    with smtplib.SMTP("127.0.0.1", mssd.submission, timeout=30) as client:
        client.ehlo("client.mssd.test")
        code, text = client.docmd("AUTH", "PLAIN AGZvbwBiYXI=")
        assert (code, text[:5]) == (530, b"5.7.0")
        code, text = client.docmd("MAIL", f"FROM:<{PER}>")
        assert (code, text[:5]) == (530, b"5.7.0")


def test_authentication_required_before_mail(mssd: MssdProcess) -> None:
    with mssd.smtp(login=None) as client:
        code, text = client.docmd("MAIL", f"FROM:<{PER}>")
        assert (code, text) == (530, b"5.7.0 Authentication required")


def test_wrong_password_is_refused_and_audited(mssd: MssdProcess) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        mssd.smtp(login=PER2, password="not the password")
    assert refused.value.smtp_code == 535
    assert refused.value.smtp_error.startswith(b"5.7.8")
    events = run(_audit(mssd.url, "auth.failure"))
    assert any(e.target == PER2 and e.result == "bad-credentials" for e in events)  # type: ignore[attr-defined]
    assert all("not the password" not in repr(e) for e in events)


def test_success_is_audited(mssd: MssdProcess) -> None:
    mssd.smtp().quit()
    events = run(_audit(mssd.url, "auth.success"))
    assert any(e.target == PER and e.remote == "127.0.0.1" for e in events)  # type: ignore[attr-defined]


def test_mail_from_must_be_an_address_the_account_may_use(mssd: MssdProcess) -> None:
    with mssd.smtp(login=PER2) as client:
        code, text = client.docmd("MAIL", f"FROM:<{PER}>")
        assert code == 550 and text.startswith(b"5.7.1 ")
        assert PER.encode() in text and b"may not send as" in text
        # PER2 is delegated on the ORG mailbox without the right to send.
        code, text = client.docmd("MAIL", f"FROM:<{ORG}>")
        assert code == 550 and text.startswith(b"5.7.1 ")
        code, _ = client.docmd("MAIL", f"FROM:<{PER2}>")
        assert code == 250


def test_delegate_sends_as_org_mailbox(mssd: MssdProcess) -> None:
    with mssd.smtp(login=PER) as client:
        assert client.sendmail(ORG, [PER2], message("de la part de l'accueil", sender=ORG)) == {}


def test_null_sender_is_refused_on_submission(mssd: MssdProcess) -> None:
    with mssd.smtp() as client:
        code, text = client.docmd("MAIL", "FROM:<>")
        assert code == 550 and text.startswith(b"5.7.1")


def test_recipient_states(mssd: MssdProcess) -> None:
    with mssd.smtp() as client:
        assert client.docmd("MAIL", f"FROM:<{PER}>")[0] == 250
        code, text = client.docmd("RCPT", f"TO:<nobody@{PER.split('@')[1]}>")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = client.docmd("RCPT", f"TO:<{SUSPENDED}>")
        assert (code, text[:5]) == (450, b"4.2.1")
        code, text = client.docmd("RCPT", f"TO:<{CLOSED}>")
        assert (code, text[:5]) == (550, b"5.2.1")
        code, text = client.docmd("RCPT", "TO:<someone@other-operator.mssante.fr>")
        assert (code, text[:5]) == (550, b"5.7.1")
        assert client.docmd("RCPT", f"TO:<{PER2}>") == (250, b"2.1.5 Recipient OK")
        code, text = client.docmd("RCPT", f"TO:<{PER2.upper()}>")
        assert code == 250 and b"already" in text


def test_size_is_enforced_at_mail(mssd: MssdProcess) -> None:
    with mssd.smtp() as client:
        code, text = client.docmd("MAIL", f"FROM:<{PER}> SIZE={25 * 1024 * 1024 + 1}")
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.docmd("MAIL", f"FROM:<{PER}> SIZE=1000")[0] == 250


def test_dsn_parameters_are_accepted_and_stored(mssd: MssdProcess) -> None:
    with mssd.smtp() as client:
        client.sendmail(
            PER,
            [PER2],
            message("avec DSN"),
            mail_options=["RET=HDRS", "ENVID=QQ+2B123"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;" + PER2],
        )
        code, text = client.docmd("MAIL", f"FROM:<{PER}> RET=BOTH")
        assert (code, text[:5]) == (501, b"5.5.4")
        client.rset()
        client.docmd("MAIL", f"FROM:<{PER}>")
        code, text = client.docmd("RCPT", f"TO:<{PER2}> NOTIFY=NEVER,SUCCESS")
        assert (code, text[:5]) == (501, b"5.5.4")

    async def stored() -> tuple[object, ...]:
        from sqlalchemy import select

        from mssd.store.schema import envelope_recipients, envelopes

        engine = create_engine(mssd.url)
        try:
            async with engine.connect() as conn:
                row = (
                    await conn.execute(
                        select(
                            envelopes.c.dsn_ret,
                            envelopes.c.dsn_envid,
                            envelope_recipients.c.dsn_notify,
                            envelope_recipients.c.dsn_orcpt,
                        )
                        .join(envelope_recipients)
                        .where(envelopes.c.dsn_envid == "QQ+2B123")
                    )
                ).one()
                return tuple(row)
        finally:
            await engine.dispose()

    assert run(stored()) == ("HDRS", "QQ+2B123", "FAILURE,SUCCESS", "rfc822;" + PER2)


def test_a_success_report_is_committed_with_the_delivery(mssd: MssdProcess) -> None:
    """RFC 3461 §5.2.1: the report mssd makes for NOTIFY=SUCCESS is written in the
    delivery's own transaction: if it cannot be stored, neither is the message (and the
    client is told to try again); once it can, both are there when the 250 comes."""
    before = (len(inbox(mssd, PER)), len(inbox(mssd, PER2)))

    def send(subject: str) -> tuple[int, bytes]:
        with mssd.smtp() as client:
            client.mail(PER, ["ENVID=succes-local"])
            client.rcpt(PER2, ["NOTIFY=SUCCESS"])
            return client.data(message(subject))

    # Reports have the null sender (RFC 3461 §6.2): the store refuses them.
    run(refuse(mssd.url, "refuse_report", "envelopes", "INSERT", "NEW.mail_from = ''"))
    try:
        code, text = send("sans accuse")
    finally:
        run(allow(mssd.url, "refuse_report", "envelopes"))
    assert (code, text[:5]) == (451, b"4.3.0")
    assert (len(inbox(mssd, PER)), len(inbox(mssd, PER2))) == before
    code, text = send("avec accuse")
    assert code == 250
    queued_as = text.decode().rpartition(" ")[2]
    assert len(inbox(mssd, PER2)) == before[1] + 1
    reports = inbox(mssd, PER)[before[0] :]
    assert len(reports) == 1
    report = reports[0][1]
    assert b"Action: delivered" in report and f"Final-Recipient: rfc822; {PER2}".encode() in report
    assert b"Original-Envelope-Id: succes-local" in report
    assert f"delivered to the mailbox as {queued_as}".encode() in report


def test_message_id_and_date_are_added_only_when_missing(mssd: MssdProcess) -> None:
    with mssd.smtp() as client:
        client.sendmail(PER, [PER2], b"Subject: sans en-tetes\r\n\r\ncorps\r\n")
        client.sendmail(
            PER,
            [PER2],
            b"Subject: avec en-tetes\r\nDate: Mon, 2 Nov 2026 10:00:00 +0100\r\n"
            b"Message-ID: <unique@client.mssd.test>\r\n\r\ncorps\r\n",
        )
    contents = [c for _, c in inbox(mssd, PER2)]
    without = next(c for c in contents if b"sans en-tetes" in c)
    with_headers = next(c for c in contents if b"avec en-tetes" in c)
    assert without.count(b"\r\nMessage-ID: <") == 1 and b"@localhost>" in without
    assert without.count(b"\r\nDate: ") == 1
    assert with_headers.count(b"Message-ID:") == 1 and b"<unique@client.mssd.test>" in with_headers
    assert with_headers.count(b"Date:") == 1


def test_smtputf8_and_8bitmime_message(mssd: MssdProcess) -> None:
    body = "Subject: résultats d'analyse\r\n\r\nGlycémie à jeun : normale.\r\n".encode()
    with mssd.smtp() as client:
        client.sendmail(PER, [PER2], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    stored = [c for _, c in inbox(mssd, PER2) if "Glycémie".encode() in c]
    assert stored and stored[0].endswith(body) and b"with UTF8SMTPSA" in stored[0]


def test_accepted_message_is_audited_without_content(mssd: MssdProcess) -> None:
    with mssd.smtp() as client:
        client.sendmail(PER, [PER2], message("audit secret-body-token"))
    events = run(_audit(mssd.url, "message.accept"))
    event = next(e for e in events if e.details["from"] == PER)  # type: ignore[attr-defined]
    assert event.details["to"] == [PER2]  # type: ignore[attr-defined]
    assert event.details["size"] > 0 and len(event.details["sha256"]) == 64  # type: ignore[attr-defined]
    assert all("secret-body-token" not in repr(e) for e in events)


def test_client_certificate_external_as_professional(mssd: MssdProcess) -> None:
    """A CPS-style certificate (CN = idNat_PS) logs in as its professional."""
    with smtplib.SMTP("127.0.0.1", mssd.submission, timeout=30) as client:
        client.starttls(context=mssd.pki.client_context(mssd.pki.personal))
        client.ehlo("client.mssd.test")
        assert "EXTERNAL" in client.esmtp_features["auth"].split()
        assert client.docmd("AUTH", "EXTERNAL =") == (235, b"2.7.0 Authentication successful")
        assert client.sendmail(PER, [PER2], message("par carte CPS")) == {}


def test_app_certificate_may_only_send_as_its_app_mailbox(mssd: MssdProcess) -> None:
    with smtplib.SMTP("127.0.0.1", mssd.submission, timeout=30) as client:
        client.starttls(context=mssd.pki.client_context(mssd.pki.app))
        client.ehlo("labo.hopital.mssd.test")
        assert client.docmd("AUTH", "EXTERNAL =")[0] == 235
        code, text = client.docmd("MAIL", f"FROM:<{PER}>")
        assert code == 550 and text.startswith(b"5.7.1")
        code, text = client.docmd("MAIL", f"FROM:<{ORG}>")
        assert code == 550 and text.startswith(b"5.7.1")
        assert client.docmd("MAIL", f"FROM:<{APP}>")[0] == 250
        assert client.docmd("RCPT", f"TO:<{PER}>")[0] == 250
        assert client.data(message("résultat", sender=APP))[0] == 250


def test_unknown_certificate_cannot_log_in(mssd: MssdProcess) -> None:
    with smtplib.SMTP("127.0.0.1", mssd.submission, timeout=30) as client:
        client.starttls(context=mssd.pki.client_context(mssd.pki.stranger))
        client.ehlo("client.mssd.test")
        code, text = client.docmd("AUTH", "EXTERNAL =")
        assert (code, text[:5]) == (535, b"5.7.8")


def test_tls_12_limited_to_the_mssante_suites(mssd: MssdProcess) -> None:
    def handshake(ciphers: str) -> str | None:
        context = mssd.pki.client_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers)
        try:
            with socket.create_connection(("127.0.0.1", mssd.submissions), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    cipher = tls.cipher()
                    return cipher[0] if cipher else None
        except ssl.SSLError:
            return None

    assert handshake("ECDHE-RSA-AES128-GCM-SHA256") == "ECDHE-RSA-AES128-GCM-SHA256"
    assert handshake("ECDHE-RSA-AES256-SHA384") == "ECDHE-RSA-AES256-SHA384"
    assert handshake("AES128-GCM-SHA256") is None
    assert handshake("ECDHE-RSA-CHACHA20-POLY1305") is None
    context = mssd.pki.client_context()
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", mssd.submissions), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="localhost")


def test_swaks_submits_over_starttls(mssd: MssdProcess) -> None:
    swaks = require_program("swaks")
    result = subprocess.run(
        [
            swaks,
            "--server",
            f"127.0.0.1:{mssd.submission}",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            PER,
            "--auth-password",
            PASSWORD,
            "--from",
            PER,
            "--to",
            PER2,
            "--header",
            "Subject: envoye par swaks",
            "--body",
            "Bonjour depuis swaks",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    assert any(b"envoye par swaks" in c for _, c in inbox(mssd, PER2))
