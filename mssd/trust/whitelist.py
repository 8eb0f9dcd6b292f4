"""The ANS whitelist of the MSSanté trust space (``listeblanchemssante.xml``), sans I/O.

This module owns three pure things:

- reading the ANS XML format into a :class:`Whitelist` (domain -> operator certificate DNs),
  from bytes fed in any number of pieces (:class:`WhitelistParser`);
- checking a published SHA-256 ``checksum`` file against the bytes it describes;
- deciding whether a newly fetched list may replace the current one (:func:`accept_update`).

It never opens a file, a socket or the store: ``mssd.trust.whitelist_source`` fetches the
bytes and ``mssd.delivery.whitelist`` keeps the list current.

The format, as ANS publishes it (namespace ``https://listeblanche.mssante.fr/schema``)::

    <ListeBlancheMSSante>
      <DateDeGeneration>2025-03-13T14:54:10Z</DateDeGeneration>
      <ListeDomaines>
        <Domaine>
          <Nom>exemple.mssante.fr</Nom>
          <DNCertificatOperateur>CN=...,OU=...,O=...,ST=...,C=FR</DNCertificatOperateur>
          ... (Description, contacts, DateMAJ: not used here)
        </Domaine>
      ...

A domain served by several operator servers appears either as one ``Domaine`` with several
``DNCertificatOperateur`` or as several ``Domaine`` elements with the same ``Nom`` (what the
published list actually does); both are merged. Real publications have quirks this parser
accepts on purpose, each named where it is handled: the document ends without the closing
``</ListeBlancheMSSante>`` tag, DN strings use ", " separators or quoted values, and a few
``Nom`` values are not host names (they are skipped and reported, not fatal).

Invariants:
- XML is parsed with DTDs, entities and external references refused (defusedxml); the
  list never needs them.
- Domains are compared as IDNA A-labels in lower case (UTS #46 mapping), DNs through
  ``mssd.trust.identity.normalise_dn``: never raw strings. Our own domains and
  mailboxes are stored in that form too (:func:`mailbox_key`).
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import idna
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from mssd.trust.identity import DnError, normalise_dn

NAMESPACE = "https://listeblanche.mssante.fr/schema"
_ROOT = f"{{{NAMESPACE}}}ListeBlancheMSSante"
_DOMAINS = f"{{{NAMESPACE}}}ListeDomaines"
_DOMAIN = f"{{{NAMESPACE}}}Domaine"
_NAME = f"{{{NAMESPACE}}}Nom"
_DN = f"{{{NAMESPACE}}}DNCertificatOperateur"
_GENERATED = f"{{{NAMESPACE}}}DateDeGeneration"

# Expat's XML_ERROR_NO_ELEMENTS: the input ended while an element was still open.
_EXPAT_NO_ELEMENTS = 3
# A SHA-256 as published: 64 hex digits, optionally followed by a file name (sha256sum).
_CHECKSUM = re.compile(r"\s*([0-9a-fA-F]{64})(?:\s+\*?\S.*)?\s*", re.DOTALL)
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

RefusalKind = Literal["checksum", "parse", "shrink", "fetch"]


class WhitelistError(ValueError):
    """A whitelist document that cannot be used; the message says where and why."""


class WhitelistRefused(Exception):
    """A new list that must not replace the current one (``kind`` says which rule)."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        super().__init__(message)
        self.kind: RefusalKind = kind
        self.message = message


# --- names ---------------------------------------------------------------------------------------


def normalise_domain(name: str) -> str:
    """The form domains are compared in: IDNA A-labels, lower case, no trailing dot.

    UTS #46 mapping first (RFC 5895 §2: case and width folding of what users type), then
    IDNA 2008 (RFC 5891 §4) for labels that are not plain ASCII letters, digits and hyphens.
    Raises ``ValueError`` for something that is not a host name.
    """
    text = name.strip().rstrip(".")
    if not text or len(text) > 253:
        raise ValueError(f"{name!r} is not a domain name")
    lowered = text.lower()
    labels = lowered.split(".")
    if lowered.isascii() and all(_LDH_LABEL.fullmatch(label) for label in labels):
        return lowered
    try:
        encoded = idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError as error:
        raise ValueError(f"{name!r} is not a domain name: {error}") from None
    return encoded.lower()


def mailbox_key(address: str) -> str:
    """An address as mssd stores and compares its own mailboxes: the local part in
    lower case, the domain as an A-label (:func:`normalise_domain`), so that
    ``x@hôpital.test`` and ``X@xn--hpital-dxa.test`` are one mailbox. A domain
    that is not a host name is only lower-cased (it then matches nothing)."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address.lower()
    try:
        domain = normalise_domain(domain)
    except ValueError:
        domain = domain.lower()
    return f"{local.lower()}@{domain}"


def display_domain(a_label: str) -> str:
    """A domain as users read it (U-labels); the A-label itself if it cannot be decoded."""
    try:
        return str(idna.decode(a_label))
    except idna.IDNAError:
        return a_label


# --- the list ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Whitelist:
    """A parsed whitelist: for each domain (A-label), the normalised DNs of its operators."""

    domains: Mapping[str, frozenset[str]]
    generated_at: str | None = None
    """``DateDeGeneration`` as published (ISO 8601), when present."""
    skipped: tuple[str, ...] = ()
    """Entries that could not be used (bad domain name, unreadable DN), one line each."""
    operators: frozenset[str] = field(init=False)
    """Every normalised DN that appears for at least one domain."""

    def __post_init__(self) -> None:
        frozen = MappingProxyType(dict(self.domains))
        object.__setattr__(self, "domains", frozen)
        object.__setattr__(
            self, "operators", frozenset(dn for dns in frozen.values() for dn in dns)
        )

    @property
    def entry_count(self) -> int:
        """Number of (domain, operator DN) pairs."""
        return sum(len(dns) for dns in self.domains.values())

    def operators_for(self, domain: str) -> frozenset[str]:
        """Normalised DNs allowed for ``domain`` (any spelling); empty if it is not listed."""
        try:
            key = normalise_domain(domain)
        except ValueError:
            return frozenset()
        return self.domains.get(key, frozenset())

    def has_domain(self, domain: str) -> bool:
        return bool(self.operators_for(domain))

    def allows(self, domain: str, dn: str) -> bool:
        """Whether the certificate DN ``dn`` (any RFC 4514 spelling) may act for ``domain``."""
        return _normalise_or_none(dn) in self.operators_for(domain)

    def is_operator(self, dn: str) -> bool:
        """Whether ``dn`` is listed for at least one domain."""
        return _normalise_or_none(dn) in self.operators


def _normalise_or_none(dn: str) -> str | None:
    try:
        return normalise_dn(dn)
    except DnError:
        return None


# --- parsing -------------------------------------------------------------------------------------


class _Builder:
    """ElementTree target that keeps only what the list needs, element by element."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.text: list[str] = []
        self.saw_root = False
        self.domains_closed = False
        self.generated_at: str | None = None
        self.domain_count = 0
        self.names: list[str] = []
        self.dns: list[str] = []
        self.entries: list[tuple[str, list[str], int]] = []

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if not self.stack:
            if tag != _ROOT:
                raise WhitelistError(
                    f"the document element is {tag!r}, expected ListeBlancheMSSante in the "
                    f"namespace {NAMESPACE}"
                )
            self.saw_root = True
        self.stack.append(tag)
        self.text = []
        if tag == _DOMAIN:
            self.domain_count += 1
            self.names, self.dns = [], []

    def data(self, text: str) -> None:
        self.text.append(text)

    def end(self, tag: str) -> None:
        self.stack.pop()
        parent = self.stack[-1] if self.stack else None
        value = "".join(self.text).strip()
        self.text = []
        if tag == _NAME and parent == _DOMAIN:
            self.names.append(value)
        elif tag == _DN and parent == _DOMAIN:
            self.dns.append(value)
        elif tag == _GENERATED and parent == _ROOT:
            self.generated_at = value or None
        elif tag == _DOMAIN and parent == _DOMAINS:
            self.entries.append((" ".join(self.names), self.dns, self.domain_count))
        elif tag == _DOMAINS and parent == _ROOT:
            self.domains_closed = True

    def close(self) -> None:
        return None


class WhitelistParser:
    """Feed the bytes of a whitelist in pieces, then :meth:`close` to get the list."""

    def __init__(self) -> None:
        self._builder = _Builder()
        self._parser = DefusedXMLParser(
            target=self._builder, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed(data)
        except ElementTree.ParseError as error:
            raise WhitelistError(f"not well-formed XML: {error}") from None
        except DefusedXmlException as error:
            raise WhitelistError(f"forbidden XML construct: {error}") from None

    def close(self) -> Whitelist:
        builder = self._builder
        try:
            self._parser.close()
        except ElementTree.ParseError as error:
            # ANS publishes the list without its closing </ListeBlancheMSSante> (the 2025
            # copies in shared/fixtures end right after </ListeDomaines>). Accept exactly that:
            # the input ended with only the document element open and the domain list
            # complete. Any other truncation is an error.
            truncated_root = (
                error.code == _EXPAT_NO_ELEMENTS
                and builder.stack == [_ROOT]
                and builder.domains_closed
            )
            if not truncated_root:
                raise WhitelistError(f"not well-formed XML: {error}") from None
        except DefusedXmlException as error:
            raise WhitelistError(f"forbidden XML construct: {error}") from None
        if not builder.saw_root:
            raise WhitelistError("empty document")
        if not builder.domains_closed:
            raise WhitelistError("no ListeDomaines element")
        return _assemble(builder.entries, builder.generated_at)


def _assemble(entries: Iterable[tuple[str, list[str], int]], generated_at: str | None) -> Whitelist:
    domains: dict[str, set[str]] = {}
    skipped: list[str] = []
    normalised: dict[str, str | None] = {}  # the list repeats ~400 DNs over ~6,500 entries
    for name, dns, number in entries:
        try:
            domain = normalise_domain(name)
        except ValueError as error:
            skipped.append(f"Domaine #{number}: {error}")
            continue
        usable: set[str] = set()
        for dn in dns:
            if dn not in normalised:
                try:
                    normalised[dn] = normalise_dn(dn)
                except DnError as error:
                    normalised[dn] = None
                    skipped.append(f"Domaine #{number} ({domain}): {error}")
            value = normalised[dn]
            if value is not None and value:
                usable.add(value)
        if not dns:
            skipped.append(f"Domaine #{number} ({domain}): no DNCertificatOperateur")
        if usable:
            domains.setdefault(domain, set()).update(usable)
    if not domains:
        raise WhitelistError("the list holds no usable domain")
    return Whitelist(
        domains={domain: frozenset(dns) for domain, dns in sorted(domains.items())},
        generated_at=generated_at,
        skipped=tuple(skipped),
    )


def parse_whitelist(data: bytes) -> Whitelist:
    """Parse a whole whitelist document (see :class:`WhitelistParser`)."""
    parser = WhitelistParser()
    parser.feed(data)
    return parser.close()


# --- checksum and replacement rules --------------------------------------------------------------


def parse_checksum(text: str | bytes) -> str:
    """The SHA-256 (lower-case hex) in a published ``checksum`` file.

    ANS's file holds the 64 hex digits alone; ``sha256sum`` output (digits, spaces, file
    name) is accepted too.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise WhitelistRefused("checksum", "the checksum file is not ASCII text") from None
    match = _CHECKSUM.fullmatch(text)
    if match is None:
        raise WhitelistRefused(
            "checksum", "the checksum file does not hold a SHA-256 (64 hexadecimal digits)"
        )
    return match[1].lower()


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of a list (hex): what its checksum file and the store name it by."""
    return hashlib.sha256(data).hexdigest()


def check_checksum(data: bytes, checksum_file: str | bytes, *, digest: str | None = None) -> str:
    """Verify ``data`` (whose SHA-256 is ``digest`` when the caller has it already)
    against a checksum file; return the SHA-256 (hex)."""
    expected = parse_checksum(checksum_file)
    actual = digest if digest is not None else sha256_hex(data)
    if actual != expected:
        raise WhitelistRefused(
            "checksum",
            f"SHA-256 mismatch: the list hashes to {actual}, the checksum file says {expected}",
        )
    return actual


def shrinkage(current: Whitelist, candidate: Whitelist) -> float:
    """How much ``candidate`` is smaller than ``current`` (0.0: not smaller; 1.0: empty).

    Counted on domains and on (domain, operator) pairs, whichever shrinks more: a list that
    keeps its domains but loses their operators cuts the trust space as surely.
    """

    def lost(before: int, after: int) -> float:
        return max(0.0, (before - after) / before) if before else 0.0

    return max(
        lost(len(current.domains), len(candidate.domains)),
        lost(current.entry_count, candidate.entry_count),
    )


def accept_update(
    current: Whitelist | None,
    data: bytes,
    *,
    checksum_file: str | bytes | None,
    max_shrink: float,
    digest: str | None = None,
) -> tuple[Whitelist, str]:
    """Decide whether ``data`` may replace ``current``; return (new list, its SHA-256).

    Refused (:class:`WhitelistRefused`) when the checksum file does not match, when the
    document does not parse, or when it would shrink the current list by more than
    ``max_shrink`` (a fraction). The first list (``current`` None) has no size to keep.
    ``digest``: the SHA-256 of ``data``, when the caller has computed it (a list is
    hashed once per refresh).
    """
    if digest is None:
        digest = sha256_hex(data)
    if checksum_file is not None:
        check_checksum(data, checksum_file, digest=digest)
    try:
        candidate = parse_whitelist(data)
    except WhitelistError as error:
        raise WhitelistRefused("parse", f"the list does not parse: {error}") from None
    if current is not None:
        lost = shrinkage(current, candidate)
        if lost > max_shrink:
            raise WhitelistRefused(
                "shrink",
                f"the new list would shrink the current one by {lost:.0%} "
                f"({len(current.domains)} -> {len(candidate.domains)} domains, "
                f"{current.entry_count} -> {candidate.entry_count} operator entries); "
                f"at most {max_shrink:.0%} is accepted",
            )
    return candidate, digest
