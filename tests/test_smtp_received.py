"""The client address in the Received field mssd writes: the TCP-info of RFC 5321
§4.4, an address-literal of RFC 5321 §4.1.3 (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``).
The field itself, then a submission over a real IPv6 loopback connection, on SQLite
and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import smtplib
import socket
from collections.abc import Iterator

import pytest
from conftest import PASSWORD, PER, PER2, MssdProcess, PkiBundle, inbox, serve_seeded, store_url_for
from test_smtp_submission import message

from mssd.mime.headers import received_field


def _received(remote_ip: str) -> bytes:
    return received_field(
        helo="client.mssd.test",
        remote_ip=remote_ip,
        hostname="mx.mssd.test",
        protocol="ESMTPSA",
        envelope_id="0123abcd",
        tls=None,
        recipient=None,
        moment=dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.UTC),
    )


@pytest.mark.parametrize(
    ("remote_ip", "literal"),
    [
        ("192.0.2.25", "[192.0.2.25]"),
        ("2001:db8::465", "[IPv6:2001:db8::465]"),
        # RFC 5952 text form, whatever the spelling the address came in.
        ("2001:DB8:0:0:0:0:0:465", "[IPv6:2001:db8::465]"),
        ("::1", "[IPv6:::1]"),
        # An IPv4 client seen through a dual-stack socket or a PROXY header.
        ("::ffff:192.0.2.25", "[192.0.2.25]"),
        # IPv6-addr (RFC 5321 §4.1.3) has no zone index.
        ("fe80::1%eth0", "[IPv6:fe80::1]"),
    ],
)
def test_the_client_address_is_an_address_literal(remote_ip: str, literal: str) -> None:
    expected = (
        f"Received: from client.mssd.test ({literal})\r\n"
        "\tby mx.mssd.test (mssd) with ESMTPSA id 0123abcd;\r\n"
        "\tSun, 22 Nov 2026 08:00:00 +0000\r\n"
    )
    assert _received(remote_ip) == expected.encode()


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def over_ipv6(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[MssdProcess]:
    """mssd with its submission port (587) on the IPv6 loopback."""
    if not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (cannot bind ::1)")
    workdir = tmp_path_factory.mktemp(f"mssd-ipv6-{request.param}")
    for url in store_url_for(request.param, workdir):
        yield from serve_seeded(url, test_pki, workdir, MSSD_SMTP_SUBMISSION_LISTEN="[::1]:0")


def test_a_submission_over_ipv6_is_traced_with_an_ipv6_address_literal(
    over_ipv6: MssdProcess,
) -> None:
    subject = "soumis en IPv6"
    with smtplib.SMTP("::1", over_ipv6.submission, timeout=30) as client:
        client.starttls(context=over_ipv6.pki.client_context())
        client.ehlo("client.mssd.test")
        client.login(PER, PASSWORD)
        assert client.sendmail(PER, [PER2], message(subject)) == {}
    (stored,) = [c for _, c in inbox(over_ipv6, PER2) if f"Subject: {subject}".encode() in c]
    assert stored.split(b"\r\n", 1)[0] == b"Received: from client.mssd.test ([IPv6:::1])"
