"""TLS policy proven with real handshakes over loopback sockets."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mssd.trust.identity import identity_from_der
from mssd.trust.pki import (
    DevPki,
    IssuedCertificate,
    init_dev_pki,
    issue_personal_certificate,
    revoke,
)
from mssd.trust.tls import (
    MSSANTE_TLS12_CIPHERS,
    TlsConfigError,
    client_context,
    peer_certificate,
    server_context,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("pki") / "dev")


@pytest.fixture(scope="module")
def doctor(pki: DevPki) -> IssuedCertificate:
    return issue_personal_certificate(
        pki,
        idnat_ps="810001234567",
        surname="Martin",
        given_name="Claire",
        profession="Médecin",
        name="doctor",
    )


def _mutual_server(pki: DevPki) -> ssl.SSLContext:
    return server_context(
        pki.server_cert, pki.server_key, client_ca_file=pki.ca_bundle, crl_file=pki.crl
    )


@dataclass
class Handshake:
    server_error: Exception | None = None
    client_error: Exception | None = None
    peer_der: bytes | None = None
    version: str | None = None
    cipher: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.server_error is None and self.client_error is None


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str = "localhost"
) -> Handshake:
    """Connect ``client`` to ``server`` over loopback TCP; report what each side saw."""
    result = Handshake()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with server.wrap_socket(conn, server_side=True) as tls:
                    result.peer_der = peer_certificate(tls)
                    result.version = tls.version()
                    cipher = tls.cipher()
                    result.cipher = cipher[0] if cipher else None
                    tls.sendall(b"ok\n")
            except (ssl.SSLError, OSError) as exc:
                result.server_error = exc

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                # With TLS 1.3 the server judges the client certificate after the client's
                # handshake has returned: its verdict arrives with the first read.
                if tls.recv(3) != b"ok\n":
                    raise ConnectionError("server closed the connection")
        except (ssl.SSLError, OSError) as exc:
            result.client_error = exc
        thread.join(10)
    return result


def _tls12_client(pki: DevPki, ciphers: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=pki.root_ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    return context


def test_tls12_cipher_list_is_exactly_the_four_mssante_suites() -> None:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.set_ciphers(MSSANTE_TLS12_CIPHERS)
    tls12 = {c["name"] for c in probe.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == {
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES128-SHA256",
        "ECDHE-RSA-AES256-SHA384",
    }


def test_contexts_refuse_compression_and_renegotiation(pki: DevPki) -> None:
    server = server_context(pki.server_cert, pki.server_key)
    client = client_context(ca_file=pki.root_ca)
    for context in (server, client):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_NO_RENEGOTIATION
    assert server.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert server.verify_mode == ssl.CERT_NONE and not server.check_hostname
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


def test_default_clients_negotiate_tls13(pki: DevPki) -> None:
    result = handshake(
        server_context(pki.server_cert, pki.server_key), client_context(ca_file=pki.root_ca)
    )
    assert result.succeeded, result
    assert result.version == "TLSv1.3"
    assert result.peer_der is None  # no client certificate asked for


def test_server_certificate_verifies_by_ip_address_too(pki: DevPki) -> None:
    result = handshake(
        server_context(pki.server_cert, pki.server_key),
        client_context(ca_file=pki.root_ca),
        server_hostname="127.0.0.1",
    )
    assert result.succeeded, result


def test_client_refuses_a_server_named_otherwise(pki: DevPki) -> None:
    result = handshake(
        server_context(pki.server_cert, pki.server_key),
        client_context(ca_file=pki.root_ca),
        server_hostname="elsewhere.test",
    )
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls11_is_refused(pki: DevPki) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=pki.root_ca)
    client.minimum_version = ssl.TLSVersion.TLSv1
    client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("ALL:@SECLEVEL=0")
    result = handshake(server_context(pki.server_cert, pki.server_key), client)
    assert not result.succeeded
    assert result.version is None
    assert isinstance(result.server_error, ssl.SSLError)
    assert "unsupported protocol" in str(result.server_error)


@pytest.mark.parametrize(
    "cipher",
    ["AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305", "ECDHE-RSA-AES128-SHA"],
)
def test_tls12_with_a_suite_outside_the_list_is_refused(pki: DevPki, cipher: str) -> None:
    result = handshake(server_context(pki.server_cert, pki.server_key), _tls12_client(pki, cipher))
    assert not result.succeeded
    assert isinstance(result.server_error, ssl.SSLError)
    assert "no shared cipher" in str(result.server_error)


@pytest.mark.parametrize("cipher", MSSANTE_TLS12_CIPHERS.split(":"))
def test_tls12_with_each_mssante_suite_is_accepted(pki: DevPki, cipher: str) -> None:
    result = handshake(server_context(pki.server_cert, pki.server_key), _tls12_client(pki, cipher))
    assert result.succeeded, result
    assert (result.version, result.cipher) == ("TLSv1.2", cipher)


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_personal_certificate_is_verified_and_identifies_the_professional(
    pki: DevPki, doctor: IssuedCertificate, tls12: bool
) -> None:
    client = client_context(ca_file=pki.root_ca, cert_file=doctor.cert, key_file=doctor.key)
    if tls12:
        client.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(_mutual_server(pki), client)
    assert result.succeeded, result
    assert result.peer_der is not None
    identity = identity_from_der(result.peer_der)
    assert (identity.idnat_ps, identity.title, identity.surname, identity.given_name) == (
        "810001234567",
        "Médecin",
        "Martin",
        "Claire",
    )


def test_clients_without_a_certificate_are_still_accepted(pki: DevPki) -> None:
    result = handshake(_mutual_server(pki), client_context(ca_file=pki.root_ca))
    assert result.succeeded, result
    assert result.peer_der is None


def test_operator_server_certificate_works_as_client_certificate(pki: DevPki) -> None:
    client = client_context(ca_file=pki.root_ca, cert_file=pki.server_cert, key_file=pki.server_key)
    result = handshake(_mutual_server(pki), client)
    assert result.succeeded, result
    assert result.peer_der is not None
    assert identity_from_der(result.peer_der).idnat_struct == "1750000000"


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_revoked_certificate_is_refused_once_the_crl_lists_it(pki: DevPki, tls12: bool) -> None:
    issued = issue_personal_certificate(
        pki,
        idnat_ps="810000000099",
        surname="Revoque",
        given_name="Carte",
        profession="Infirmier",
        name=f"revoked-{tls12}",
    )
    client = client_context(ca_file=pki.root_ca, cert_file=issued.cert, key_file=issued.key)
    if tls12:
        client.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(_mutual_server(pki), client).succeeded
    revoke(pki, issued.cert)
    result = handshake(_mutual_server(pki), client)  # contexts read the CRL when built
    assert result.client_error is not None
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert result.server_error.verify_message == "certificate revoked"


def _stranger(tmp_path: Path) -> tuple[Path, Path]:
    """A client certificate from a CA the server does not know (self-signed, clientAuth)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
            x509.NameAttribute(NameOID.COMMON_NAME, "810001234567"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "stranger.pem", tmp_path / "stranger.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_client_certificate_from_an_unknown_ca_is_refused(pki: DevPki, tmp_path: Path) -> None:
    cert, key = _stranger(tmp_path)
    client = client_context(ca_file=pki.root_ca, cert_file=cert, key_file=key)
    result = handshake(_mutual_server(pki), client)
    assert result.client_error is not None
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert result.peer_der is None


async def test_peer_certificate_reads_asyncio_transports(
    pki: DevPki, doctor: IssuedCertificate
) -> None:
    seen: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(peer_certificate(writer.transport))
        writer.write(b"ok\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=_mutual_server(pki))
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = client_context(ca_file=pki.root_ca, cert_file=doctor.cert, key_file=doctor.key)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        assert await reader.readline() == b"ok\n"
        writer.close()
        await writer.wait_closed()
        der = await asyncio.wait_for(seen, 5)
    assert der is not None
    assert identity_from_der(der).idnat_ps == "810001234567"


def test_missing_files_are_named_in_the_error(pki: DevPki, tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    with pytest.raises(TlsConfigError, match=r"certificate file .*absent\.pem"):
        server_context(missing, pki.server_key)
    with pytest.raises(TlsConfigError, match=r"private key file .*absent\.pem"):
        server_context(pki.server_cert, missing)
    with pytest.raises(TlsConfigError, match=r"CA file .*absent\.pem"):
        server_context(pki.server_cert, pki.server_key, client_ca_file=missing)
    with pytest.raises(TlsConfigError, match=r"CRL file .*absent\.pem"):
        server_context(
            pki.server_cert, pki.server_key, client_ca_file=pki.ca_bundle, crl_file=missing
        )
    with pytest.raises(TlsConfigError, match=r"CA file .*absent\.pem"):
        client_context(ca_file=missing)


def test_unusable_files_are_named_in_the_error(pki: DevPki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match=r"cannot load certificate .*garbage\.pem"):
        server_context(garbage, pki.server_key)
    with pytest.raises(TlsConfigError, match=r"cannot load CA file .*garbage\.pem"):
        client_context(ca_file=garbage)
    with pytest.raises(
        TlsConfigError, match=r"cannot load certificate .*server\.pem with key .*root-ca\.key"
    ):
        server_context(pki.server_cert, pki.root_ca.with_suffix(".key"))
