"""IMAP behind a TCP load balancer (DESIGN.md, Scale-out): with
``imap.proxy_protocol`` every connection on 143 and 993 starts with a PROXY header
(haproxy's proxy-protocol.txt), before the greeting and before TLS, and the
client address it carries is the one trusted networks, rate limits and the audit
trail see. Real ``mssd serve``, real sockets, on SQLite and PostgreSQL."""

from __future__ import annotations

import imaplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    PASSWORD,
    PER,
    PER2,
    PER_IDNAT,
    MssdProcess,
    PkiBundle,
    run,
    serve_seeded,
    store_url_for,
)
from proxy_headers import V2_LOCAL, v1, v2
from test_smtp_submission import _audit

HEADER_TIMEOUT = 3.0
BALANCERS = "127.0.0.0/8"
TRUSTED = "192.0.2.0/24"
"""Proxied clients in this network may log in without TLS; the balancer itself is not."""


@pytest.fixture(
    scope="module",
    params=[("sqlite", "auto"), ("postgresql", "auto"), ("sqlite", "asyncio")],
    ids=["sqlite", "postgresql", "sqlite-asyncio-loop"],
)
def proxied(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[MssdProcess]:
    """Also on asyncio's own loop: the header is read below the streams layer,
    where uvloop (the default when installed) and asyncio differ."""
    backend, event_loop = request.param
    workdir = tmp_path_factory.mktemp(f"mssd-proxied-{backend}")
    for url in store_url_for(backend, workdir):
        yield from serve_seeded(
            url,
            test_pki,
            workdir,
            MSSD_SERVER_EVENT_LOOP=event_loop,
            MSSD_IMAP_PROXY_PROTOCOL="true",
            MSSD_IMAP_PROXY_PROTOCOL_NETWORKS=BALANCERS,
            MSSD_IMAP_PROXY_PROTOCOL_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
            MSSD_SERVER_TRUSTED_NETWORKS=TRUSTED,
            MSSD_AUTH_FAILURE_LIMIT_PER_ADDRESS="2",
        )


class ProxiedIMAP4(imaplib.IMAP4):
    """imaplib on 143 as seen through a load balancer: the header goes first."""

    def __init__(self, port: int, header: bytes) -> None:
        self.header = header
        super().__init__("127.0.0.1", port, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = super()._create_socket(timeout)
        sock.sendall(self.header)
        return sock


class ProxiedIMAP4_SSL(imaplib.IMAP4_SSL):
    """imaplib on 993 through a load balancer: the header, then the TLS handshake."""

    def __init__(self, port: int, header: bytes, context: ssl.SSLContext) -> None:
        self.header = header
        super().__init__("127.0.0.1", port, ssl_context=context, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = imaplib.IMAP4._create_socket(self, timeout)
        # As a balancer relaying at once, the header and the ClientHello in one
        # segment where the system allows it (Linux's MSG_MORE).
        sock.send(self.header, getattr(socket, "MSG_MORE", 0))
        return self.ssl_context.wrap_socket(sock, server_hostname="localhost")  # type: ignore[attr-defined,no-any-return]


def audited(server: MssdProcess, remote: str) -> set[tuple[str, str]]:
    """(action, actor) of the audit records that name ``remote`` as the client."""
    events = run(_audit(server.url, ""))
    return {(e.action, e.actor) for e in events if e.remote == remote}  # type: ignore[attr-defined]


def assert_closed_without_greeting(sock: socket.socket) -> None:
    try:
        assert sock.recv(1024) == b""
    except ConnectionResetError:
        pass  # closed with our octets unread: a reset, still no greeting


@pytest.mark.parametrize("version", [1, 2])
def test_a_header_on_143_makes_the_proxied_client_the_audited_one(
    proxied: MssdProcess, version: int
) -> None:
    client_address = f"198.51.100.{10 + version}"
    build = v1 if version == 1 else v2
    client = ProxiedIMAP4(proxied.imap, build(client_address, "192.0.2.1", 40000, 143))
    client.starttls(ssl_context=proxied.pki.client_context())
    client.login(PER2, PASSWORD)
    assert client.select("INBOX")[0] == "OK"
    client.logout()
    assert {("auth.success", PER2), ("imap.select", PER2)} <= audited(proxied, client_address)


@pytest.mark.parametrize(
    ("version", "client_address"), [(1, "198.51.100.21"), (2, "2001:db8::993")]
)
def test_a_header_on_993_comes_before_the_tls_handshake(
    proxied: MssdProcess, version: int, client_address: str
) -> None:
    build = v1 if version == 1 else v2
    destination = "192.0.2.1" if ":" not in client_address else "2001:db8::1"
    header = build(client_address, destination, 50000, 993)
    client = ProxiedIMAP4_SSL(proxied.imaps, header, proxied.pki.client_context())
    assert "STARTTLS" not in client.capabilities
    client.login(PER2, PASSWORD)
    assert client.select("INBOX")[0] == "OK"
    client.logout()
    assert {("auth.success", PER2), ("imap.select", PER2)} <= audited(proxied, client_address)


def test_a_client_certificate_reaches_external_through_the_balancer(
    proxied: MssdProcess,
) -> None:
    context = proxied.pki.client_context(proxied.pki.personal)
    header = v2("198.51.100.50", "192.0.2.1", 50000, 993)
    client = ProxiedIMAP4_SSL(proxied.imaps, header, context)
    assert client.authenticate("EXTERNAL", lambda _: b"")[0] == "OK"
    client.logout()
    assert ("auth.success", PER_IDNAT) in audited(proxied, "198.51.100.50")


def test_a_command_in_the_same_segment_as_the_header_is_answered(proxied: MssdProcess) -> None:
    with socket.create_connection(("127.0.0.1", proxied.imap), timeout=30) as raw:
        raw.sendall(v2("198.51.100.40", "192.0.2.1", 40000, 143) + b"a1 NOOP\r\n")
        replies = raw.makefile("rb")
        assert replies.readline().startswith(b"* OK [CAPABILITY ")
        assert replies.readline() == b"a1 OK NOOP completed\r\n"


def test_a_client_proxied_from_a_trusted_network_logs_in_without_tls(
    proxied: MssdProcess,
) -> None:
    client = ProxiedIMAP4(proxied.imap, v2("192.0.2.25", "192.0.2.1", 40000, 143))
    assert "LOGINDISABLED" not in client.capabilities
    assert client.login(PER2, PASSWORD)[0] == "OK"
    client.logout()
    assert ("auth.success", PER2) in audited(proxied, "192.0.2.25")


def test_a_client_proxied_from_elsewhere_gets_logindisabled(proxied: MssdProcess) -> None:
    # The balancer's own address (127.0.0.1) is not trusted either: only the header counts.
    client = ProxiedIMAP4(proxied.imap, v1("198.51.100.30", "192.0.2.1", 40000, 143))
    try:
        assert "LOGINDISABLED" in client.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            client.login(PER2, PASSWORD)
    finally:
        client.shutdown()


def test_a_local_header_keeps_the_balancers_own_address(proxied: MssdProcess) -> None:
    client = ProxiedIMAP4(proxied.imap, V2_LOCAL)
    assert "LOGINDISABLED" in client.capabilities
    client.starttls(ssl_context=proxied.pki.client_context())
    client.login(PER2, PASSWORD)
    client.logout()
    assert ("auth.success", PER2) in audited(proxied, "127.0.0.1")


def test_failed_logins_are_counted_against_the_proxied_address(proxied: MssdProcess) -> None:
    header = v2("192.0.2.66", "192.0.2.1", 40000, 143)
    for _ in range(2):
        client = ProxiedIMAP4(proxied.imap, header)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(PER, "not the password")
        client.shutdown()
    client = ProxiedIMAP4(proxied.imap, header)
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        client.login(PER, PASSWORD)  # the right password, from a locked-out address
    client.shutdown()
    other = ProxiedIMAP4(proxied.imap, v2("192.0.2.67", "192.0.2.1", 40000, 143))
    assert other.login(PER, PASSWORD)[0] == "OK"
    other.logout()
    assert ("auth.failure", PER) in audited(proxied, "192.0.2.66")


@pytest.mark.parametrize(
    "sent",
    [
        b"a1 CAPABILITY\r\n",  # a client talking IMAP straight to the port
        b"PROXY TCP4 192.0.2.10 192.0.2.1 40000\r\n",
        b"PROXY TCP4 192.0.2.10 192.0.2.1 40000 143\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x23\x11\x00\x0c" + bytes(12),  # command 3
    ],
)
def test_an_invalid_header_closes_the_connection_without_a_greeting(
    proxied: MssdProcess, sent: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", proxied.imap), timeout=30) as raw:
        raw.sendall(sent)
        assert_closed_without_greeting(raw)


def test_tls_without_a_header_on_993_is_refused(proxied: MssdProcess) -> None:
    with pytest.raises((ssl.SSLError, OSError)):
        imaplib.IMAP4_SSL(
            "127.0.0.1", proxied.imaps, ssl_context=proxied.pki.client_context(), timeout=30
        )


def test_plaintext_after_the_header_on_993_fails_the_handshake(proxied: MssdProcess) -> None:
    with socket.create_connection(("127.0.0.1", proxied.imaps), timeout=30) as raw:
        raw.sendall(v2("198.51.100.60", "192.0.2.1", 50000, 993) + b"a1 CAPABILITY\r\n")
        assert_closed_without_greeting(raw)


def test_a_client_waiting_for_a_greeting_is_closed_after_the_header_timeout(
    proxied: MssdProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", proxied.imap), timeout=30) as raw:
        started = time.monotonic()
        assert_closed_without_greeting(raw)
        waited = time.monotonic() - started
    assert HEADER_TIMEOUT - 0.5 <= waited < HEADER_TIMEOUT + 10


@pytest.fixture
def elsewhere_balanced(test_pki: PkiBundle, tmp_path: Path) -> Iterator[MssdProcess]:
    """Only 203.0.113.0/24 may send headers. The check precedes any store access,
    so one backend is enough."""
    for url in store_url_for("sqlite", tmp_path):
        yield from serve_seeded(
            url,
            test_pki,
            tmp_path,
            MSSD_IMAP_PROXY_PROTOCOL="true",
            MSSD_IMAP_PROXY_PROTOCOL_NETWORKS="203.0.113.0/24",
        )


@pytest.mark.parametrize("listener", ["imap", "imaps"])
def test_a_header_from_outside_the_balancer_networks_is_not_believed(
    elsewhere_balanced: MssdProcess, listener: str
) -> None:
    port = elsewhere_balanced.ports[listener]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(v2("192.0.2.10", "192.0.2.1", 40000, 143))
        assert_closed_without_greeting(raw)


def test_without_the_setting_a_header_is_a_bad_command(mssd: MssdProcess) -> None:
    with socket.create_connection(("127.0.0.1", mssd.imap), timeout=30) as raw:
        replies = raw.makefile("rb")
        assert replies.readline().startswith(b"* OK")
        raw.sendall(v1("192.0.2.10", "192.0.2.1", 40000, 143) + b"a1 CAPABILITY\r\n")
        assert replies.readline() == b"PROXY BAD unknown command\r\n"
        capability = replies.readline()
        assert b"LOGINDISABLED" in capability  # still the loopback peer: not trusted
        assert replies.readline().startswith(b"a1 OK")
