"""XOAUTH2 and OAUTHBEARER with Pro Santé Connect-style tokens, against a real HTTPS JWKS server."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from auth_fakes import AuditList, Clock, MemoryAccounts
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from mssd.auth import (
    AuthContext,
    Authenticator,
    Challenge,
    Failure,
    StepResult,
    Success,
)
from mssd.config import AuthSettings
from mssd.store.records import Account

ISSUER = "https://auth.esw.esante.gouv.fr/auth/realms/esante-wallet"
IDNAT = "810002345678"
LOGIN = "dr.martin@example.mssante.fr"
NOW = 1_700_000_000.0
TLS = AuthContext(protocol="imap", remote_ip="192.0.2.20", tls=True)


# --- keys, certificates and the JWKS server -----------------------------------------------------


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


SIGNING_KEY = _rsa()
OTHER_KEY = _rsa()


def _public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return jwk


def _server_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, usable as its own trust anchor."""
    key = _rsa()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class JwksServer:
    url: str
    ca_file: Path
    requests: list[str]
    jwks: dict[str, Any]


@pytest.fixture(scope="module")
def server_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _server_certificate(tmp_path_factory.mktemp("jwks"), "jwks")


@pytest.fixture
def jwks_server(server_certificate: tuple[Path, Path]) -> Iterator[JwksServer]:
    cert_path, key_path = server_certificate
    state = JwksServer(
        url="", ca_file=cert_path, requests=[], jwks={"keys": [_public_jwk(SIGNING_KEY, "k1")]}
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            body = json.dumps(state.jwks).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://127.0.0.1:{server.server_address[1]}/realms/esante-wallet/certs"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def settings_for(server: JwksServer, **overrides: Any) -> AuthSettings:
    values: dict[str, Any] = {
        "scrypt_n": 2**10,
        "psc_issuer": ISSUER,
        "psc_jwks_url": server.url,
        "psc_ca_file": server.ca_file,
    }
    values.update(overrides)
    return AuthSettings(**values)


def make(
    settings: AuthSettings, clock: Clock, *accounts: Account
) -> tuple[Authenticator, AuditList]:
    audit = AuditList()
    default = Account(id=1, login=LOGIN, status="active", idnat_ps=IDNAT)
    auth = Authenticator(settings, MemoryAccounts(*(accounts or (default,))), audit, clock=clock)
    return auth, audit


def token(
    *,
    key: Any = SIGNING_KEY,
    alg: str = "RS256",
    kid: str | None = "k1",
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "exp": int(NOW) + 600,
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "SubjectNameID": IDNAT,
        "preferred_username": IDNAT,
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def xoauth2(access_token: str, user: str = LOGIN) -> bytes:
    return f"user={user}\x01auth=Bearer {access_token}\x01\x01".encode()


def oauthbearer(access_token: str, authzid: str = "") -> bytes:
    gs2 = f"n,a={authzid}," if authzid else "n,,"
    return f"{gs2}\x01host=mail.example\x01port=993\x01auth=Bearer {access_token}\x01\x01".encode()


async def login(auth: Authenticator, mechanism: str, message: bytes) -> StepResult:
    """Run the exchange to its end the way a client does: on an error challenge
    send the RFC 7628 §3.2.3 dummy response."""
    exchange = auth.start(mechanism, TLS)
    result = await exchange.step(message)
    if isinstance(result, Challenge):
        result = await exchange.step(b"\x01")
    return result


# --- tests --------------------------------------------------------------------------------------


async def test_xoauth2_with_valid_token_gives_principal_until_exp(jwks_server: JwksServer) -> None:
    auth, audit = make(settings_for(jwks_server), Clock())
    try:
        assert auth.mechanisms(TLS) == ["XOAUTH2", "OAUTHBEARER", "PLAIN", "LOGIN"]
        result = await login(auth, "XOAUTH2", xoauth2(token()))
    finally:
        await auth.close()
    assert isinstance(result, Success)
    assert result.principal.login == LOGIN
    assert result.principal.mechanism == "XOAUTH2"
    assert result.principal.idnat_ps == IDNAT
    assert result.principal.expires_at == NOW + 600
    assert audit.results == ["ok"]
    assert jwks_server.requests == ["/realms/esante-wallet/certs"]


async def test_oauthbearer_with_and_without_authzid(jwks_server: JwksServer) -> None:
    auth, audit = make(settings_for(jwks_server), Clock())
    try:
        first = await login(auth, "OAUTHBEARER", oauthbearer(token()))
        second = await login(auth, "oauthbearer", oauthbearer(token(), authzid=LOGIN.upper()))
    finally:
        await auth.close()
    assert isinstance(first, Success) and isinstance(second, Success)
    assert first.principal.mechanism == "OAUTHBEARER"
    assert first.principal.expires_at == NOW + 600
    assert audit.events[0].actor == IDNAT


async def test_jwks_is_cached_between_logins(jwks_server: JwksServer) -> None:
    auth, _ = make(settings_for(jwks_server), Clock())
    try:
        assert isinstance(await login(auth, "XOAUTH2", xoauth2(token())), Success)
        assert isinstance(await login(auth, "OAUTHBEARER", oauthbearer(token())), Success)
    finally:
        await auth.close()
    assert len(jwks_server.requests) == 1


async def test_error_challenge_json_comes_before_failure(jwks_server: JwksServer) -> None:
    auth, audit = make(settings_for(jwks_server), Clock())
    try:
        exchange = auth.start("OAUTHBEARER", TLS)
        challenge = await exchange.step(oauthbearer(token(exp=int(NOW) - 60)))
        assert isinstance(challenge, Challenge)
        error = json.loads(challenge.data)
        assert error["status"] == "invalid_token" and error["schemes"] == "bearer"
        assert "scope" in error
        assert error["openid-configuration"] == f"{ISSUER}/.well-known/openid-configuration"
        final = await exchange.step(b"\x01")
        assert final == Failure(reason="authentication failed", temporary=False)

        exchange = auth.start("XOAUTH2", TLS)
        challenge = await exchange.step(xoauth2(token(exp=int(NOW) - 60)))
        assert isinstance(challenge, Challenge)
        assert json.loads(challenge.data)["status"] == "401"
        assert isinstance(await exchange.step(b""), Failure)
    finally:
        await auth.close()
    assert audit.results == ["expired-token", "expired-token"]


@pytest.mark.parametrize(
    ("claims", "result"),
    [
        ({"exp": int(NOW) - 60}, "expired-token"),
        ({"iss": "https://evil.example/realms/x"}, "wrong-issuer"),
        ({"nbf": int(NOW) + 300}, "not-yet-valid"),
        ({"SubjectNameID": "899999999999"}, "unknown-account"),
        ({"SubjectNameID": "not-an-idnat"}, "bad-subject"),
        ({"SubjectNameID": None}, "bad-subject"),
        ({"exp": None}, "malformed-token"),
    ],
)
async def test_unacceptable_claims_are_refused(
    jwks_server: JwksServer, claims: dict[str, Any], result: str
) -> None:
    auth, audit = make(settings_for(jwks_server), Clock())
    try:
        outcome = await login(auth, "XOAUTH2", xoauth2(token(**claims)))
    finally:
        await auth.close()
    assert outcome == Failure(reason="authentication failed", temporary=False)
    assert audit.results == [result]
    assert audit.events[0].action == "auth.failure"


async def test_audience_is_checked_when_configured(jwks_server: JwksServer) -> None:
    auth, audit = make(settings_for(jwks_server, psc_audience="mssd-example"), Clock())
    try:
        wrong = await login(auth, "XOAUTH2", xoauth2(token(aud="someone-else")))
        right = await login(auth, "XOAUTH2", xoauth2(token(aud=["x", "mssd-example"])))
    finally:
        await auth.close()
    assert isinstance(wrong, Failure) and isinstance(right, Success)
    assert audit.results == ["wrong-audience", "ok"]


async def test_token_signed_by_another_key_with_same_kid_is_refused(
    jwks_server: JwksServer,
) -> None:
    auth, audit = make(settings_for(jwks_server), Clock())
    try:
        outcome = await login(auth, "XOAUTH2", xoauth2(token(key=OTHER_KEY)))
    finally:
        await auth.close()
    assert isinstance(outcome, Failure) and not outcome.temporary
    assert audit.results == ["bad-signature"]


async def test_unsigned_and_hmac_tokens_are_refused(jwks_server: JwksServer) -> None:
    # Even when misconfigured to list them: none and HS* are never accepted.
    settings = settings_for(jwks_server, psc_algorithms=("RS256", "none", "HS256"))
    auth, audit = make(settings, Clock())
    unsigned = token(key=None, alg="none")
    hmac_token = token(key="x" * 64, alg="HS256")
    try:
        results = [
            await login(auth, "XOAUTH2", xoauth2(unsigned)),
            await login(auth, "XOAUTH2", xoauth2(hmac_token)),
        ]
    finally:
        await auth.close()
    assert all(isinstance(r, Failure) and not r.temporary for r in results)
    assert audit.results == ["bad-algorithm", "bad-algorithm"]


async def test_token_replayed_after_expiry_is_refused(jwks_server: JwksServer) -> None:
    clock = Clock()
    auth, audit = make(settings_for(jwks_server), clock)
    access_token = token(exp=int(NOW) + 60)
    try:
        assert isinstance(await login(auth, "XOAUTH2", xoauth2(access_token)), Success)
        clock.now = NOW + 60 + 5  # exactly at exp + leeway
        replay = await login(auth, "XOAUTH2", xoauth2(access_token))
    finally:
        await auth.close()
    assert isinstance(replay, Failure) and not replay.temporary
    assert audit.results == ["ok", "expired-token"]


async def test_user_must_be_the_token_holders_login(jwks_server: JwksServer) -> None:
    other = Account(id=2, login="other@example.mssante.fr", status="active")
    holder = Account(id=1, login=LOGIN, status="active", idnat_ps=IDNAT)
    auth, audit = make(settings_for(jwks_server), Clock(), holder, other)
    try:
        x = await login(auth, "XOAUTH2", xoauth2(token(), user="other@example.mssante.fr"))
        o = await login(
            auth, "OAUTHBEARER", oauthbearer(token(), authzid="other@example.mssante.fr")
        )
    finally:
        await auth.close()
    assert isinstance(x, Failure) and isinstance(o, Failure)
    assert audit.results == ["authzid-refused", "authzid-refused"]


async def test_authzid_may_name_an_idn_login_with_u_labels(jwks_server: JwksServer) -> None:
    """The login is stored with an A-label domain; OAUTHBEARER's gs2 authzid is UTF-8
    (RFC 5801 §4 saslname) and names it as typed. (XOAUTH2's user= is a key=value of
    RFC 7628 §3.1, VCHAR only: a client sends the A-label there.)"""
    holder = Account(
        id=1, login="dr.martin@xn--hpital-idn-rbb.mssd.test", status="active", idnat_ps=IDNAT
    )
    auth, audit = make(settings_for(jwks_server), Clock(), holder)
    try:
        o = await login(
            auth, "OAUTHBEARER", oauthbearer(token(), authzid="Dr.Martin@HÔPITAL-IDN.mssd.test")
        )
        x = await login(
            auth, "XOAUTH2", xoauth2(token(), user="Dr.Martin@XN--HPITAL-IDN-RBB.mssd.test")
        )
    finally:
        await auth.close()
    assert isinstance(o, Success) and isinstance(x, Success)
    assert audit.results == ["ok", "ok"]
    assert audit.events[0].actor == holder.login


async def test_suspended_token_holder_is_refused(jwks_server: JwksServer) -> None:
    holder = Account(id=1, login=LOGIN, status="suspended", idnat_ps=IDNAT)
    auth, audit = make(settings_for(jwks_server), Clock(), holder)
    try:
        outcome = await login(auth, "XOAUTH2", xoauth2(token()))
    finally:
        await auth.close()
    assert outcome == Failure(reason="authentication failed", temporary=False)
    assert audit.results == ["suspended"]


async def test_unknown_kid_refetches_at_most_once_per_30_seconds(jwks_server: JwksServer) -> None:
    clock = Clock()
    auth, audit = make(settings_for(jwks_server, failure_limit_per_account=10), clock)
    try:
        assert isinstance(await login(auth, "XOAUTH2", xoauth2(token())), Success)
        clock.now += 31
        for _ in range(5):
            await login(auth, "XOAUTH2", xoauth2(token(kid="rotated")))
        assert len(jwks_server.requests) == 2  # first fetch + one refetch for "rotated"
        # The IdP rotates its key; after 30 s the next unknown kid triggers a refetch.
        jwks_server.jwks = {"keys": [_public_jwk(SIGNING_KEY, "k1"), _public_jwk(OTHER_KEY, "k2")]}
        clock.now += 31
        rotated = await login(auth, "XOAUTH2", xoauth2(token(key=OTHER_KEY, kid="k2")))
    finally:
        await auth.close()
    assert isinstance(rotated, Success)
    assert len(jwks_server.requests) == 3
    assert audit.results == ["ok"] + ["unknown-key"] * 5 + ["ok"]


async def test_jwks_server_down_is_a_temporary_failure(jwks_server: JwksServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = settings_for(jwks_server, psc_jwks_url=f"https://127.0.0.1:{port}/certs")
    auth, audit = make(settings, Clock())
    try:
        exchange = auth.start("XOAUTH2", TLS)
        outcome = await exchange.step(xoauth2(token()))
    finally:
        await auth.close()
    assert outcome == Failure(reason="identity provider unavailable", temporary=True)
    assert audit.results == ["idp-unavailable"]


async def test_jwks_server_with_untrusted_certificate_is_a_temporary_failure(
    jwks_server: JwksServer, tmp_path: Path
) -> None:
    stranger, _ = _server_certificate(tmp_path, "stranger")
    auth, audit = make(settings_for(jwks_server, psc_ca_file=stranger), Clock())
    try:
        outcome = await login(auth, "OAUTHBEARER", oauthbearer(token()))
    finally:
        await auth.close()
    assert outcome == Failure(reason="identity provider unavailable", temporary=True)
    assert audit.results == ["idp-unavailable"]
    assert jwks_server.requests == []


async def test_jwks_that_is_not_json_is_a_temporary_failure(jwks_server: JwksServer) -> None:
    jwks_server.jwks = {"not": "a jwks"}
    auth, audit = make(settings_for(jwks_server), Clock())
    try:
        outcome = await login(auth, "XOAUTH2", xoauth2(token()))
    finally:
        await auth.close()
    assert isinstance(outcome, Failure) and outcome.temporary
    assert audit.results == ["idp-unavailable"]


async def test_bearer_mechanisms_need_encryption(jwks_server: JwksServer) -> None:
    from mssd.auth import EncryptionRequired

    auth, _ = make(settings_for(jwks_server), Clock())
    clear = AuthContext(protocol="smtp", remote_ip="192.0.2.20", tls=False)
    try:
        assert auth.mechanisms(clear) == []
        with pytest.raises(EncryptionRequired):
            auth.start("XOAUTH2", clear)
    finally:
        await auth.close()


async def test_malformed_bearer_message_is_reported_as_malformed(jwks_server: JwksServer) -> None:
    auth, audit = make(settings_for(jwks_server), Clock())
    try:
        outcome = await auth.start("XOAUTH2", TLS).step(b"user=x\x01auth=Bearer")
    finally:
        await auth.close()
    assert isinstance(outcome, Failure) and outcome.malformed
    assert audit.results == ["malformed"]
    assert jwks_server.requests == []


async def test_tokens_never_reach_the_audit_trail(jwks_server: JwksServer) -> None:
    auth, audit = make(settings_for(jwks_server), Clock())
    good, bad = token(), token(iss="https://evil.example")
    try:
        await login(auth, "XOAUTH2", xoauth2(good))
        await login(auth, "XOAUTH2", xoauth2(bad))
    finally:
        await auth.close()
    text = repr(audit.events)
    assert good not in text and bad not in text
    assert good.split(".")[2] not in text
