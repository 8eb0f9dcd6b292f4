"""The development PKI: a certificate hierarchy shaped like IGC-Santé, for tests and local runs.

This module owns the files of one PKI directory (``mssd pki init`` creates it under ``certs/``):

    root-ca.pem/.key       self-signed root
    org-ca.pem/.key        intermediate for organisation, server and application certificates
    personal-ca.pem/.key   intermediate for CPS-style personal certificates
    ca-bundle.pem          root + both intermediates: what listeners trust for client certificates
    server.pem/.key        the operator's server certificate (+ org CA), also used as TLS client
    crl.pem                one CRL per CA, concatenated
    revoked.json           revoked serials per CA, so regenerated CRLs keep earlier revocations
    issued/<name>.pem/.key certificates issued later (personal, application)

It must never be used as a production PKI: production certificates come from IGC-Santé, and
mssd only reads them. Private keys are created 0600 before any byte is written, in a 0700
directory, and every file is replaced atomically (temporary file + ``os.replace``).

Keys are RSA 2048 with SHA-256 signatures: the MSSanté TLS 1.2 suites are all ECDHE-RSA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mssd.files import write_atomic
from mssd.trust.idnat import IdNatError, check_idnat_ps, check_idnat_struct


class PkiError(Exception):
    """The PKI directory or a request to it is not usable; the message says what to do."""


@dataclass(frozen=True)
class DevPki:
    """Paths of a development PKI (see the module docstring for what each file is)."""

    directory: Path
    root_ca: Path
    org_ca: Path
    personal_ca: Path
    ca_bundle: Path
    server_cert: Path
    server_key: Path
    crl: Path


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate issued by the development PKI.

    ``cert`` holds the leaf followed by its issuing CA (ready for ``load_cert_chain``);
    ``subject_dn`` is the RFC 4514 string of the subject.
    """

    cert: Path
    key: Path
    subject_dn: str
    serial: int


CaName = Literal["root", "org", "personal"]
_CA_NAMES: tuple[CaName, ...] = ("root", "org", "personal")
_REVOCATIONS = "revoked.json"
_ISSUED = "issued"
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")

# Names rfc4514_string() would otherwise print as dotted OIDs (it only knows RFC 4514 §3's list).
_READABLE_NAMES = {
    NameOID.SURNAME: "SN",
    NameOID.GIVEN_NAME: "GN",
    NameOID.TITLE: "TITLE",
}

_KEY_SIZE = 2048
_CA_LIFETIME = dt.timedelta(days=3650)
_LEAF_LIFETIME = dt.timedelta(days=825)
_CRL_LIFETIME = dt.timedelta(days=30)
# Certificates start an hour in the past so that small clock differences between the
# machine that made the PKI and the one using it do not make them "not yet valid".
_BACKDATE = dt.timedelta(hours=1)


def _paths(directory: Path) -> DevPki:
    return DevPki(
        directory=directory,
        root_ca=directory / "root-ca.pem",
        org_ca=directory / "org-ca.pem",
        personal_ca=directory / "personal-ca.pem",
        ca_bundle=directory / "ca-bundle.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        crl=directory / "crl.pem",
    )


def _ca_cert_path(pki: DevPki, ca: CaName) -> Path:
    return {"root": pki.root_ca, "org": pki.org_ca, "personal": pki.personal_ca}[ca]


def _ca_key_path(pki: DevPki, ca: CaName) -> Path:
    return _ca_cert_path(pki, ca).with_suffix(".key")


def _all_files(pki: DevPki) -> list[Path]:
    files = [pki.ca_bundle, pki.server_cert, pki.server_key, pki.crl]
    files += [p for ca in _CA_NAMES for p in (_ca_cert_path(pki, ca), _ca_key_path(pki, ca))]
    files.append(pki.directory / _REVOCATIONS)
    return files


# --- files ---------------------------------------------------------------------------------------


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, pem, mode=0o600)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read certificate {path}: {exc}") from exc


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PkiError(f"{path} is not an RSA private key")
    return key


# --- certificate building ------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_KEY_SIZE)


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _builder(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Certificate | None,
    lifetime: dt.timedelta,
) -> x509.CertificateBuilder:
    now = _now()
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        # RFC 5280 §4.2.1.2: subject key identifier in every certificate.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if issuer is not None:
        # RFC 5280 §4.2.1.1: authority key identifier = issuer's subject key identifier.
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    else:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(public)
    return builder.add_extension(aki, critical=False)


def _key_usage(*, digital_signature: bool, key_encipherment: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(
    subject: x509.Name,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _new_key()
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    builder = (
        _builder(subject, key, issuer_cert, _CA_LIFETIME)
        # RFC 5280 §4.2.1.9: CAs carry a critical basicConstraints; intermediates issue leaves only.
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0),
            critical=True,
        )
        # RFC 5280 §4.2.1.3: keyCertSign and cRLSign for a CA that signs certificates and CRLs.
        .add_extension(
            _key_usage(digital_signature=False, key_encipherment=False, ca=True), critical=True
        )
    )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _leaf_extensions(builder: x509.CertificateBuilder, *, server: bool) -> x509.CertificateBuilder:
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        # Operators present the same certificate as client when relaying to another operator
        # (mutual TLS on port 25), so server certificates carry both purposes.
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    return (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_encipherment=server, ca=False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )


# --- CRLs ----------------------------------------------------------------------------------------


_Revocations = dict[CaName, dict[str, str]]  # CA name -> {decimal serial: ISO revocation date}


def _read_revocations(directory: Path) -> tuple[int, _Revocations]:
    path = directory / _REVOCATIONS
    try:
        data = json.loads(path.read_text("utf-8"))
        number = int(data["crl_number"])
        revoked = {ca: {str(k): str(v) for k, v in data["revoked"][ca].items()} for ca in _CA_NAMES}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PkiError(f"cannot read revocation list {path}: {exc}") from exc
    return number, revoked


def _write_crls(pki: DevPki, number: int, revoked: _Revocations) -> None:
    """Sign one CRL per CA with ``number`` and the recorded revocations; rewrite crl.pem."""
    now = _now()
    pems: list[bytes] = []
    for ca in _CA_NAMES:
        ca_cert = _load_cert(_ca_cert_path(pki, ca))
        ca_key = _load_key(_ca_key_path(pki, ca))
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + _CRL_LIFETIME)
            # RFC 5280 §5.2.3: conforming CRL issuers include a CRL number; §5.2.1 the AKI.
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
        )
        for serial, when in sorted(revoked[ca].items()):
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial))
                .revocation_date(dt.datetime.fromisoformat(when))
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(ca_key, hashes.SHA256())
        pems.append(crl.public_bytes(serialization.Encoding.PEM))
    record = {"crl_number": number, "revoked": revoked}
    write_atomic(
        pki.directory / _REVOCATIONS,
        json.dumps(record, indent=2, sort_keys=True).encode("utf-8"),
        mode=0o644,
    )
    write_atomic(pki.crl, b"".join(pems), mode=0o644)


# --- public API ----------------------------------------------------------------------------------


def init_dev_pki(
    directory: Path,
    *,
    hostnames: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    operator_structure: str = "1750000000",
    organisation: str = "mssd development operator",
    force: bool = False,
) -> DevPki:
    """Create the development PKI in ``directory``, or return the one already there.

    An existing complete PKI is returned untouched unless ``force``; a partial one is an error
    (remove the directory or pass ``force``). ``force`` replaces every file, including the
    revocation list, and deletes previously issued certificates, which the new CAs would not
    verify anyway. ``operator_structure`` is the operator's idNat_Struct, the ``OU`` of its
    server certificate as in IGC-Santé ORG certificates.
    """
    pki = _paths(Path(directory))
    present = [p for p in _all_files(pki) if p.exists()]
    if not force and present:
        if len(present) == len(_all_files(pki)):
            return pki
        missing = sorted(p.name for p in _all_files(pki) if not p.exists())
        raise PkiError(
            f"{pki.directory} holds an incomplete PKI (missing {', '.join(missing)}); "
            "remove the directory or re-create it with force"
        )
    if not hostnames:
        raise PkiError("the server certificate needs at least one hostname")
    try:
        check_idnat_struct(operator_structure)
    except IdNatError as exc:
        raise PkiError(f"operator_structure: {exc}") from exc
    try:
        ips = [ipaddress.ip_address(address) for address in ip_addresses]
    except ValueError as exc:
        raise PkiError(f"ip_addresses: {exc}") from exc
    # x509.DNSName takes A-labels; the idna codec is enough for development names.
    dns_names = [h if h.isascii() else h.encode("idna").decode("ascii") for h in hostnames]

    if not pki.directory.exists():
        pki.directory.mkdir(parents=True, mode=0o700)
        os.chmod(pki.directory, 0o700)  # mkdir's mode is filtered by the umask
    if force:
        shutil.rmtree(pki.directory / _ISSUED, ignore_errors=True)

    base = (NameOID.COUNTRY_NAME, "FR"), (NameOID.ORGANIZATION_NAME, organisation)
    root, root_key = _make_ca(
        _name(*base, (NameOID.COMMON_NAME, "mssd dev IGC-Sante Racine")), None
    )
    org, org_key = _make_ca(
        _name(*base, (NameOID.COMMON_NAME, "mssd dev IGC-Sante Organisations")), (root, root_key)
    )
    personal, personal_key = _make_ca(
        _name(*base, (NameOID.COMMON_NAME, "mssd dev IGC-Sante Personnes")), (root, root_key)
    )

    server_key = _new_key()
    server_subject = _name(
        *base,
        (NameOID.ORGANIZATIONAL_UNIT_NAME, operator_structure),
        (NameOID.COMMON_NAME, dns_names[0]),
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(h) for h in dns_names]
    alt_names += [x509.IPAddress(ip) for ip in ips]
    server = _leaf_extensions(
        _builder(server_subject, server_key, org, _LEAF_LIFETIME), server=True
    ).add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    server_cert = server.sign(org_key, hashes.SHA256())

    authorities: tuple[tuple[CaName, x509.Certificate, rsa.RSAPrivateKey], ...] = (
        ("root", root, root_key),
        ("org", org, org_key),
        ("personal", personal, personal_key),
    )
    for ca, cert, key in authorities:
        _write_key(_ca_key_path(pki, ca), key)
        write_atomic(_ca_cert_path(pki, ca), _pem(cert), mode=0o644)
    _write_key(pki.server_key, server_key)
    write_atomic(pki.server_cert, _pem(server_cert, org), mode=0o644)
    write_atomic(pki.ca_bundle, _pem(root, org, personal), mode=0o644)
    _write_crls(pki, 1, {ca: {} for ca in _CA_NAMES})
    return pki


def _issue(
    pki: DevPki,
    *,
    ca: CaName,
    subject: x509.Name,
    name: str,
    server_names: Sequence[str] | None = None,
) -> IssuedCertificate:
    if not _SAFE_NAME.fullmatch(name):
        raise PkiError(f"certificate name {name!r} must match [A-Za-z0-9._-]+")
    issued = pki.directory / _ISSUED
    cert_path, key_path = issued / f"{name}.pem", issued / f"{name}.key"
    if cert_path.exists() or key_path.exists():
        raise PkiError(f"a certificate named {name!r} already exists in {issued}")
    ca_cert = _load_cert(_ca_cert_path(pki, ca))
    ca_key = _load_key(_ca_key_path(pki, ca))
    key = _new_key()
    builder = _leaf_extensions(
        _builder(subject, key, ca_cert, _LEAF_LIFETIME), server=server_names is not None
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in server_names]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    issued.mkdir(mode=0o700, exist_ok=True)
    _write_key(key_path, key)
    write_atomic(cert_path, _pem(cert, ca_cert), mode=0o644)
    return IssuedCertificate(
        cert=cert_path,
        key=key_path,
        subject_dn=subject.rfc4514_string(_READABLE_NAMES),
        serial=cert.serial_number,
    )


def issue_personal_certificate(
    pki: DevPki,
    *,
    idnat_ps: str,
    surname: str,
    given_name: str,
    profession: str,
    name: str,
    organisation: str = "mssd development practice",
    organisational_unit: str | None = None,
) -> IssuedCertificate:
    """Issue a CPS-style personal certificate (TLS client authentication) from the personal CA.

    Like IGC-Santé personal certificates, the most specific RDN is multi-valued:
    ``SN=<surname> + CN=<idNat_PS> + GN=<given name>``, below ``title=<profession>``.
    """
    try:
        check_idnat_ps(idnat_ps)
    except IdNatError as exc:
        raise PkiError(str(exc)) from exc
    rdns = [
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")]),
        x509.RelativeDistinguishedName(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)]
        ),
    ]
    if organisational_unit is not None:
        unit = x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organisational_unit)
        rdns.append(x509.RelativeDistinguishedName([unit]))
    rdns.append(x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.TITLE, profession)]))
    rdns.append(
        x509.RelativeDistinguishedName(
            [
                x509.NameAttribute(NameOID.SURNAME, surname),
                x509.NameAttribute(NameOID.COMMON_NAME, idnat_ps),
                x509.NameAttribute(NameOID.GIVEN_NAME, given_name),
            ]
        )
    )
    return _issue(pki, ca="personal", subject=x509.Name(rdns), name=name)


def issue_app_certificate(
    pki: DevPki,
    *,
    common_name: str,
    idnat_struct: str,
    organisation: str,
    name: str,
) -> IssuedCertificate:
    """Issue an organisation certificate (APP mailboxes, lab software) from the org CA."""
    try:
        check_idnat_struct(idnat_struct)
    except IdNatError as exc:
        raise PkiError(str(exc)) from exc
    subject = _name(
        (NameOID.COUNTRY_NAME, "FR"),
        (NameOID.ORGANIZATION_NAME, organisation),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, idnat_struct),
        (NameOID.COMMON_NAME, common_name),
    )
    return _issue(pki, ca="org", subject=subject, name=name)


def issue_server_certificate(
    pki: DevPki,
    *,
    common_name: str,
    idnat_struct: str,
    organisation: str,
    name: str,
    locality: str | None = None,
) -> IssuedCertificate:
    """Issue an operator server certificate (server and client authentication) from the org
    CA, shaped like IGC-Santé ORG server certificates: ``CN=<host>,OU=<idNat_Struct>,O=...``
    (with ``ST=``, or ``L=`` when ``locality`` is given, as some whitelist entries have).
    Other operators of a test trust space present it on port 25."""
    try:
        check_idnat_struct(idnat_struct)
    except IdNatError as exc:
        raise PkiError(str(exc)) from exc
    place = (NameOID.LOCALITY_NAME, locality) if locality else None
    attributes = [(NameOID.COUNTRY_NAME, "FR")] + ([place] if place else [])
    attributes += [
        (NameOID.ORGANIZATION_NAME, organisation),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, idnat_struct),
        (NameOID.COMMON_NAME, common_name),
    ]
    host = common_name if common_name.isascii() else common_name.encode("idna").decode("ascii")
    return _issue(pki, ca="org", subject=_name(*attributes), name=name, server_names=[host])


def revoke(pki: DevPki, cert_path: Path) -> None:
    """Revoke the certificate in ``cert_path`` (its first PEM block) and re-sign the CRLs.

    Listeners read crl.pem when their TLS context is built: rebuild the context afterwards.
    """
    cert = _load_cert(cert_path)
    for ca in _CA_NAMES:
        ca_cert = _load_cert(_ca_cert_path(pki, ca))
        if ca_cert.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            continue
        number, revoked = _read_revocations(pki.directory)
        revoked[ca].setdefault(str(cert.serial_number), _now().replace(microsecond=0).isoformat())
        _write_crls(pki, number + 1, revoked)
        return
    raise PkiError(f"{cert_path} was not issued by a CA of {pki.directory}")
