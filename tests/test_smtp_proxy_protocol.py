"""SMTP behind a TCP load balancer (DESIGN.md, Scale-out): with
``smtp.proxy_protocol`` every connection on 25, 587 and 465 starts with a PROXY
header (haproxy's proxy-protocol.txt), before the greeting and before TLS on 465,
sent only by ``smtp.proxy_protocol_networks``; the client address it carries is
the one trusted networks, rate limits, the audit trail and the Received field
see. Real ``mssd serve``, real smtplib and raw sockets, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import smtplib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import (
    OTHER_OPERATOR_DOMAIN,
    PASSWORD,
    PER,
    PER2,
    MssdProcess,
    PkiBundle,
    inbox,
    run,
    seed,
    serve_seeded,
    store_url_for,
)
from proxy_headers import V2_LOCAL, v1, v2
from test_imap_proxy_protocol import assert_closed_without_greeting
from test_smtp_submission import _audit, message

from mssd.app import build_services
from mssd.config import ServerSettings, Settings, SmtpSettings, StoreSettings, TlsSettings
from mssd.proxy_protocol.accept import REFUSED
from mssd.smtp.listeners import Listener, start_smtp

HEADER_TIMEOUT = 3.0
BALANCERS = "127.0.0.0/8"
TRUSTED = "192.0.2.0/24,127.0.0.0/8"
"""Proxied clients in 192.0.2.0/24 may authenticate without TLS; so may the balancer
itself (127.0.0.1), which must not make the clients behind it trusted."""
OPERATOR_SENDER = f"medecin@{OTHER_OPERATOR_DOMAIN}"


@pytest.fixture(
    scope="module",
    params=[("sqlite", "auto"), ("postgresql", "auto"), ("sqlite", "asyncio")],
    ids=["sqlite", "postgresql", "sqlite-asyncio-loop"],
)
def proxied(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[MssdProcess]:
    """Also on asyncio's own loop: the header is read below aiosmtpd, and STARTTLS
    then swaps the transport's protocol again, where uvloop and asyncio differ."""
    backend, event_loop = request.param
    workdir = tmp_path_factory.mktemp(f"mssd-smtp-proxied-{backend}")
    for url in store_url_for(backend, workdir):
        yield from serve_seeded(
            url,
            test_pki,
            workdir,
            MSSD_SERVER_EVENT_LOOP=event_loop,
            MSSD_SMTP_PROXY_PROTOCOL="true",
            MSSD_SMTP_PROXY_PROTOCOL_NETWORKS=BALANCERS,
            MSSD_SMTP_PROXY_PROTOCOL_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
            MSSD_SERVER_TRUSTED_NETWORKS=TRUSTED,
            MSSD_AUTH_FAILURE_LIMIT_PER_ADDRESS="2",
        )


class ProxiedSMTP(smtplib.SMTP):
    """smtplib on 25 or 587 as seen through a load balancer: the header goes first."""

    def __init__(self, port: int, header: bytes) -> None:
        self.header = header
        super().__init__("127.0.0.1", port, timeout=30)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock.sendall(self.header)
        return sock  # type: ignore[no-any-return]


class ProxiedSMTP_SSL(smtplib.SMTP_SSL):
    """smtplib on 465 through a load balancer: the header, then the TLS handshake."""

    def __init__(self, port: int, header: bytes, context: ssl.SSLContext) -> None:
        self.header = header
        super().__init__("127.0.0.1", port, context=context, timeout=30)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = smtplib.SMTP._get_socket(self, host, port, timeout)  # type: ignore[attr-defined]
        # As a balancer relaying at once, the header and the ClientHello in one
        # segment where the system allows it (Linux's MSG_MORE).
        sock.send(self.header, getattr(socket, "MSG_MORE", 0))
        return self.context.wrap_socket(sock, server_hostname=host)


def audited(server: MssdProcess, remote: str) -> set[tuple[str, str]]:
    """(action, actor) of the audit records that name ``remote`` as the client."""
    events = run(_audit(server.url, "auth.")) + run(_audit(server.url, "message."))
    return {(e.action, e.actor) for e in events if e.remote == remote}


def received_from(server: MssdProcess, mailbox: str, subject: str) -> bytes:
    """The first line of the Received field of the one stored message with ``subject``."""
    stored = [c for _, c in inbox(server, mailbox) if f"Subject: {subject}".encode() in c]
    assert len(stored) == 1
    return stored[0].split(b"\r\n", 1)[0]


def assert_submitted_from(server: MssdProcess, client_address: str, subject: str) -> None:
    """PER's message to PER2 is traced, and its login and acceptance audited, as
    coming from ``client_address``."""
    # An IPv6 client is written as an RFC 5321 §4.1.3 IPv6-address-literal.
    literal = f"IPv6:{client_address}" if ":" in client_address else client_address
    assert received_from(server, PER2, subject) == (
        f"Received: from client.mssd.test ([{literal}])".encode()
    )
    assert {("auth.success", PER), ("message.accept", PER)} <= audited(server, client_address)


def auth_plain(client: smtplib.SMTP, login: str, password: str) -> int:
    """One AUTH PLAIN attempt (smtplib's login() retries with other mechanisms)."""
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {token}")[0]


@pytest.mark.parametrize("version", [1, 2])
def test_a_header_on_587_makes_the_proxied_client_the_traced_and_audited_one(
    proxied: MssdProcess, version: int
) -> None:
    client_address = f"198.51.100.{10 + version}"
    build = v1 if version == 1 else v2
    subject = f"via le repartiteur v{version}"
    with ProxiedSMTP(proxied.submission, build(client_address, "192.0.2.1", 40000, 587)) as client:
        client.ehlo("client.mssd.test")
        client.starttls(context=proxied.pki.client_context())
        client.ehlo("client.mssd.test")
        client.login(PER, PASSWORD)
        assert client.sendmail(PER, [PER2], message(subject)) == {}
    assert_submitted_from(proxied, client_address, subject)


@pytest.mark.parametrize(
    ("version", "client_address"), [(1, "198.51.100.21"), (2, "2001:db8::465")]
)
def test_a_header_on_465_comes_before_the_tls_handshake(
    proxied: MssdProcess, version: int, client_address: str
) -> None:
    build = v1 if version == 1 else v2
    destination = "192.0.2.1" if ":" not in client_address else "2001:db8::1"
    header = build(client_address, destination, 50000, 465)
    subject = f"en TLS implicite v{version}"
    context = proxied.pki.client_context()
    with ProxiedSMTP_SSL(proxied.submissions, header, context) as client:
        client.ehlo("client.mssd.test")
        assert not client.has_extn("starttls")
        client.login(PER, PASSWORD)
        assert client.sendmail(PER, [PER2], message(subject)) == {}
    assert_submitted_from(proxied, client_address, subject)


def test_a_header_on_25_names_the_other_operators_mta(proxied: MssdProcess) -> None:
    header = v2("198.51.100.25", "192.0.2.1", 40000, 25)
    with ProxiedSMTP(proxied.mta, header) as client:
        client.ehlo("mx.autre-operateur.mssd.test")
        client.starttls(context=proxied.pki.client_context(proxied.pki.app))
        client.ehlo("mx.autre-operateur.mssd.test")
        refused = client.sendmail(
            OPERATOR_SENDER, [PER], message("d'un autre operateur", OPERATOR_SENDER)
        )
    assert refused == {}
    assert received_from(proxied, PER, "d'un autre operateur") == (
        b"Received: from mx.autre-operateur.mssd.test ([198.51.100.25])"
    )
    assert ("message.accept", OPERATOR_SENDER) in audited(proxied, "198.51.100.25")


def test_a_client_certificate_reaches_external_through_the_balancer(
    proxied: MssdProcess,
) -> None:
    context = proxied.pki.client_context(proxied.pki.personal)
    header = v2("198.51.100.50", "192.0.2.1", 50000, 465)
    with ProxiedSMTP_SSL(proxied.submissions, header, context) as client:
        client.ehlo("client.mssd.test")
        assert "EXTERNAL" in client.esmtp_features["auth"].split()
        assert client.docmd("AUTH", "EXTERNAL =")[0] == 235


def test_a_command_in_the_same_segment_as_the_header_is_answered(proxied: MssdProcess) -> None:
    with socket.create_connection(("127.0.0.1", proxied.submission), timeout=30) as raw:
        raw.sendall(v2("198.51.100.40", "192.0.2.1", 40000, 587) + b"EHLO client.mssd.test\r\n")
        replies = raw.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        lines = [replies.readline()]
        while lines[-1].startswith(b"250-"):
            lines.append(replies.readline())
        assert lines[-1] == b"250 HELP\r\n" and b"250-STARTTLS\r\n" in lines


def test_a_client_proxied_from_a_trusted_network_authenticates_without_tls(
    proxied: MssdProcess,
) -> None:
    with ProxiedSMTP(proxied.submission, v2("192.0.2.25", "192.0.2.1", 40000, 587)) as client:
        client.ehlo("client.mssd.test")
        assert "PLAIN" in client.esmtp_features["auth"].split()
        assert auth_plain(client, PER, PASSWORD) == 235
        assert client.sendmail(PER, [PER2], message("en clair depuis le reseau")) == {}
    assert ("auth.success", PER) in audited(proxied, "192.0.2.25")


@pytest.mark.parametrize("version", [1, 2])
def test_a_client_proxied_from_elsewhere_needs_tls_though_the_balancer_is_trusted(
    proxied: MssdProcess, version: int
) -> None:
    build = v1 if version == 1 else v2
    with ProxiedSMTP(proxied.submission, build("198.51.100.30", "192.0.2.1", 40000, 587)) as client:
        client.ehlo("client.mssd.test")
        assert not client.has_extn("auth")
        # RFC 3207 §4: STARTTLS first, for AUTH (no plaintext password) as for MAIL.
        for command, arg in [("AUTH", "PLAIN AGEAYg=="), ("MAIL", f"FROM:<{PER}>")]:
            code, text = client.docmd(command, arg)
            assert code == 530 and text.startswith(b"5.7.0 Must issue a STARTTLS command first")


def test_a_local_header_keeps_the_balancers_own_address(proxied: MssdProcess) -> None:
    # PP §2.2: LOCAL is the balancer's own connection (a health check, a relay on
    # its host): the socket's peer, 127.0.0.1, which is trusted here.
    with ProxiedSMTP(proxied.submission, V2_LOCAL) as client:
        client.ehlo("balancer.mssd.test")
        assert auth_plain(client, PER, PASSWORD) == 235
        assert client.sendmail(PER, [PER2], message("depuis le repartiteur")) == {}
    assert received_from(proxied, PER2, "depuis le repartiteur") == (
        b"Received: from balancer.mssd.test ([127.0.0.1])"
    )


def test_failed_logins_are_counted_against_the_proxied_address(proxied: MssdProcess) -> None:
    header = v2("192.0.2.66", "192.0.2.1", 40000, 587)
    for _ in range(2):
        with ProxiedSMTP(proxied.submission, header) as client:
            client.ehlo("client.mssd.test")
            assert auth_plain(client, PER2, "not the password") == 535
    with ProxiedSMTP(proxied.submission, header) as client:
        client.ehlo("client.mssd.test")
        # The right password, from a locked-out address.
        assert auth_plain(client, PER2, PASSWORD) == 454
    with ProxiedSMTP(proxied.submission, v2("192.0.2.67", "192.0.2.1", 40000, 587)) as other:
        other.ehlo("client.mssd.test")
        assert auth_plain(other, PER2, PASSWORD) == 235
    assert ("auth.failure", PER2) in audited(proxied, "192.0.2.66")


@pytest.mark.parametrize(
    "sent",
    [
        b"EHLO client.mssd.test\r\n",  # a client talking SMTP straight to the port
        b"PROXY TCP4 192.0.2.10 192.0.2.1 40000\r\n",
        b"PROXY TCP4 192.0.2.10 192.0.2.1 40000 587\n",
        b"PROXY TCP4 192.0.2.010 192.0.2.1 40000 587\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x23\x11\x00\x0c" + bytes(12),  # command 3
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",  # an address block past the limit
    ],
)
@pytest.mark.parametrize("listener", ["smtp_mta", "smtp_submission"])
def test_an_invalid_header_closes_the_connection_and_the_listener_goes_on(
    proxied: MssdProcess, sent: bytes, listener: str
) -> None:
    port = proxied.ports[listener]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(sent)
        assert_closed_without_greeting(raw)
    with ProxiedSMTP(port, v1("198.51.100.70", "192.0.2.1", 40000, 25)) as client:
        assert client.noop()[0] == 250


def test_tls_without_a_header_on_465_is_refused(proxied: MssdProcess) -> None:
    with pytest.raises((ssl.SSLError, OSError, smtplib.SMTPServerDisconnected)):
        smtplib.SMTP_SSL(
            "127.0.0.1", proxied.submissions, context=proxied.pki.client_context(), timeout=30
        )


def test_plaintext_after_the_header_on_465_fails_the_handshake(proxied: MssdProcess) -> None:
    with socket.create_connection(("127.0.0.1", proxied.submissions), timeout=30) as raw:
        raw.sendall(v2("198.51.100.60", "192.0.2.1", 50000, 465) + b"EHLO client.mssd.test\r\n")
        assert_closed_without_greeting(raw)
    header = v2("198.51.100.61", "192.0.2.1", 50000, 465)
    with ProxiedSMTP_SSL(proxied.submissions, header, proxied.pki.client_context()) as client:
        assert client.noop()[0] == 250


def test_a_client_waiting_for_a_greeting_is_closed_after_the_header_timeout(
    proxied: MssdProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", proxied.mta), timeout=30) as raw:
        started = time.monotonic()
        assert_closed_without_greeting(raw)
        waited = time.monotonic() - started
    assert HEADER_TIMEOUT - 0.5 <= waited < HEADER_TIMEOUT + 10


@pytest.fixture(scope="module")
def elsewhere_balanced(
    tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[MssdProcess]:
    """Only 203.0.113.0/24 may send headers. The check precedes any store access,
    so one backend is enough."""
    workdir = tmp_path_factory.mktemp("mssd-smtp-elsewhere")
    for url in store_url_for("sqlite", workdir):
        yield from serve_seeded(
            url,
            test_pki,
            workdir,
            MSSD_SMTP_PROXY_PROTOCOL="true",
            MSSD_SMTP_PROXY_PROTOCOL_NETWORKS="203.0.113.0/24",
            # Even a peer allowed plaintext authentication may not claim an address.
            MSSD_SERVER_TRUSTED_NETWORKS="127.0.0.0/8",
        )


@pytest.mark.parametrize("listener", ["smtp_mta", "smtp_submission", "smtp_submissions"])
def test_a_header_from_outside_the_balancer_networks_is_not_believed(
    elsewhere_balanced: MssdProcess, listener: str
) -> None:
    with socket.create_connection(("127.0.0.1", elsewhere_balanced.ports[listener])) as raw:
        raw.settimeout(30)
        raw.sendall(v2("192.0.2.10", "192.0.2.1", 40000, 587))
        assert_closed_without_greeting(raw)
    expected = f"{listener}: closing 127.0.0.1, no session: not in the networks allowed"
    assert elsewhere_balanced.log is not None
    deadline = time.monotonic() + 10
    while expected not in elsewhere_balanced.log.read_text():
        assert time.monotonic() < deadline, f"no log line {expected!r}"
        time.sleep(0.05)


# -- in process: the counters, and aiosmtpd's own view of the session ----------------

REASONS = ("invalid", "not-allowed")


@contextlib.asynccontextmanager
async def in_process_listeners(
    url: str, test_pki: PkiBundle, workdir: Path, *networks: str
) -> AsyncIterator[list[Listener]]:
    """The three SMTP listeners behind a balancer in ``networks[0]``, then three
    more for ``networks[1]``...: counters and loggers are per process."""
    smtp = SmtpSettings(
        mta_listen="127.0.0.1:0",
        submission_listen="127.0.0.1:0",
        submissions_listen="127.0.0.1:0",
        proxy_protocol=True,
    )
    settings = Settings(
        server=ServerSettings(var_dir=workdir),
        store=StoreSettings(url=url),
        smtp=smtp,
        tls=TlsSettings(
            cert_file=test_pki.dev.server_cert,
            key_file=test_pki.dev.server_key,
            client_ca_file=test_pki.dev.ca_bundle,
            crl_file=test_pki.dev.crl,
        ),
    )
    services = await build_services(settings)
    listeners: list[Listener] = []
    try:
        for network in networks:
            balanced = dataclasses.replace(
                settings, smtp=dataclasses.replace(smtp, proxy_protocol_networks=(network,))
            )
            listeners += await start_smtp(
                balanced, services.pipeline, services.authenticator, services.tls
            )
        yield listeners
    finally:
        for listener in listeners:
            listener.server.close()
        await services.close()


async def _refusals_counted(url: str, test_pki: PkiBundle, workdir: Path) -> dict[str, float]:
    async with in_process_listeners(url, test_pki, workdir, BALANCERS, "203.0.113.0/24") as on:
        counts = [(listener.name, reason) for listener in on for reason in REASONS]
        before = {(name, reason): REFUSED.value(f"smtp_{name}", reason) for name, reason in counts}
        for listener in on:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"EHLO client.mssd.test\r\n")
            try:
                assert await asyncio.wait_for(reader.read(), 10) == b""
            except ConnectionResetError:
                pass
            writer.close()
        return {
            f"{name}/{reason}": REFUSED.value(f"smtp_{name}", reason) - count
            for (name, reason), count in before.items()
        }


def test_refused_connections_are_counted_by_listener_and_reason(
    store_url: str, test_pki: PkiBundle, tmp_path: Path
) -> None:
    run(seed(store_url, test_pki))
    counted = run(_refusals_counted(store_url, test_pki, tmp_path))
    # Each listener twice: once allowed to send a header (the EHLO is not one),
    # once from outside the balancer networks.
    for name in ("mta", "submission", "submissions"):
        assert counted[f"{name}/invalid"] == 1
        assert counted[f"{name}/not-allowed"] == 1


async def _session_peers(
    url: str, test_pki: PkiBundle, workdir: Path, caplog: pytest.LogCaptureFixture
) -> list[object]:
    """The peers aiosmtpd names in its log for one proxied session on 587 with STARTTLS."""
    async with in_process_listeners(url, test_pki, workdir, BALANCERS) as on:
        port = next(listener.port for listener in on if listener.name == "submission")

        def talk() -> None:
            with ProxiedSMTP(port, v2("198.51.100.80", "192.0.2.1", 40080, 587)) as client:
                client.ehlo("client.mssd.test")
                client.starttls(context=test_pki.client_context())
                client.ehlo("client.mssd.test")

        with caplog.at_level(logging.INFO, logger="mail.log"):
            await asyncio.to_thread(talk)
            for _ in range(200):
                if any(r.msg == "%r connection lost" for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
    return [
        record.args[0]
        for record in caplog.records
        # Its commands and the end of the session (the "Peer:" line is logged by
        # aiosmtpd before the session is told who the client is).
        if record.msg in ("%r >> %r", "%r connection lost") and isinstance(record.args, tuple)
    ]


def test_aiosmtpd_session_peer_is_the_headers_source_before_and_after_starttls(
    store_url: str, test_pki: PkiBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run(seed(store_url, test_pki))
    peers = run(_session_peers(store_url, test_pki, tmp_path, caplog))
    # EHLO, STARTTLS, EHLO, QUIT, and the connection's end.
    assert peers == [("198.51.100.80", 40080)] * 5
