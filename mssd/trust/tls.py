"""TLS contexts for every mssd listener and outgoing connection.

This module owns the TLS policy of the MSSanté trust space, in one place:

- TLS 1.2 is the floor, TLS 1.3 is allowed (and preferred) with OpenSSL's default suites;
- on TLS 1.2 only the four ECDHE-RSA suites named by the MSSanté client rules are offered
  (0xC02F, 0xC030, 0xC027, 0xC028);
- no compression (CRIME), no renegotiation, the server's suite order wins;
- client certificates are optional on listeners (CPS cards and organisation certificates for
  SASL EXTERNAL, operator certificates on port 25) but, when presented, must chain to the
  configured CAs and not be revoked by the configured CRLs.

Contexts read their files once, when built: after a CRL or certificate change, build new ones.
This module never decides what a verified identity may do; callers read it with
``peer_certificate`` and ``mssd.trust.identity``.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

# MSSanté client rules ("Référentiel #1 opérateurs", TLS section): on TLS 1.2 only
# TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 (0xC02F), TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 (0xC030),
# TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256 (0xC027), TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384 (0xC028).
MSSANTE_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES128-SHA256",
        "ECDHE-RSA-AES256-SHA384",
    )
)


class TlsConfigError(Exception):
    """A TLS context cannot be built from the configured files; the message names the file."""


def _require(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise TlsConfigError(f"{what} {path} does not exist or is not a file")
    return Path(path)


def _base_context(*, server: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # set_ciphers() only governs TLS 1.2 and below; TLS 1.3 keeps OpenSSL's AEAD suites.
    context.set_ciphers(MSSANTE_TLS12_CIPHERS)
    # RFC 7457 §2.6 (CRIME) for compression; RFC 5746 renegotiation is simply not needed by
    # mail protocols, and refusing it removes a DoS and a class of client-auth confusions.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path | None) -> None:
    cert = _require(cert_file, "certificate file")
    key = _require(key_file, "private key file") if key_file is not None else None
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"cannot load certificate {cert} with key {key or cert}: {exc}"
        ) from exc


def _load_trust(context: ssl.SSLContext, ca_file: Path, crl_file: Path | None) -> None:
    ca = _require(ca_file, "CA file")
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"cannot load CA file {ca}: {exc}") from exc
    if crl_file is None:
        return
    crl = _require(crl_file, "CRL file")
    try:
        # OpenSSL's PEM loader adds X509 CRL blocks to the store alongside certificates.
        context.load_verify_locations(cafile=crl)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"cannot load CRL file {crl}: {exc}") from exc
    # Check the peer's own certificate against its issuer's CRL (RFC 5280 §6.3). Every CA of
    # the chain must then have a CRL in the file, or verification fails with "unable to get
    # certificate CRL": the dev PKI publishes one per CA, as IGC-Santé does.
    # VERIFY_X509_STRICT stays off: the dev PKI passes it (and VERIFY_CRL_CHECK_CHAIN), but
    # one non-conformant field in a peer operator's production certificate must not cut the
    # trust space in two; chain, validity and revocation checks are what matter here.
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def server_context(
    cert_file: Path,
    key_file: Path,
    *,
    client_ca_file: Path | None = None,
    crl_file: Path | None = None,
) -> ssl.SSLContext:
    """A context for mssd listeners (SMTP 25/465/587 and IMAP 143/993).

    With ``client_ca_file``, clients may present a certificate, which must then chain to
    those CAs (and pass the CRLs of ``crl_file``); clients without one are still accepted and
    authenticate otherwise.
    """
    if crl_file is not None and client_ca_file is None:
        raise TlsConfigError(f"CRL file {crl_file} given without a client CA file")
    context = _base_context(server=True)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, cert_file, key_file)
    if client_ca_file is not None:
        _load_trust(context, client_ca_file, crl_file)
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(
    *,
    ca_file: Path | None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    check_hostname: bool = True,
    crl_file: Path | None = None,
    partial_chain: bool = False,
) -> ssl.SSLContext:
    """A context for outgoing connections (relay to other operators, DMP, directory).

    The server is always verified: against ``ca_file`` (the IGC-Santé roots), or the system
    store when it is None. ``cert_file``/``key_file`` is our own certificate for mutual TLS.
    With ``partial_chain``, every certificate of ``ca_file`` is a trust anchor, a root or
    not (OpenSSL's partial-chain mode, as ``mssd.trust.verify`` reads a CA file).
    """
    context = _base_context(server=False)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if partial_chain:
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if ca_file is not None:
        _load_trust(context, ca_file, crl_file)
    elif crl_file is not None:
        raise TlsConfigError(f"CRL file {crl_file} given without a CA file")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None:
        _load_chain(context, cert_file, key_file)
    elif key_file is not None:
        raise TlsConfigError(f"private key file {key_file} given without a certificate file")
    return context


def peer_certificate(
    connection: asyncio.BaseTransport | ssl.SSLObject | ssl.SSLSocket,
) -> bytes | None:
    """The DER of the peer's verified leaf certificate, or None.

    Accepts an asyncio transport, an ``SSLObject`` or an ``SSLSocket``. None when the
    connection is not TLS, the peer sent no certificate, or the context did not verify
    certificates (a certificate nobody checked identifies nobody).
    """
    tls: ssl.SSLObject | ssl.SSLSocket | None
    if isinstance(connection, ssl.SSLObject | ssl.SSLSocket):
        tls = connection
    else:
        extra = connection.get_extra_info("ssl_object")
        tls = extra if isinstance(extra, ssl.SSLObject | ssl.SSLSocket) else None
    if tls is None or tls.context.verify_mode == ssl.CERT_NONE:
        return None
    return tls.getpeercert(binary_form=True)
