"""Certificate checks outside the handshake (issuer, validity, CRL), on the dev PKI."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from conftest import PkiBundle
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mssd.trust import pki
from mssd.trust.verify import (
    CertificateRejected,
    TrustFiles,
    TrustMaterial,
    load_material,
    verify_certificate,
)


def der(cert: pki.IssuedCertificate) -> bytes:
    return x509.load_pem_x509_certificate(cert.cert.read_bytes()).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def revoked(test_pki: PkiBundle) -> pki.IssuedCertificate:
    cert = pki.issue_server_certificate(
        test_pki.dev,
        common_name="mx.revoque.mssd.test",
        idnat_struct="1750000009",
        organisation="Revoque",
        name="verify-revoked",
    )
    pki.revoke(test_pki.dev, cert.cert)
    return cert


def test_the_most_recent_crl_of_an_issuer_decides(test_pki: PkiBundle) -> None:
    cert = pki.issue_server_certificate(
        test_pki.dev,
        common_name="mx.revoque-tard.mssd.test",
        idnat_struct="1750000019",
        organisation="Revoque tard",
        name="verify-revoked-later",
    )
    before = test_pki.dev.crl.read_bytes()
    pki.revoke(test_pki.dev, cert.cert)
    after = test_pki.dev.crl.read_bytes()
    ca = test_pki.dev.ca_bundle.read_bytes()
    # An old CRL left in the file beside the new one, before or after it.
    for crls in (before + after, after + before):
        with pytest.raises(CertificateRejected) as caught:
            verify_certificate(der(cert), load_material(ca, crls))
        assert caught.value.reason == "revoked"
    verify_certificate(der(cert), load_material(ca, before))


def material(test_pki: PkiBundle, *, crl: bool = True) -> TrustMaterial:
    return load_material(
        test_pki.dev.ca_bundle.read_bytes(), test_pki.dev.crl.read_bytes() if crl else None
    )


def test_issued_valid_and_not_revoked(test_pki: PkiBundle) -> None:
    cert = verify_certificate(der(test_pki.app), material(test_pki))
    assert cert.serial_number == test_pki.app.serial


def test_revoked_and_without_crl_checking(
    test_pki: PkiBundle, revoked: pki.IssuedCertificate
) -> None:
    with pytest.raises(CertificateRejected) as caught:
        verify_certificate(der(revoked), material(test_pki))
    assert caught.value.reason == "revoked"
    # No CRL file configured: revocation is not checked.
    verify_certificate(der(revoked), material(test_pki, crl=False))


@pytest.mark.parametrize(
    ("days", "crls", "message"),
    [
        (0, b"", "no current CRL of its issuer"),
        (60, None, "no current CRL of its issuer"),  # the dev CRLs live 30 days
        (1000, None, "not now"),  # the certificate lives 825 days
    ],
)
def test_untrusted(test_pki: PkiBundle, days: int, crls: bytes | None, message: str) -> None:
    crl_pem = test_pki.dev.crl.read_bytes() if crls is None else crls
    loaded = load_material(test_pki.dev.ca_bundle.read_bytes(), crl_pem)
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(days=days)
    with pytest.raises(CertificateRejected, match=message) as caught:
        verify_certificate(der(test_pki.app), loaded, now=moment)
    assert caught.value.reason == "untrusted"


def test_issuer_must_be_in_the_file(test_pki: PkiBundle) -> None:
    only_org = load_material(test_pki.dev.org_ca.read_bytes(), test_pki.dev.crl.read_bytes())
    verify_certificate(der(test_pki.app), only_org)
    with pytest.raises(CertificateRejected, match="not one of the CAs trusted"):
        verify_certificate(der(test_pki.personal), only_org)
    with pytest.raises(CertificateRejected) as caught:
        verify_certificate(b"not a certificate", only_org)
    assert caught.value.reason == "unreadable"


def test_files_are_read_again_when_they_change(test_pki: PkiBundle, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_bytes(test_pki.dev.crl.read_bytes())
    files = TrustFiles(test_pki.dev.ca_bundle, crl)
    files.verify(der(test_pki.app))
    crl.write_bytes(b"")  # an empty CRL file: no issuer has a CRL any more
    with pytest.raises(CertificateRejected, match="no current CRL"):
        files.verify(der(test_pki.app))


def test_broken_files_keep_the_last_material_and_say_so_once(
    test_pki: PkiBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_bytes(test_pki.dev.crl.read_bytes())
    files = TrustFiles(test_pki.dev.ca_bundle, crl)
    assert (
        files.verify(der(test_pki.app)).subject
        == x509.load_pem_x509_certificate(test_pki.app.cert.read_bytes()).subject
    )
    crl.write_bytes(b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
    with caplog.at_level("WARNING", logger="mssd.trust.verify"):
        for _ in range(3):
            files.verify(der(test_pki.app))  # the CRL read before still answers
    warnings = [r for r in caplog.records if "cannot re-read" in r.getMessage()]
    assert len(warnings) == 1
    assert str(crl) in warnings[0].getMessage()
