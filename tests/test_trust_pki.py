"""The development PKI: layout, certificate shapes, key protection, idempotence, revocation."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mssd.trust.pki import (
    DevPki,
    PkiError,
    init_dev_pki,
    issue_app_certificate,
    issue_personal_certificate,
    revoke,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(
        tmp_path_factory.mktemp("pki") / "dev",
        hostnames=("mail.mssd.test", "localhost"),
        operator_structure="1750000000",
        organisation="Opérateur de test",
    )


def _certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _crls(path: Path) -> list[x509.CertificateRevocationList]:
    blocks = path.read_bytes().split(b"-----END X509 CRL-----")
    return [
        x509.load_pem_x509_crl(block + b"-----END X509 CRL-----\n")
        for block in blocks
        if block.strip()
    ]


def test_private_keys_are_readable_by_their_owner_only(pki: DevPki) -> None:
    issued = issue_app_certificate(
        pki, common_name="lab", idnat_struct="1750000001", organisation="Labo", name="mode-check"
    )
    keys = [*sorted(pki.directory.glob("*.key")), issued.key]
    assert len(keys) == 5  # three CAs, the server, the issued certificate
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(pki.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(issued.key.parent.stat().st_mode) == 0o700


def test_init_returns_the_existing_pki_without_regenerating(pki: DevPki) -> None:
    before = {p.name: p.read_bytes() for p in pki.directory.iterdir() if p.is_file()}
    again = init_dev_pki(pki.directory, hostnames=("other.test",))
    assert again == pki
    after = {p.name: p.read_bytes() for p in pki.directory.iterdir() if p.is_file()}
    assert after == before


def test_partial_pki_is_refused_and_force_rebuilds_it(pki: DevPki, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(pki.directory, copy, ignore=shutil.ignore_patterns("issued"))
    (copy / "org-ca.key").unlink()
    with pytest.raises(PkiError, match=r"incomplete PKI \(missing org-ca\.key\)"):
        init_dev_pki(copy)
    old_root = (copy / "root-ca.pem").read_bytes()
    rebuilt = init_dev_pki(copy, force=True)
    assert rebuilt.org_ca.with_suffix(".key").exists()
    assert rebuilt.root_ca.read_bytes() != old_root


def test_server_certificate_is_shaped_like_an_igc_sante_org_certificate(pki: DevPki) -> None:
    leaf, issuer = _certs(pki.server_cert)
    assert leaf.subject.rfc4514_string() == (
        "CN=mail.mssd.test,OU=1750000000,O=Opérateur de test,C=FR"
    )
    assert issuer.subject == _certs(pki.org_ca)[0].subject
    leaf.verify_directly_issued_by(issuer)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.mssd.test", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)


def test_ca_hierarchy_has_one_root_and_two_intermediates(pki: DevPki) -> None:
    (root,) = _certs(pki.root_ca)
    root.verify_directly_issued_by(root)
    for path in (pki.org_ca, pki.personal_ca):
        (ca,) = _certs(path)
        ca.verify_directly_issued_by(root)
        aki = ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == root_ski.digest
    for ca in [root, *_certs(pki.org_ca), *_certs(pki.personal_ca)]:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical and constraints.value.ca
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign and usage.crl_sign
        assert ca.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "FR"
    bundle = [c.subject for c in _certs(pki.ca_bundle)]
    assert bundle == [_certs(p)[0].subject for p in (pki.root_ca, pki.org_ca, pki.personal_ca)]


def test_personal_certificate_carries_a_multi_valued_cps_rdn(pki: DevPki) -> None:
    issued = issue_personal_certificate(
        pki,
        idnat_ps="810001234567",
        surname="Martin",
        given_name="Claire",
        profession="Médecin",
        name="claire.martin",
        organisational_unit="1750000001",
    )
    leaf, issuer = _certs(issued.cert)
    assert issuer.subject == _certs(pki.personal_ca)[0].subject
    leaf.verify_directly_issued_by(issuer)
    last = leaf.subject.rdns[-1]
    assert {(a.oid, a.value) for a in last} == {
        (NameOID.SURNAME, "Martin"),
        (NameOID.COMMON_NAME, "810001234567"),
        (NameOID.GIVEN_NAME, "Claire"),
    }
    assert leaf.subject.get_attributes_for_oid(NameOID.TITLE)[0].value == "Médecin"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert issued.serial == leaf.serial_number
    assert issued.subject_dn.startswith("SN=Martin+CN=810001234567+GN=Claire,TITLE=Médecin,")


def test_personal_certificate_needs_a_valid_idnat_ps(pki: DevPki) -> None:
    with pytest.raises(PkiError, match="not an idNat_PS"):
        issue_personal_certificate(
            pki, idnat_ps="12345", surname="X", given_name="Y", profession="Z", name="bad-ps"
        )


def test_app_certificate_is_issued_by_the_organisation_ca(pki: DevPki) -> None:
    issued = issue_app_certificate(
        pki,
        common_name="sil.labo.test",
        idnat_struct="312345678900012",
        organisation="Laboratoire de test",
        name="labo",
    )
    leaf, issuer = _certs(issued.cert)
    assert issuer.subject == _certs(pki.org_ca)[0].subject
    assert issued.subject_dn == "CN=sil.labo.test,OU=312345678900012,O=Laboratoire de test,C=FR"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(PkiError, match="not an idNat_Struct"):
        issue_app_certificate(
            pki, common_name="x", idnat_struct="999", organisation="x", name="bad-struct"
        )


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "with space", "é"])
def test_issued_certificate_names_cannot_leave_the_issued_directory(pki: DevPki, name: str) -> None:
    with pytest.raises(PkiError, match="must match"):
        issue_app_certificate(
            pki, common_name="x", idnat_struct="1750000001", organisation="x", name=name
        )


def test_issuing_twice_under_one_name_is_refused(pki: DevPki) -> None:
    issue_app_certificate(
        pki, common_name="a", idnat_struct="1750000001", organisation="x", name="twice"
    )
    with pytest.raises(PkiError, match="already exists"):
        issue_app_certificate(
            pki, common_name="b", idnat_struct="1750000001", organisation="x", name="twice"
        )


def test_revocations_accumulate_in_the_issuing_ca_crl(pki: DevPki) -> None:
    first = issue_personal_certificate(
        pki, idnat_ps="810000000011", surname="A", given_name="B", profession="C", name="rev1"
    )
    second = issue_personal_certificate(
        pki, idnat_ps="810000000012", surname="A", given_name="B", profession="C", name="rev2"
    )
    revoke(pki, first.cert)
    revoke(pki, second.cert)
    revoke(pki, second.cert)  # revoking again changes nothing
    crls = {crl.issuer: crl for crl in _crls(pki.crl)}
    cas = {p.name: _certs(p)[0] for p in (pki.root_ca, pki.org_ca, pki.personal_ca)}
    assert set(crls) == {ca.subject for ca in cas.values()}
    personal = crls[cas["personal-ca.pem"].subject]
    assert {entry.serial_number for entry in personal} == {first.serial, second.serial}
    assert personal.is_signature_valid(cas["personal-ca.pem"].public_key())  # type: ignore[arg-type]
    assert len(list(crls[cas["org-ca.pem"].subject])) == 0
    assert personal.next_update_utc is not None and personal.last_update_utc is not None
    lifetime = personal.next_update_utc - personal.last_update_utc
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=31)


def test_revoking_a_foreign_certificate_is_refused(pki: DevPki, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "stranger.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match="was not issued by a CA"):
        revoke(pki, path)
