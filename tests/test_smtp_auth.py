"""Password + one-time code, trusted networks, and large messages not blocking
other sessions, over real SMTP sessions (PROXY protocol: test_smtp_proxy_protocol.py)."""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    PASSWORD,
    PER,
    PER2,
    TEST_AUTH,
    MssdProcess,
    PkiBundle,
    inbox,
    run,
    serve_seeded,
)
from test_smtp_submission import message

from mssd.auth.passwords import hash_password
from mssd.auth.totp import generate_totp_secret, totp_code
from mssd.store import admin
from mssd.store.engine import create_engine

TOTP_USER = "code.unique@hopital.mssd.test"


async def _add_totp_account(url: str, secret: str) -> None:
    engine = create_engine(url)
    try:
        await admin.create_mailbox(
            engine,
            address=TOTP_USER,
            bal_type="PER",
            owner_idnat="810000000052",
            idnat_ps="810000000052",
            password_hash=hash_password(PASSWORD, TEST_AUTH),
            actor="test",
        )
        await admin.set_totp(engine, TOTP_USER, secret, actor="test")
    finally:
        await engine.dispose()


def test_password_followed_by_one_time_code(mssd: MssdProcess) -> None:
    secret = generate_totp_secret()
    run(_add_totp_account(mssd.url, secret))
    with pytest.raises(smtplib.SMTPAuthenticationError):
        mssd.smtp(login=TOTP_USER, password=PASSWORD)  # the code is missing
    code = totp_code(secret, time.time())
    with mssd.smtp(login=TOTP_USER, password=PASSWORD + code) as client:
        assert client.sendmail(TOTP_USER, [PER2], message("avec code", TOTP_USER)) == {}
    with pytest.raises(smtplib.SMTPAuthenticationError):
        mssd.smtp(login=TOTP_USER, password=PASSWORD + code)  # a code is used once


@pytest.fixture
def trusting_mssd(store_url: str, test_pki: PkiBundle, tmp_path: Path) -> Iterator[MssdProcess]:
    yield from serve_seeded(
        store_url, test_pki, tmp_path, MSSD_SERVER_TRUSTED_NETWORKS="127.0.0.0/8"
    )


def test_plaintext_auth_from_a_trusted_network(trusting_mssd: MssdProcess) -> None:
    with smtplib.SMTP("127.0.0.1", trusting_mssd.submission, timeout=30) as client:
        client.ehlo("proxy.mssd.test")
        assert "PLAIN" in client.esmtp_features["auth"].split()
        client.login(PER, PASSWORD)
        assert client.sendmail(PER, [PER2], message("derriere le proxy")) == {}


def test_a_large_message_in_progress_does_not_hold_up_others(mssd: MssdProcess) -> None:
    """While one client is half-way through a 20 MB DATA, another completes a
    whole submission; then the large message is stored intact."""
    line = b"x" * 998 + b"\r\n"
    half = line * 10_000  # ~10 MB
    other_done = threading.Event()
    with mssd.smtp() as big:
        big.docmd("MAIL", f"FROM:<{PER}> SIZE={2 * len(half)}")
        big.docmd("RCPT", f"TO:<{PER2}>")
        assert big.docmd("DATA")[0] == 354
        assert big.sock is not None
        big.sock.sendall(b"Subject: gros fichier\r\n\r\n" + half)

        def other() -> None:
            with mssd.smtp(login=PER) as client:
                client.sendmail(PER, [PER2], message("petit message pendant le gros"))
            other_done.set()

        thread = threading.Thread(target=other)
        thread.start()
        assert other_done.wait(60), "a session in DATA blocked another session"
        big.sock.sendall(half + b".\r\n")
        code, text = big.getreply()
        thread.join()
    assert code == 250, text
    stored = [c for _, c in inbox(mssd, PER2) if b"gros fichier" in c]
    assert len(stored) == 1 and stored[0].endswith(half + half)
