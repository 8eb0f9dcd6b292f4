"""Pro Santé Connect tokens over real SMTP sessions (XOAUTH2, OAUTHBEARER), with
the JWKS served over HTTPS by a local server the test controls."""

from __future__ import annotations

import base64
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    PER,
    PER2,
    PER_IDNAT,
    MssdProcess,
    PkiBundle,
    inbox,
    serve_seeded,
)
from test_auth_psc import (  # noqa: F401  (fixtures)
    ISSUER,
    JwksServer,
    jwks_server,
    oauthbearer,
    server_certificate,
    token,
    xoauth2,
)
from test_smtp_submission import message


@pytest.fixture
def psc_mssd(
    store_url: str,
    test_pki: PkiBundle,
    tmp_path: Path,
    jwks_server: JwksServer,  # noqa: F811
) -> Iterator[MssdProcess]:
    yield from serve_seeded(
        store_url,
        test_pki,
        tmp_path,
        MSSD_AUTH_PSC_ISSUER=ISSUER,
        MSSD_AUTH_PSC_JWKS_URL=jwks_server.url,
        MSSD_AUTH_PSC_CA_FILE=str(jwks_server.ca_file),
    )


def fresh_token(**claims: object) -> str:
    now = int(time.time())
    values: dict[str, object] = {
        "exp": now + 600,
        "iat": now - 5,
        "nbf": now - 5,
        "SubjectNameID": PER_IDNAT,
    }
    values.update(claims)
    return token(**values)


def authenticate(
    server: MssdProcess, mechanism: str, payload: bytes
) -> tuple[smtplib.SMTP, int, bytes]:
    client = server.smtp(login=None)
    code, text = client.docmd("AUTH", f"{mechanism} {base64.b64encode(payload).decode()}")
    if code == 334:  # RFC 7628 §3.2.3: the error challenge, answered with %x01
        code, text = client.docmd(base64.b64encode(b"\x01").decode())
    return client, code, text


def test_xoauth2_token_logs_in_and_sends(psc_mssd: MssdProcess) -> None:
    client, code, text = authenticate(psc_mssd, "XOAUTH2", xoauth2(fresh_token(), user=PER))
    with client:
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        assert client.sendmail(PER, [PER2], message("via Pro Sante Connect")) == {}
    assert any(b"via Pro Sante Connect" in c for _, c in inbox(psc_mssd, PER2))


def test_oauthbearer_token_logs_in(psc_mssd: MssdProcess) -> None:
    client, code, _ = authenticate(psc_mssd, "OAUTHBEARER", oauthbearer(fresh_token(), authzid=PER))
    with client:
        assert code == 235


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": int(time.time()) - 60},
        {"iss": "https://idp.elsewhere.example/realms/x"},
        {"SubjectNameID": "810009999999"},
    ],
    ids=["expired", "wrong-issuer", "unknown-idnat"],
)
def test_bad_tokens_are_refused(psc_mssd: MssdProcess, claims: dict[str, object]) -> None:
    client, code, text = authenticate(psc_mssd, "XOAUTH2", xoauth2(fresh_token(**claims), user=PER))
    with client:
        assert (code, text[:5]) == (535, b"5.7.8")
        assert client.docmd("MAIL", f"FROM:<{PER}>")[0] == 530
