"""Logins of an internationalised domain typed with U-labels, over real IMAP and SMTP
sessions on both stores.

mssd stores the domain of its mailboxes and logins as A-labels (migration 0007); a
user types ``claire@hôpital-idn.mssd.test``. The typed login is looked up, counted by
the rate limiter and audited in one form (``mssd.auth.authenticator.login_key``); a
domain that is not a valid IDN fails like an unknown login, and the session goes on.
"""

from __future__ import annotations

import base64
import imaplib
import smtplib
import subprocess
from collections.abc import Iterator

import pytest
from conftest import (
    PASSWORD,
    PER2,
    TEST_AUTH,
    MssdProcess,
    PkiBundle,
    require_program,
    run,
    serve_seeded,
    store_url_for,
)

from mssd.auth.passwords import hash_password
from mssd.store import admin
from mssd.store.audit import read_audit
from mssd.store.engine import create_engine
from mssd.store.records import AuditEvent

IDN_DOMAIN = "hôpital-idn.mssd.test"
A_LABEL = "xn--hpital-idn-rbb.mssd.test"
CLAIRE = f"claire@{IDN_DOMAIN}"
"""How Claire types her login."""
CLAIRE_STORED = f"claire@{A_LABEL}"
LOCKED = f"verrou@{IDN_DOMAIN}"
"""An account the rate-limit test locks (no other test uses it)."""
LOCKED_STORED = f"verrou@{A_LABEL}"
FAILURE_LIMIT = 3
MALFORMED_IDN = [
    "claire@xn--zz.mssd.test",  # an A-label whose Punycode does not decode
    "claire@hôpital..mssd.test",  # an empty label
    "claire@hôp\u200dital.mssd.test",  # ZERO WIDTH JOINER outside its context (RFC 5892)
    "claire@-hôpital-.mssd.test",  # hyphens at both ends
    "claire@" + "é" * 70 + ".mssd.test",  # a label longer than 63 octets once encoded
]


async def _add_idn_accounts(url: str) -> None:
    engine = create_engine(url)
    try:
        hashed = hash_password(PASSWORD, TEST_AUTH)
        await admin.add_domain(engine, A_LABEL, actor="test")
        for address, idnat in ((CLAIRE_STORED, "810000000060"), (LOCKED_STORED, "810000000078")):
            await admin.create_mailbox(
                engine,
                address=address,
                bal_type="PER",
                owner_idnat=idnat,
                idnat_ps=idnat,
                password_hash=hashed,
                actor="test",
            )
    finally:
        await engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[MssdProcess]:
    workdir = tmp_path_factory.mktemp(f"idn-{request.param}")
    limits = {
        "MSSD_AUTH_FAILURE_LIMIT_PER_ACCOUNT": str(FAILURE_LIMIT),
        "MSSD_AUTH_FAILURE_LIMIT_PER_ADDRESS": "1000",
    }
    for url in store_url_for(request.param, workdir):
        for process in serve_seeded(url, test_pki, workdir, **limits):
            run(_add_idn_accounts(url))
            yield process


def auth_events(server: MssdProcess) -> list[AuditEvent]:
    async def read() -> list[AuditEvent]:
        engine = create_engine(server.url)
        try:
            return list(await read_audit(engine, action_prefix="auth."))
        finally:
            await engine.dispose()

    return list(reversed(run(read())))


def imap(server: MssdProcess) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.imap, timeout=30)
    client.starttls(ssl_context=server.pki.client_context())
    return client


def plain(login: str, password: str = PASSWORD) -> bytes:
    """An RFC 4616 PLAIN message: authcid and password in UTF-8."""
    return b"\0" + login.encode() + b"\0" + password.encode()


def smtp(server: MssdProcess) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.submission, timeout=30)
    client.starttls(context=server.pki.client_context())
    client.ehlo("client.mssd.test")
    return client


def smtp_auth_plain(client: smtplib.SMTP, login: str, password: str = PASSWORD) -> int:
    # smtplib's login() encodes the SASL response as ASCII (Python 3.11), so a UTF-8
    # authcid cannot go through it; a UTF-8 mail client sends what this sends
    # (RFC 4954 §4 initial response, base64 of the RFC 4616 message).
    code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(plain(login, password)).decode())
    return code


# -- IMAP ---------------------------------------------------------------------------


@pytest.mark.parametrize("typed", [CLAIRE, "Claire@HÔPITAL-IDN.mssd.test", CLAIRE_STORED])
def test_imap_authenticate_plain_with_the_domain_as_typed(server: MssdProcess, typed: str) -> None:
    """RFC 9755 §5 (was RFC 6855 §5): UTF-8 user names go through AUTHENTICATE."""
    client = imap(server)
    try:
        typ, _ = client.authenticate("PLAIN", lambda _: plain(typed))
        assert typ == "OK"
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()
    success = auth_events(server)[-1]
    assert (success.action, success.actor, success.target) == (
        "auth.success",
        CLAIRE_STORED,
        CLAIRE_STORED,
    )


def test_imap_login_with_the_utf8_login_in_a_literal(server: MssdProcess) -> None:
    """LOGIN has no UTF-8 quoted strings before authentication (ENABLE UTF8=ACCEPT is
    valid only once authenticated, RFC 9755 §3): a client sends the UTF-8 login as a
    literal, here non-synchronising (LITERAL+, RFC 7888)."""
    client = imap(server)
    try:
        assert "LITERAL+" in client.capabilities
        login = CLAIRE.encode()
        typ, _ = client.login(b"{%d+}\r\n" % len(login) + login, PASSWORD)
        assert typ == "OK"
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()


@pytest.mark.parametrize("typed", MALFORMED_IDN)
def test_imap_a_malformed_idn_login_fails_like_an_unknown_one(
    server: MssdProcess, typed: str
) -> None:
    client = imap(server)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
            client.authenticate("PLAIN", lambda _: plain(typed))
        # The session goes on: the right login is accepted on the same connection.
        assert client.authenticate("PLAIN", lambda _: plain(CLAIRE))[0] == "OK"
    finally:
        client.logout()


# -- SMTP submission ----------------------------------------------------------------


def test_smtp_auth_plain_with_the_domain_as_typed(server: MssdProcess) -> None:
    with smtp(server) as client:
        assert smtp_auth_plain(client, CLAIRE) == 235
        assert client.sendmail(CLAIRE_STORED, [PER2], b"Subject: IDN\r\n\r\nBonjour\r\n") == {}


def test_smtp_auth_login_with_the_domain_as_typed(server: MssdProcess) -> None:
    with smtp(server) as client:
        assert client.docmd("AUTH", "LOGIN")[0] == 334
        assert client.docmd(base64.b64encode(CLAIRE.encode()).decode())[0] == 334
        assert client.docmd(base64.b64encode(PASSWORD.encode()).decode())[0] == 235


def test_swaks_submits_with_the_domain_as_typed(server: MssdProcess) -> None:
    swaks = require_program("swaks")
    result = subprocess.run(
        [
            swaks, "--server", f"127.0.0.1:{server.submission}", "--tls",
            "--auth", "PLAIN", "--auth-user", CLAIRE, "--auth-password", PASSWORD,
            "--from", CLAIRE_STORED, "--to", PER2, "--header", "Subject: IDN par swaks",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 " in result.stdout


@pytest.mark.parametrize("typed", MALFORMED_IDN)
def test_smtp_a_malformed_idn_login_fails_like_an_unknown_one(
    server: MssdProcess, typed: str
) -> None:
    with smtp(server) as client:
        code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(plain(typed)).decode())
        assert (code, text) == (535, b"5.7.8 Authentication credentials invalid")
        assert smtp_auth_plain(client, CLAIRE) == 235
    failure = auth_events(server)[-2]
    assert (failure.action, failure.result) == ("auth.failure", "unknown-account")
    assert server.log is not None and "Traceback" not in server.log.read_text()


# -- one key for the rate limit and the audit -------------------------------------------


def test_failures_count_against_one_login_whichever_way_it_is_typed(
    server: MssdProcess,
) -> None:
    typed = [LOCKED, LOCKED.upper(), LOCKED_STORED]
    assert len(typed) == FAILURE_LIMIT
    with smtp(server) as client:
        for login in typed:
            assert smtp_auth_plain(client, login, "mauvais mot de passe") == 535
        # The limit is reached: even the right password is refused for now, in
        # either form, over SMTP and IMAP alike.
        assert smtp_auth_plain(client, LOCKED_STORED) == 454
        assert smtp_auth_plain(client, LOCKED) == 454
    client = imap(server)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
            client.authenticate("PLAIN", lambda _: plain(LOCKED))
    finally:
        client.logout()
    events = [e for e in auth_events(server) if e.actor.startswith("verrou@")]
    assert [(e.actor, e.result) for e in events] == [
        (LOCKED_STORED, "bad-credentials"),
        (LOCKED_STORED, "bad-credentials"),
        (LOCKED_STORED, "bad-credentials"),
        (LOCKED_STORED, "rate-limited"),
        (LOCKED_STORED, "rate-limited"),
        (LOCKED_STORED, "rate-limited"),
    ]
