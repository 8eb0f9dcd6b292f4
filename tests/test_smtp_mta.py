"""The MTA listener (port 25): mail from other operators for local domains."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from conftest import (
    ORG,
    OTHER_OPERATOR_DOMAIN,
    PER,
    PER2,
    MssdProcess,
    PkiBundle,
    inbox,
    run,
    seed,
    write_whitelist,
)
from test_smtp_submission import message

from mssd.config import (
    ServerSettings,
    Settings,
    SmtpSettings,
    StoreSettings,
    TlsSettings,
    WhitelistSettings,
)
from mssd.delivery import PolicyRefusal, Transaction
from mssd.trust.identity import identity_from_der


def operator_session(mssd: MssdProcess) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", mssd.mta, timeout=30)
    client.ehlo("mx.autre-operateur.mssd.test")
    # Another operator presents its IGC-Santé server certificate as a client.
    client.starttls(context=mssd.pki.client_context(mssd.pki.app))
    client.ehlo("mx.autre-operateur.mssd.test")
    return client


def test_starttls_required_before_mail(mssd: MssdProcess) -> None:
    with smtplib.SMTP("127.0.0.1", mssd.mta, timeout=30) as client:
        client.ehlo("mx.autre-operateur.mssd.test")
        assert client.has_extn("starttls")
        code, text = client.docmd("MAIL", "FROM:<a@autre-operateur.mssd.test>")
        assert code == 530 and text.startswith(b"5.7.0")


def test_no_auth_on_the_mta_port(mssd: MssdProcess) -> None:
    with operator_session(mssd) as client:
        assert not client.has_extn("auth")
        code, text = client.docmd("AUTH", "PLAIN AGEAYg==")
        assert code == 502 and text.startswith(b"5.5.1")


def test_mail_for_a_local_mailbox_is_delivered(mssd: MssdProcess) -> None:
    with operator_session(mssd) as client:
        refused = client.sendmail(
            "medecin@autre-operateur.mssd.test",
            [PER, ORG],
            message("de l'exterieur", "medecin@autre-operateur.mssd.test"),
        )
    assert refused == {}
    for address in (PER, ORG):
        stored = [c for _, c in inbox(mssd, address) if b"de l'exterieur" in c]
        assert len(stored) == 1
        assert b"with ESMTPS id" in stored[0]
        assert b"Message-ID" not in stored[0]  # only a submission server completes messages


def test_null_sender_accepted_for_bounces(mssd: MssdProcess) -> None:
    with operator_session(mssd) as client:
        assert client.docmd("MAIL", "FROM:<>")[0] == 250
        assert client.docmd("RCPT", f"TO:<{PER2}>")[0] == 250
        assert client.data(b"Subject: Undelivered Mail\r\n\r\nbounce\r\n")[0] == 250


def test_relaying_is_refused(mssd: MssdProcess) -> None:
    with operator_session(mssd) as client:
        client.docmd("MAIL", "FROM:<a@autre-operateur.mssd.test>")
        code, text = client.docmd("RCPT", "TO:<b@troisieme-operateur.mssd.test>")
        assert code == 550 and text.startswith(b"5.7.1")
        assert b"not hosted here" in text


class RefuseUnknownOperators:
    """Stands where the trust-space check will: it sees the client certificate."""

    def __init__(self, allowed_struct: str) -> None:
        self.allowed = allowed_struct
        self.seen: list[str | None] = []

    async def check_sender(self, transaction: Transaction) -> None:
        if transaction.session.source != "mta":
            return
        der = transaction.session.peer_certificate
        identity = identity_from_der(der) if der else None
        self.seen.append(identity.idnat_struct if identity else None)
        if identity is None or identity.idnat_struct != self.allowed:
            raise PolicyRefusal(550, "5.7.1", "Operator certificate not in the MSSante whitelist")

    async def check_recipient(self, transaction: Transaction, recipient: str) -> None:
        return None


async def _policy_hook_session(url: str, test_pki: PkiBundle, workdir: Path) -> list[object]:
    from mssd.app import build_services
    from mssd.smtp.listeners import start_smtp

    whitelist = write_whitelist(
        workdir / "whitelist.xml", {OTHER_OPERATOR_DOMAIN: [test_pki.app.subject_dn]}
    )
    settings = Settings(
        server=ServerSettings(var_dir=workdir),
        store=StoreSettings(url=url),
        smtp=SmtpSettings(
            mta_listen="127.0.0.1:0",
            submission_listen="",
            submissions_listen="",
            # Sessions without a certificate reach the hook under test.
            mta_require_client_cert=False,
        ),
        whitelist=WhitelistSettings(source=str(whitelist)),
        tls=TlsSettings(
            cert_file=test_pki.dev.server_cert,
            key_file=test_pki.dev.server_key,
            client_ca_file=test_pki.dev.ca_bundle,
            crl_file=test_pki.dev.crl,
        ),
    )
    services = await build_services(settings)
    check = RefuseUnknownOperators(allowed_struct="1750000000")
    services.pipeline.add_check(check)
    listeners = await start_smtp(
        settings, services.pipeline, services.authenticator, services.tls, mta_tls=services.mta_tls
    )
    port = listeners[0].port

    def talk(cert: object) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("mx.mssd.test")
            client.starttls(context=test_pki.client_context(cert))  # type: ignore[arg-type]
            client.ehlo("mx.mssd.test")
            return client.docmd("MAIL", "FROM:<a@autre-operateur.mssd.test>")

    try:
        with_operator_cert = await asyncio.to_thread(talk, test_pki.app)
        without_cert = await asyncio.to_thread(talk, None)
    finally:
        for listener in listeners:
            listener.server.close()
        await services.close()
    return [with_operator_cert, without_cert, check.seen]


def test_policy_hook_sees_the_client_certificate(
    store_url: str, test_pki: PkiBundle, tmp_path: Path
) -> None:
    run(seed(store_url, test_pki))
    accepted, refused, seen = run(_policy_hook_session(store_url, test_pki, tmp_path))
    assert accepted[0] == 250
    assert refused == (550, b"5.7.1 Operator certificate not in the MSSante whitelist")
    assert seen == ["1750000000", None]


def test_address_probing_commands_disclose_nothing(mssd: MssdProcess) -> None:
    """VRFY answers the same for a mailbox that exists and one that does not
    (RFC 5321 §3.5.3: 252), and EXPN is not offered (502)."""
    with operator_session(mssd) as client:
        known = client.docmd("VRFY", PER)
        unknown = client.docmd("VRFY", "nobody@hopital.mssd.test")
        assert known[0] == unknown[0] == 252
        assert known[1].replace(PER.encode(), b"") == unknown[1].replace(
            b"nobody@hopital.mssd.test", b""
        )
        code, text = client.docmd("EXPN", "staff")
        assert code == 502 and text.startswith(b"5.5.1")
