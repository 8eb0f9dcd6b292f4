"""Pro Santé Connect tokens over IMAP: login with XOAUTH2, and a session that
ends cleanly when its token expires (MSSanté client rules)."""

from __future__ import annotations

import imaplib
import time

from conftest import PER, MssdProcess
from test_auth_psc import jwks_server, server_certificate, xoauth2  # noqa: F401  (fixtures)
from test_smtp_psc import fresh_token, psc_mssd  # noqa: F401  (fixture)


def test_expired_token_ends_the_session_with_bye(psc_mssd: MssdProcess) -> None:  # noqa: F811
    lifetime = 3
    token = fresh_token(exp=int(time.time()) + lifetime)
    client = imaplib.IMAP4_SSL(
        "127.0.0.1", psc_mssd.imaps, ssl_context=psc_mssd.pki.client_context(), timeout=30
    )
    assert "AUTH=XOAUTH2" in client.capabilities
    payload = xoauth2(token, user=PER)
    typ, _ = client.authenticate("XOAUTH2", lambda _: payload)
    assert typ == "OK"
    assert client.select("INBOX")[0] == "OK"
    time.sleep(lifetime + 1)
    tag = client._new_tag()  # type: ignore[attr-defined]
    client.send(tag + b" NOOP\r\n")
    reply = client.readline()
    assert reply.startswith(b"* BYE") and b"expired" in reply, reply
    assert client.readline() == b""  # the server closed the connection
