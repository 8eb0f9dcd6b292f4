"""Checking a peer certificate against configured issuers and CRLs, outside the TLS handshake.

The TLS layer verifies client certificates during the handshake, but a failed handshake
tells the peer nothing an administrator can act on. On port 25 the handshake only checks
the chain; this module then answers "is this operator certificate issued by one of the
configured IGC-Santé CAs, currently valid and not revoked?" so that the SMTP session can
refuse MAIL with a reply that names the reason (``mssd.smtp.inbound``).

Rules (RFC 5280 §6.1, simplified to what the trust space needs):
- every certificate in the CA file is a trusted issuer (as OpenSSL's partial-chain mode):
  the file names the CAs that may issue operator certificates;
- the leaf must be signed by one of them, and both must be within their validity period;
- with a CRL file, the leaf's issuer must have a CRL there, signed by it and not expired,
  that does not list the leaf's serial number (RFC 5280 §6.3; like
  ``VERIFY_CRL_CHECK_LEAF`` in ``mssd.trust.tls``). When the file holds several such
  CRLs of one issuer (an old one left beside the new), the most recent decides: the
  latest ``thisUpdate``, then the highest CRL number (RFC 5280 §5.1.2.4, §5.2.3).

The files are read again when they change on disk (CRLs are republished), so a revocation
takes effect without a restart. This module never decides what a certificate may do.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mssd.trust.tls import TlsConfigError

log = logging.getLogger(__name__)

_VERIFIED_SECONDS = 60.0
"""How long a certificate's verdict is reused while the CA and CRL files stay the
same (a new CRL clears them all at once: a revocation takes effect immediately)."""
_VERIFIED_KEPT = 1024

Reason = Literal["untrusted", "revoked", "unreadable"]

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


class CertificateRejected(Exception):
    """The certificate is not acceptable; ``reason`` classifies, the message explains."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message


@dataclass(frozen=True)
class TrustMaterial:
    """Issuers and CRLs, parsed."""

    issuers: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] | None
    """None: revocation is not checked (no CRL file configured)."""


def load_material(ca_pem: bytes, crl_pem: bytes | None) -> TrustMaterial:
    issuers = tuple(x509.load_pem_x509_certificates(ca_pem))
    crls = None
    if crl_pem is not None:
        crls = tuple(x509.load_pem_x509_crl(block) for block in _PEM_CRL.findall(crl_pem))
    return TrustMaterial(issuers, crls)


def _within_validity(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _issuer_of(leaf: x509.Certificate, material: TrustMaterial) -> x509.Certificate | None:
    for candidate in material.issuers:
        if candidate.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


def _check_revocation(
    leaf: x509.Certificate, issuer: x509.Certificate, material: TrustMaterial, now: dt.datetime
) -> None:
    if material.crls is None:
        return
    public_key = issuer.public_key()
    current: x509.CertificateRevocationList | None = None
    for crl in material.crls:
        if crl.issuer != issuer.subject:
            continue
        try:
            valid = crl.is_signature_valid(public_key)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            valid = False
        if not valid:
            continue
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now:
            continue  # RFC 5280 §6.3.3 (a)(2): a stale CRL says nothing about today
        if current is None or _recency(crl) > _recency(current):
            current = crl
    if current is None:
        raise CertificateRejected(
            "untrusted",
            f"no current CRL of its issuer {issuer.subject.rfc4514_string()} to check "
            "revocation against",
        )
    revoked = current.get_revoked_certificate_by_serial_number(leaf.serial_number)
    if revoked is not None:
        raise CertificateRejected(
            "revoked",
            f"certificate serial {leaf.serial_number:x} was revoked by "
            f"{issuer.subject.rfc4514_string()} on {revoked.revocation_date_utc:%Y-%m-%d}",
        )


def _recency(crl: x509.CertificateRevocationList) -> tuple[dt.datetime, int]:
    """(thisUpdate, CRL number): the larger, the more recent the CRL."""
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = -1
    return crl.last_update_utc, number


def verify_certificate(
    der: bytes, material: TrustMaterial, *, now: dt.datetime | None = None
) -> x509.Certificate:
    """The certificate, if it is issued by a trusted issuer, valid, and not revoked."""
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError as error:
        raise CertificateRejected("unreadable", f"not an X.509 certificate: {error}") from None
    moment = now or dt.datetime.now(dt.UTC)
    if not _within_validity(leaf, moment):
        raise CertificateRejected(
            "untrusted",
            f"certificate valid from {leaf.not_valid_before_utc:%Y-%m-%d} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d}, not now",
        )
    issuer = _issuer_of(leaf, material)
    if issuer is None:
        raise CertificateRejected(
            "untrusted",
            f"its issuer {leaf.issuer.rfc4514_string()} is not one of the CAs trusted for "
            "operator certificates",
        )
    if not _within_validity(issuer, moment):
        raise CertificateRejected(
            "untrusted", f"its issuer {issuer.subject.rfc4514_string()} is expired"
        )
    _check_revocation(leaf, issuer, material, moment)
    return leaf


class TrustFiles:
    """A CA file and an optional CRL file, parsed, and parsed again when they change."""

    def __init__(self, ca_file: Path, crl_file: Path | None) -> None:
        self._ca_file = ca_file
        self._crl_file = crl_file
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._failed_stamp: tuple[tuple[int, int], ...] | None = None
        self._material: TrustMaterial | None = None
        self._verified: OrderedDict[bytes, tuple[float, x509.Certificate | CertificateRejected]] = (
            OrderedDict()
        )
        self.material()  # fail at start, naming the file, rather than at the first MAIL

    def _stat(self) -> tuple[tuple[int, int], ...]:
        files = [self._ca_file] + ([self._crl_file] if self._crl_file is not None else [])
        stamps = []
        for path in files:
            info = path.stat()
            stamps.append((info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def material(self) -> TrustMaterial:
        """The current issuers and CRLs (one ``stat`` per file; re-read on change)."""
        stamp: tuple[tuple[int, int], ...] | None = None
        try:
            stamp = self._stat()
            if stamp == self._stamp and self._material is not None:
                return self._material
            if stamp == self._failed_stamp and self._material is not None:
                return self._material  # the same broken files: not parsed again
            crl = self._crl_file.read_bytes() if self._crl_file is not None else None
            self._material = load_material(self._ca_file.read_bytes(), crl)
            self._stamp = stamp
            self._verified.clear()
        except (OSError, ValueError) as error:
            if self._material is None:
                raise TlsConfigError(
                    f"cannot read CA file {self._ca_file} or CRL file {self._crl_file}: {error}"
                ) from None
            # Mid-rewrite, briefly missing or broken: keep what was read last time,
            # and say so once per version of the files.
            if stamp is None or stamp != self._failed_stamp:
                log.warning(
                    "cannot re-read CA file %s or CRL file %s (%s); keeping the previous ones",
                    self._ca_file,
                    self._crl_file,
                    error,
                )
            self._failed_stamp = stamp
        return self._material

    def verify(self, der: bytes) -> x509.Certificate:
        """:func:`verify_certificate` against the current files. A peer sends the
        same certificate on every connection and every MAIL: its answer is kept
        for :data:`_VERIFIED_SECONDS` (and forgotten when the files change), so
        the CRL is not searched again for each message."""
        material = self.material()
        now = time.monotonic()
        kept = self._verified.get(der)
        if kept is not None and now - kept[0] < _VERIFIED_SECONDS:
            if isinstance(kept[1], CertificateRejected):
                raise kept[1]
            return kept[1]
        answer: x509.Certificate | CertificateRejected
        try:
            answer = verify_certificate(der, material)
        except CertificateRejected as rejected:
            answer = rejected
        self._verified[der] = (now, answer)
        self._verified.move_to_end(der)
        while len(self._verified) > _VERIFIED_KEPT:
            self._verified.popitem(last=False)
        if isinstance(answer, CertificateRejected):
            raise answer
        return answer
