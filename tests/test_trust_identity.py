"""DN strings (RFC 4514), their canonical form, and the identities certificates carry."""

from __future__ import annotations

import re
from xml.sax.saxutils import unescape

import pytest
from conftest import FIXTURES, unavailable
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID, ObjectIdentifier

from mssd.trust.identity import (
    DnError,
    identity_from_certificate,
    identity_from_der,
    normalise_dn,
    parse_dn,
)
from mssd.trust.pki import DevPki, init_dev_pki, issue_app_certificate, issue_personal_certificate

WHITELIST = FIXTURES / "whitelist" / "listeblanchemssante-2025-03-13.xml"
MIPIH = "CN=medimail-asip.mipih.fr,OU=318310021300028,O=GIP MIPIH,ST=Haute-Garonne (31),C=FR"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("pki") / "dev")


def _values(name: x509.Name) -> list[list[tuple[ObjectIdentifier, str | bytes]]]:
    return [[(a.oid, a.value) for a in rdn] for rdn in name.rdns]


def test_whitelist_dn_parses_into_certificate_order() -> None:
    name = parse_dn(MIPIH)
    assert _values(name) == [
        [(NameOID.COUNTRY_NAME, "FR")],
        [(NameOID.STATE_OR_PROVINCE_NAME, "Haute-Garonne (31)")],
        [(NameOID.ORGANIZATION_NAME, "GIP MIPIH")],
        [(NameOID.ORGANIZATIONAL_UNIT_NAME, "318310021300028")],
        [(NameOID.COMMON_NAME, "medimail-asip.mipih.fr")],
    ]
    assert name.rfc4514_string() == MIPIH


@pytest.mark.parametrize(
    ("text", "oid", "value"),
    [
        ("cn=x", NameOID.COMMON_NAME, "x"),
        ("GIVENNAME=Anne", NameOID.GIVEN_NAME, "Anne"),
        ("gn=Anne", NameOID.GIVEN_NAME, "Anne"),
        ("SURNAME=Roy", NameOID.SURNAME, "Roy"),
        ("sn=Roy", NameOID.SURNAME, "Roy"),
        ("title=Infirmier", NameOID.TITLE, "Infirmier"),
        ("2.5.4.12=Infirmier", NameOID.TITLE, "Infirmier"),
        ("OID.2.5.4.12=Infirmier", NameOID.TITLE, "Infirmier"),
        ("SERIALNUMBER=42", NameOID.SERIAL_NUMBER, "42"),
        ("EMAILADDRESS=a@b.fr", NameOID.EMAIL_ADDRESS, "a@b.fr"),
        ("E=a@b.fr", NameOID.EMAIL_ADDRESS, "a@b.fr"),
        ("DC=fr", NameOID.DOMAIN_COMPONENT, "fr"),
        ("UID=jdoe", NameOID.USER_ID, "jdoe"),
        ("L=Paris (75)", NameOID.LOCALITY_NAME, "Paris (75)"),
        (r"CN=a\,b\+c\"d\\e\#f", NameOID.COMMON_NAME, 'a,b+c"d\\e#f'),
        (r"CN=\#lead", NameOID.COMMON_NAME, "#lead"),
        (r"CN=\C3\A9l\C3\A8ve", NameOID.COMMON_NAME, "élève"),
        (r"CN=\ padded\ ", NameOID.COMMON_NAME, " padded "),
        ("CN=#0c03616263", NameOID.COMMON_NAME, "abc"),
        ("CN=#1e0400e90041", NameOID.COMMON_NAME, "éA"),
        ("CN=a=b", NameOID.COMMON_NAME, "a=b"),
        ('O="C.H. DE  CADILLAC"', NameOID.ORGANIZATION_NAME, "C.H. DE  CADILLAC"),
        ('O=CRLCC "PAUL STRAUSS"', NameOID.ORGANIZATION_NAME, 'CRLCC "PAUL STRAUSS"'),
    ],
)
def test_parse_dn_reads_attribute_names_escapes_and_hex_values(
    text: str, oid: ObjectIdentifier, value: str
) -> None:
    assert _values(parse_dn(text)) == [[(oid, value)]]


def test_parse_dn_reads_multi_valued_rdns_and_spaces_around_separators() -> None:
    name = parse_dn(" SN = Dupont + CN=810001234567+GN=Jean ,  title=Médecin ; C=FR ")
    assert _values(name) == [
        [(NameOID.COUNTRY_NAME, "FR")],
        [(NameOID.TITLE, "Médecin")],
        [
            (NameOID.SURNAME, "Dupont"),
            (NameOID.COMMON_NAME, "810001234567"),
            (NameOID.GIVEN_NAME, "Jean"),
        ],
    ]


def test_parse_dn_of_empty_string_is_the_empty_dn() -> None:
    assert parse_dn("") == x509.Name([])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("CN", "expected '='"),
        ("=x", "expected an attribute type"),
        ("CN=a,", "expected an attribute type"),
        ("XYZ=1", "unknown attribute type 'XYZ'"),
        ("1.x=1", "not a dotted OID"),
        ("CN=a\\", "dangling backslash"),
        ("CN=\\C3", "valid UTF-8"),
        ("CN=#0c05ab", "length does not match"),
        ("CN=#0c0", "even"),
        ("CN=#0500", "unsupported ASN.1 tag"),
        ('O="open', "unterminated quoted value"),
        ('O="a"b', "unexpected 'b'"),
        ("C=FRA", "bad value for C"),
        ("CN=a+CN=a", "duplicate"),
    ],
)
def test_parse_dn_rejects_malformed_strings_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(DnError, match=re.escape(reason)):
        parse_dn(text)


def test_dn_error_is_a_value_error() -> None:
    assert issubclass(DnError, ValueError)


@pytest.mark.parametrize(
    "variant",
    [
        MIPIH,
        "cn=medimail-asip.mipih.fr, ou=318310021300028, o=GIP MIPIH, st=Haute-Garonne (31), c=FR",
        "CN=MEDIMAIL-ASIP.MIPIH.FR,OU=318310021300028,O=gip  mipih ,ST=haute-garonne (31),C=fr",
        'CN=medimail-asip.mipih.fr;OU=318310021300028;O="GIP   MIPIH";ST=Haute-Garonne (31);C=FR',
        "2.5.4.3=medimail-asip.mipih.fr,2.5.4.11=318310021300028,O=GIP MIPIH,"
        "S=Haute-Garonne (31),C=#13024652",
    ],
)
def test_equivalent_dns_normalise_equal(variant: str) -> None:
    assert normalise_dn(variant) == normalise_dn(MIPIH)


def test_normalised_form_is_short_names_folded_values_sorted_multi_values() -> None:
    assert normalise_dn(MIPIH) == (
        "CN=medimail-asip.mipih.fr,OU=318310021300028,O=gip mipih,ST=haute-garonne (31),C=fr"
    )
    a = normalise_dn("SN=Dupont+CN=810001234567+GN=Jean,TITLE=Médecin,C=FR")
    b = normalise_dn("gn=JEAN+ sn=DUPONT +cn=810001234567, 2.5.4.12=MÉDECIN, c=fr")
    assert a == b == "CN=810001234567+SN=dupont+GN=jean,TITLE=médecin,C=fr"


def test_normalised_values_are_escaped_per_rfc4514() -> None:
    assert normalise_dn(r"CN=a\,b\+c\;d\<e\>f\"g\\h,O=\#x") == (r"CN=a\,b\+c\;d\<e\>f\"g\\h,O=\#x")
    assert parse_dn(normalise_dn(r"CN=a\,b\+c")) == parse_dn(r"CN=a\,b\+c")


@pytest.mark.parametrize(
    "different",
    [
        "CN=medimail-asip.mipih.fr,OU=318310021300029,O=GIP MIPIH,ST=Haute-Garonne (31),C=FR",
        "OU=318310021300028,CN=medimail-asip.mipih.fr,O=GIP MIPIH,ST=Haute-Garonne (31),C=FR",
        "CN=medimail-asip.mipih.fr,OU=318310021300028,O=GIPMIPIH,ST=Haute-Garonne (31),C=FR",
        "CN=medimail-asip.mipih.fr+OU=318310021300028,O=GIP MIPIH,ST=Haute-Garonne (31),C=FR",
        "CN=medimail-asip.mipih.fr,OU=318310021300028,O=GIP MIPIH,L=Haute-Garonne (31),C=FR",
    ],
)
def test_different_dns_do_not_normalise_equal(different: str) -> None:
    assert normalise_dn(different) != normalise_dn(MIPIH)


def test_every_whitelist_operator_dn_parses_and_normalises_idempotently() -> None:
    # The ANS file is read as text: it is only searched for one element, never expanded.
    if not WHITELIST.exists():
        unavailable(f"the shared fixtures are not beside the project ({WHITELIST})")
    text = WHITELIST.read_text("utf-8")
    dns = {
        unescape(m.group(1), {"&quot;": '"', "&apos;": "'"})
        for m in re.finditer(r"<DNCertificatOperateur>([^<]*)</DNCertificatOperateur>", text)
    }
    assert len(dns) > 300
    for dn in dns:
        once = normalise_dn(dn)
        assert normalise_dn(once) == once, dn
        assert parse_dn(dn).get_attributes_for_oid(NameOID.COMMON_NAME), dn
    # The same operator written two ways in the file is one operator.
    assert normalise_dn(
        "CN=mss.ch-cadillac.fr,OU=1330781295,O=C.H. DE CADILLAC,ST=Gironde (33),C=FR"
    ) in {normalise_dn(dn) for dn in dns}


def test_normalise_agrees_with_cryptography_printing_of_certificate_names(pki: DevPki) -> None:
    issued = issue_personal_certificate(
        pki,
        idnat_ps="810001234567",
        surname="Lefèvre",
        given_name="Anne-Sophie",
        profession="Sage-Femme",
        name="anne",
    )
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    # rfc4514_string() prints SN, GN and title as dotted OIDs; they must read back the same.
    assert normalise_dn(cert.subject.rfc4514_string()) == normalise_dn(cert.subject)
    assert normalise_dn(issued.subject_dn) == normalise_dn(cert.subject)


def test_personal_certificate_identity_gives_idnat_ps_and_names(pki: DevPki) -> None:
    issued = issue_personal_certificate(
        pki,
        idnat_ps="810009876543",
        surname="Durand",
        given_name="Paul",
        profession="Pharmacien",
        name="paul",
    )
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    identity = identity_from_der(cert.public_bytes(serialization.Encoding.DER))
    assert identity.idnat_ps == "810009876543"
    assert identity.common_name == "810009876543"
    assert identity.surname == "Durand"
    assert identity.given_name == "Paul"
    assert identity.title == "Pharmacien"
    assert identity.idnat_struct is None
    assert identity.serial == issued.serial
    assert identity.not_after == cert.not_valid_after_utc
    assert identity.subject_dn == normalise_dn(issued.subject_dn)
    assert identity.issuer_dn == "CN=mssd dev igc-sante personnes,O=mssd development operator,C=fr"


def test_organisation_certificate_identity_gives_idnat_struct(pki: DevPki) -> None:
    issued = issue_app_certificate(
        pki,
        common_name="sil.labo.test",
        idnat_struct="1690000001",
        organisation="Laboratoire",
        name="sil",
    )
    identity = identity_from_certificate(x509.load_pem_x509_certificate(issued.cert.read_bytes()))
    assert identity.idnat_struct == "1690000001"
    assert identity.idnat_ps is None
    assert identity.common_name == "sil.labo.test"
    server = identity_from_certificate(x509.load_pem_x509_certificate(pki.server_cert.read_bytes()))
    assert server.idnat_struct == "1750000000"
    assert server.subject_dn == "CN=localhost,OU=1750000000,O=mssd development operator,C=fr"


def test_identity_from_der_rejects_non_certificates() -> None:
    with pytest.raises(DnError, match=r"not a DER X\.509 certificate"):
        identity_from_der(b"\x30\x03\x02\x01\x00")
