"""SASL EXTERNAL with TLS client certificates: CPS-style personal and organisation certificates."""

from __future__ import annotations

import datetime as dt

import pytest
from auth_fakes import AuditList, MemoryAccounts
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mssd.auth import AuthContext, Authenticator, Challenge, Failure, Success, UnknownMechanism
from mssd.config import AuthSettings
from mssd.store.records import Account
from mssd.trust.identity import normalise_dn

SETTINGS = AuthSettings(scrypt_n=2**10)
IDNAT = "810002345678"
NOT_AFTER = dt.datetime(2031, 1, 1, tzinfo=dt.UTC)


def certificate(*attributes: tuple[x509.ObjectIdentifier, str]) -> bytes:
    """A self-signed certificate with the given subject, as DER (the TLS layer's
    getpeercert(binary_form=True))."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(NOT_AFTER)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


CPS = certificate(
    (NameOID.COUNTRY_NAME, "FR"),
    (NameOID.ORGANIZATION_NAME, "CABINET MARTIN"),
    (NameOID.TITLE, "Médecin"),
    (NameOID.SURNAME, "MARTIN"),
    (NameOID.GIVEN_NAME, "Claire"),
    (NameOID.COMMON_NAME, IDNAT),
)
LAB = certificate(
    (NameOID.COUNTRY_NAME, "FR"),
    (NameOID.ORGANIZATION_NAME, "Laboratoire Test"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "1750000000"),
    (NameOID.COMMON_NAME, "sil.labo-test.example"),
)
STRANGER = certificate(
    (NameOID.COUNTRY_NAME, "FR"),
    (NameOID.ORGANIZATION_NAME, "Inconnu"),
    (NameOID.COMMON_NAME, "someone.example"),
)

DOCTOR = Account(id=1, login="claire.martin@example.mssante.fr", status="active", idnat_ps=IDNAT)
LAB_APP = Account(
    id=2,
    login="sil@labo-test.mssante.fr",
    status="active",
    # Registered from a DN typed by an administrator: other order of spacing and case.
    cert_dn=normalise_dn("CN=SIL.Labo-Test.example, OU=1750000000, O=laboratoire  test, C=FR"),
)


def ctx(der: bytes | None) -> AuthContext:
    return AuthContext(protocol="smtp", remote_ip="192.0.2.30", tls=True, peer_certificate=der)


def make(*accounts: Account) -> tuple[Authenticator, AuditList]:
    audit = AuditList()
    auth = Authenticator(SETTINGS, MemoryAccounts(*(accounts or (DOCTOR, LAB_APP))), audit)
    return auth, audit


async def test_cps_certificate_authenticates_the_professional_by_idnat() -> None:
    auth, audit = make()
    assert auth.mechanisms(ctx(CPS)) == ["EXTERNAL", "PLAIN", "LOGIN"]
    exchange = auth.start("EXTERNAL", ctx(CPS))
    assert await exchange.step(None) == Challenge(b"")
    result = await exchange.step(b"")
    assert isinstance(result, Success)
    assert result.principal.login == DOCTOR.login
    assert result.principal.mechanism == "EXTERNAL"
    assert result.principal.idnat_ps == IDNAT
    assert result.principal.expires_at == NOT_AFTER.timestamp()
    [event] = audit.events
    assert (event.actor, event.action, event.target) == (IDNAT, "auth.success", DOCTOR.login)


async def test_organisation_certificate_matches_registered_dn() -> None:
    auth, audit = make()
    result = await auth.start("EXTERNAL", ctx(LAB)).step(b"SIL@labo-test.mssante.fr")
    assert isinstance(result, Success)
    assert result.principal.login == LAB_APP.login
    assert result.principal.idnat_ps is None
    assert audit.events[0].actor == LAB_APP.cert_dn


async def test_unknown_certificate_is_refused() -> None:
    auth, audit = make()
    result = await auth.start("EXTERNAL", ctx(STRANGER)).step(b"")
    assert result == Failure(reason="authentication failed", temporary=False)
    assert audit.results == ["unknown-account"]
    assert audit.events[0].actor == normalise_dn("CN=someone.example,O=Inconnu,C=FR")


async def test_authzid_of_another_account_is_refused() -> None:
    auth, audit = make()
    result = await auth.start("EXTERNAL", ctx(CPS)).step(b"sil@labo-test.mssante.fr")
    assert isinstance(result, Failure) and not result.temporary
    assert audit.results == ["authzid-refused"]


async def test_authzid_may_name_an_idn_login_with_u_labels() -> None:
    """The login is stored with an A-label domain; the client names it as typed."""
    doctor = Account(
        id=1, login="claire.martin@xn--hpital-idn-rbb.mssd.test", status="active", idnat_ps=IDNAT
    )
    auth, audit = make(doctor)
    result = await auth.start("EXTERNAL", ctx(CPS)).step(
        "claire.martin@hôpital-idn.mssd.test".encode()
    )
    assert isinstance(result, Success) and result.principal.login == doctor.login
    assert audit.results == ["ok"]


async def test_suspended_certificate_account_is_refused() -> None:
    closed = Account(id=1, login="x@example.mssante.fr", status="closed", idnat_ps=IDNAT)
    auth, audit = make(closed)
    result = await auth.start("EXTERNAL", ctx(CPS)).step(b"")
    assert result == Failure(reason="authentication failed", temporary=False)
    assert audit.results == ["closed"]


async def test_garbage_certificate_is_refused_not_crashed() -> None:
    auth, audit = make()
    result = await auth.start("EXTERNAL", ctx(b"\x30\x03\x02\x01\x00")).step(b"")
    assert isinstance(result, Failure) and not result.temporary
    assert audit.results == ["bad-certificate"]


async def test_external_needs_a_client_certificate() -> None:
    auth, _ = make()
    assert "EXTERNAL" not in auth.mechanisms(ctx(None))
    with pytest.raises(UnknownMechanism):
        auth.start("EXTERNAL", ctx(None))


async def test_external_authzid_with_nul_is_malformed() -> None:
    auth, audit = make()
    result = await auth.start("EXTERNAL", ctx(CPS)).step(b"a\x00b")
    assert isinstance(result, Failure) and result.malformed
    assert audit.results == ["malformed"]
