"""Certificate identities and distinguished names (RFC 4514 strings, RFC 4518 matching).

This module owns two things:

- reading DN strings (the whitelist's ``DNCertificatOperateur``, configuration, the command
  line) into ``x509.Name`` values, and turning any DN into the one canonical string that mssd
  compares and stores (``normalise_dn``);
- reading what a peer certificate says about its holder (``CertificateIdentity``): the
  idNat_PS of a CPS-style personal certificate, the idNat_Struct of an organisation or server
  certificate, and the name attributes around them.

It never decides whether a certificate is trusted: chain building and revocation are the TLS
layer's job (``mssd.trust.tls``); this module only reads certificates that were already verified.
DNs are never compared as raw strings anywhere in mssd: always through ``normalise_dn``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from mssd.trust.idnat import IdNatError, check_idnat_ps, check_idnat_struct


class DnError(ValueError):
    """A DN string that cannot be read; the message says where and why."""


# Attribute type names accepted in DN strings, upper-cased. RFC 4514 §3 lists CN, L, ST, O, OU,
# C, STREET, DC, UID; the others are the RFC 4519 / PKCS #9 names that IGC-Santé certificates
# and common tools (OpenSSL, Windows) print. The first name given for an OID is the one
# ``normalise_dn`` writes, so that its output parses back to the same Name.
_NAMES: tuple[tuple[str, ObjectIdentifier], ...] = (
    ("CN", NameOID.COMMON_NAME),
    ("L", NameOID.LOCALITY_NAME),
    ("ST", NameOID.STATE_OR_PROVINCE_NAME),
    ("S", NameOID.STATE_OR_PROVINCE_NAME),
    ("O", NameOID.ORGANIZATION_NAME),
    ("OU", NameOID.ORGANIZATIONAL_UNIT_NAME),
    ("C", NameOID.COUNTRY_NAME),
    ("STREET", NameOID.STREET_ADDRESS),
    ("DC", NameOID.DOMAIN_COMPONENT),
    ("UID", NameOID.USER_ID),
    ("SN", NameOID.SURNAME),
    ("SURNAME", NameOID.SURNAME),
    ("GN", NameOID.GIVEN_NAME),
    ("GIVENNAME", NameOID.GIVEN_NAME),
    ("G", NameOID.GIVEN_NAME),
    ("TITLE", NameOID.TITLE),
    ("T", NameOID.TITLE),
    ("SERIALNUMBER", NameOID.SERIAL_NUMBER),
    ("EMAILADDRESS", NameOID.EMAIL_ADDRESS),
    ("E", NameOID.EMAIL_ADDRESS),
    ("INITIALS", NameOID.INITIALS),
    ("GENERATIONQUALIFIER", NameOID.GENERATION_QUALIFIER),
    ("DNQUALIFIER", NameOID.DN_QUALIFIER),
    ("PSEUDONYM", NameOID.PSEUDONYM),
    ("POSTALCODE", NameOID.POSTAL_CODE),
    ("BUSINESSCATEGORY", NameOID.BUSINESS_CATEGORY),
    ("ORGANIZATIONIDENTIFIER", NameOID.ORGANIZATION_IDENTIFIER),
)
_OID_BY_NAME: dict[str, ObjectIdentifier] = {name: oid for name, oid in _NAMES}
_NAME_BY_OID: dict[ObjectIdentifier, str] = {}
for _name, _oid in _NAMES:
    _NAME_BY_OID.setdefault(_oid, _name)

# RFC 4514 §2.4: characters escaped anywhere in a value.
_ALWAYS_ESCAPED = frozenset('"+,;<>\\')
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


# --- reading DN strings --------------------------------------------------------------------------


class _Reader:
    """A cursor over one DN string; every error names the offset it was found at."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, reason: str) -> DnError:
        return DnError(f"invalid DN {self.text!r} at offset {self.pos}: {reason}")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_spaces(self) -> None:
        # RFC 4514 §3 does not allow spaces around separators, but RFC 2253 §4 (and every DN
        # shown by a human) does; they are never part of a value unless escaped.
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def attribute_type(self) -> ObjectIdentifier:
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isalnum() or self.text[self.pos] in ".-"
        ):
            self.pos += 1
        word = self.text[start : self.pos]
        if not word:
            raise self.error("expected an attribute type")
        upper = word.upper()
        if upper.startswith("OID."):  # RFC 2253 §4 legacy prefix "OID.2.5.4.3"
            word = word[4:]
            upper = word.upper()
        if word[0].isdigit():
            # RFC 4512 §1.4 numericoid
            parts = word.split(".")
            if len(parts) < 2 or not all(p.isdigit() for p in parts):
                raise self.error(f"{word!r} is not a dotted OID")
            return ObjectIdentifier(word)
        oid = _OID_BY_NAME.get(upper)
        if oid is None:
            raise self.error(f"unknown attribute type {word!r}; use its dotted OID")
        return oid

    def value(self) -> str | bytes:
        if self.peek() == "#":
            return self._hex_value()
        if self.peek() == '"':
            return self._quoted_value()
        return self._string_value()

    def _hex_value(self) -> str | bytes:
        # RFC 4514 §2.4 / §3: "#" followed by the hex of the BER encoding of the value.
        self.pos += 1
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _HEX_DIGITS:
            self.pos += 1
        digits = self.text[start : self.pos]
        if not digits or len(digits) % 2:
            raise self.error("a #hexstring value needs an even, non-zero number of hex digits")
        return _decode_der_string(bytes.fromhex(digits), self)

    def _quoted_value(self) -> str:
        # RFC 1779 §2.3 / RFC 2253 §4 quoted values, still produced by Windows for values with
        # runs of spaces: O="C.H. DE  CADILLAC" in the ANS whitelist.
        self.pos += 1
        chars: list[str] = []
        pending = bytearray()
        while True:
            if self.at_end():
                raise self.error("unterminated quoted value")
            ch = self.text[self.pos]
            if ch == "\\":
                self._escape(chars, pending)
                continue
            self._flush(chars, pending)
            self.pos += 1
            if ch == '"':
                return "".join(chars)
            chars.append(ch)

    def _string_value(self) -> str:
        chars: list[str] = []
        pending = bytearray()
        keep = 0  # length of ``chars`` up to the last escaped or non-space character
        while not self.at_end():
            ch = self.text[self.pos]
            if ch in ",+;":
                break
            if ch == "\\":
                self._escape(chars, pending)
                if not pending:
                    keep = len(chars)
                continue
            if self._flush(chars, pending):
                keep = len(chars)
            chars.append(ch)
            self.pos += 1
            if ch != " ":
                keep = len(chars)
        if self._flush(chars, pending):
            keep = len(chars)
        # RFC 4514 §2.4: a trailing space that belongs to the value is escaped; unescaped ones
        # are padding before the separator.
        return "".join(chars[:keep])

    def _escape(self, chars: list[str], pending: bytearray) -> None:
        # RFC 4514 §3: "\" followed by a special character, or by two hex digits giving one
        # octet of the UTF-8 encoding; consecutive octets form one character.
        nxt = self.text[self.pos + 1 : self.pos + 3]
        if len(nxt) == 2 and nxt[0] in _HEX_DIGITS and nxt[1] in _HEX_DIGITS:
            pending.append(int(nxt, 16))
            self.pos += 3
            return
        if not nxt:
            raise self.error("dangling backslash at the end of the DN")
        self._flush(chars, pending)
        chars.append(nxt[0])
        self.pos += 2

    def _flush(self, chars: list[str], pending: bytearray) -> bool:
        """Decode the pending hex-escaped octets; True if there were any."""
        if not pending:
            return False
        try:
            chars.append(pending.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise self.error("hex escapes do not form valid UTF-8") from exc
        pending.clear()
        return True


def _decode_der_string(der: bytes, reader: _Reader) -> str | bytes:
    """Decode the DER of a directory string (or a BIT STRING, for x500UniqueIdentifier)."""
    if len(der) < 2:
        raise reader.error("truncated #hexstring value")
    tag, length, offset = der[0], der[1], 2
    if length & 0x80:  # X.690 §8.1.3.5 long form
        count = length & 0x7F
        if count == 0 or count > 4 or len(der) < 2 + count:
            raise reader.error("bad length in #hexstring value")
        length = int.from_bytes(der[2 : 2 + count], "big")
        offset = 2 + count
    content = der[offset:]
    if len(content) != length:
        raise reader.error("#hexstring length does not match its content")
    encodings = {
        0x0C: "utf-8",  # UTF8String
        0x12: "ascii",  # NumericString
        0x13: "ascii",  # PrintableString
        0x14: "latin-1",  # TeletexString (approximation used by OpenSSL too)
        0x16: "ascii",  # IA5String
        0x1A: "ascii",  # VisibleString
        0x1C: "utf-32-be",  # UniversalString
        0x1E: "utf-16-be",  # BMPString
    }
    if tag == 0x03 and content:  # BIT STRING: drop the unused-bits octet
        return bytes(content[1:])
    encoding = encodings.get(tag)
    if encoding is None:
        raise reader.error(f"#hexstring value has unsupported ASN.1 tag 0x{tag:02x}")
    try:
        return content.decode(encoding)
    except UnicodeDecodeError as exc:
        raise reader.error("#hexstring value is not valid for its string type") from exc


def _attribute(
    oid: ObjectIdentifier, value: str | bytes, reader: _Reader
) -> x509.NameAttribute[str | bytes]:
    try:
        return x509.NameAttribute(oid, value)
    except (ValueError, TypeError) as exc:
        raise reader.error(f"bad value for {_type_name(oid)}: {exc}") from exc


def parse_dn(text: str) -> x509.Name:
    """Read an RFC 4514 DN string into an ``x509.Name``.

    Accepts what the standard allows (escapes ``\\,`` and ``\\XX``, ``#`` hex values,
    multi-valued RDNs with ``+``, dotted OIDs) and what real DN strings contain besides:
    attribute names in any case, spaces around separators, RFC 2253 ``;`` separators and
    ``"quoted"`` values. The string lists the most specific RDN first (RFC 4514 §2.1); the
    returned Name is in certificate (ASN.1) order.
    """
    reader = _Reader(text)
    rdns: list[x509.RelativeDistinguishedName] = []
    reader.skip_spaces()
    if reader.at_end():
        return x509.Name([])  # RFC 4514 §2.1: the empty DN is the empty string
    while True:
        attributes: list[x509.NameAttribute[str | bytes]] = []
        while True:
            reader.skip_spaces()
            oid = reader.attribute_type()
            reader.skip_spaces()
            if reader.peek() != "=":
                raise reader.error("expected '=' after the attribute type")
            reader.pos += 1
            reader.skip_spaces()
            attributes.append(_attribute(oid, reader.value(), reader))
            reader.skip_spaces()
            if reader.peek() != "+":
                break
            reader.pos += 1
        try:
            rdns.append(x509.RelativeDistinguishedName(attributes))
        except ValueError as exc:  # duplicate attribute in one RDN
            raise reader.error(str(exc)) from exc
        if reader.at_end():
            break
        if reader.peek() not in ",;":
            raise reader.error(f"unexpected {reader.peek()!r} after a value")
        reader.pos += 1
    rdns.reverse()
    return x509.Name(rdns)


# --- canonical form ------------------------------------------------------------------------------


def _type_name(oid: ObjectIdentifier) -> str:
    return _NAME_BY_OID.get(oid, oid.dotted_string)


def _fold(value: str) -> str:
    """Prepare a value for caseIgnoreMatch (RFC 4517 §4.2.11) following RFC 4518 §2."""
    # §2.3 normalise (NFKC), §2.2 case fold; NFKC again because folding can denormalise.
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", value).casefold())
    # §2.2 maps other white space to SPACE; §2.6.1 drops leading and trailing spaces and
    # keeps one space between words.
    return " ".join("".join(" " if ch.isspace() else ch for ch in folded).split())


def _escape_value(value: str) -> str:
    """Write a value as RFC 4514 §2.4 requires (and escape control characters as hex)."""
    out: list[str] = []
    last = len(value) - 1
    for index, ch in enumerate(value):
        if ch in _ALWAYS_ESCAPED or (index == 0 and ch in "# ") or (index == last and ch == " "):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)


def _oid_key(oid: ObjectIdentifier) -> tuple[int, ...]:
    return tuple(int(part) for part in oid.dotted_string.split("."))


def _normalise_attribute(attribute: x509.NameAttribute[str | bytes]) -> tuple[tuple[int, ...], str]:
    value = attribute.value
    if isinstance(value, bytes):
        # x500UniqueIdentifier: RFC 4514 §2.4 hex form of its DER BIT STRING, no unused bits.
        der = bytes([0x03, len(value) + 1, 0]) + value
        text = "#" + der.hex()
    else:
        text = _escape_value(_fold(value))
    return _oid_key(attribute.oid), f"{_type_name(attribute.oid)}={text}"


def normalise_dn(name: str | x509.Name) -> str:
    """Return the canonical string of a DN, for comparisons and as a database key.

    RDNs most specific first (RFC 4514 §2.1), attributes of a multi-valued RDN sorted by OID,
    short attribute names, values case-folded with insignificant spaces removed (RFC 4518) and
    escaped per RFC 4514 §2.4. The result parses back with ``parse_dn`` to the same form.
    """
    parsed = parse_dn(name) if isinstance(name, str) else name
    parts: list[str] = []
    for rdn in reversed(parsed.rdns):
        attributes = sorted(_normalise_attribute(attribute) for attribute in rdn)
        parts.append("+".join(text for _key, text in attributes))
    return ",".join(parts)


# --- certificate identities ----------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateIdentity:
    """Who a (verified) certificate names.

    ``idnat_ps`` is the national id of a professional, set when the CN is one (CPS-style
    personal certificates); ``idnat_struct`` is the national id of an organisation, set when
    an OU is one (IGC-Santé organisation and server certificates).
    """

    subject_dn: str
    issuer_dn: str
    common_name: str | None
    idnat_ps: str | None
    idnat_struct: str | None
    surname: str | None
    given_name: str | None
    title: str | None
    serial: int
    not_after: datetime


def _last_value(name: x509.Name, oid: ObjectIdentifier) -> str | None:
    """The most specific string value of ``oid`` in ``name`` (the last one in ASN.1 order)."""
    values = [a.value for a in name.get_attributes_for_oid(oid) if isinstance(a.value, str)]
    return values[-1] if values else None


def _first_idnat_struct(values: Iterable[str]) -> str | None:
    for value in values:
        try:
            return check_idnat_struct(value.strip())
        except IdNatError:
            continue
    return None


def identity_from_certificate(cert: x509.Certificate) -> CertificateIdentity:
    """Read the identity a certificate carries; the caller has verified the certificate."""
    subject = cert.subject
    common_name = _last_value(subject, NameOID.COMMON_NAME)
    idnat_ps: str | None = None
    if common_name is not None:
        try:
            idnat_ps = check_idnat_ps(common_name.strip())
        except IdNatError:
            idnat_ps = None
    units = [
        a.value
        for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if isinstance(a.value, str)
    ]
    return CertificateIdentity(
        subject_dn=normalise_dn(subject),
        issuer_dn=normalise_dn(cert.issuer),
        common_name=common_name,
        idnat_ps=idnat_ps,
        idnat_struct=_first_idnat_struct(units),
        surname=_last_value(subject, NameOID.SURNAME),
        given_name=_last_value(subject, NameOID.GIVEN_NAME),
        title=_last_value(subject, NameOID.TITLE),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
    )


def identity_from_der(der: bytes) -> CertificateIdentity:
    """Read the identity of a DER certificate (as ``peer_certificate`` returns it)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise DnError(f"not a DER X.509 certificate: {exc}") from exc
    return identity_from_certificate(cert)
