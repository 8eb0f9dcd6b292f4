"""8-bit messages and peers with and without 8BITMIME (RFC 6152): a peer that offers it
gets the message as stored with BODY=8BITMIME; one that does not gets it converted to 7
bits (quoted-printable for text, base64 otherwise), signed after the conversion so that
DKIM verifies; a message no conversion can fix fails with a report. Real relay and store
on SQLite and PostgreSQL, scripted peers on loopback sockets."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
from conftest import PkiBundle
from scripted_peer import (
    DEFAULT_EXTENSIONS,
    SENDER,
    SENDER_DOMAIN,
    PeerIdentity,
    ScriptedPeer,
    relay_for,
    report_fields,
)

from mssd.delivery.dkim import DkimSigner, DkimVerifier, generate_key, make_dns_function

DOMAIN = "pair.mssd.test"
RECIPIENT = f"confrere@{DOMAIN}"
WITHOUT_8BITMIME = tuple(e for e in DEFAULT_EXTENSIONS if e != "8BITMIME")
TEXT = "Résultats : hémoglobine 14,2 g/dl, à revoir dans 3 mois.\r\n"
HEADER = (
    f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: CR\r\nMessage-ID: <8bit@x>\r\n"
    "MIME-Version: 1.0\r\n"
)
SINGLE = (
    HEADER + "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    "\r\n" + TEXT
).encode()
PDF = b"%PDF-1.4\r\n\xe2\xe3\xcf\xd3 binary\r\n"
MIXED = (
    HEADER.encode()
    + b'Content-Type: multipart/mixed; boundary="limite"\r\n\r\n--limite\r\n'
    + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + TEXT.encode()
    + b"--limite\r\nContent-Type: application/pdf\r\n\r\n"
    + PDF
    + b"--limite--\r\n"
)


@pytest.fixture
def dkim(tmp_path: Path) -> tuple[DkimSigner, DkimVerifier]:
    _, record = generate_key(tmp_path / "dkim", SENDER_DOMAIN, "mssd")
    records = {f"mssd._domainkey.{SENDER_DOMAIN}": record.encode()}
    lookup = make_dns_function(records, use_dns=False, timeout=1)
    return DkimSigner(tmp_path / "dkim", "mssd"), DkimVerifier("mx.pair", lookup, timeout=1)


def _parts(data: bytes) -> list[tuple[str, str | None, object]]:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    return [
        (p.get_content_type(), p["Content-Transfer-Encoding"], p.get_content())  # type: ignore[attr-defined]
        for p in parsed.walk()
        if not p.is_multipart()
    ]


async def test_a_peer_without_8bitmime_gets_the_message_in_7_bits_and_signed(
    store_url: str,
    test_pki: PkiBundle,
    peer_identity: PeerIdentity,
    dkim: tuple[DkimSigner, DkimVerifier],
) -> None:
    signer, verifier = dkim
    peer = await ScriptedPeer(peer_identity.context, extensions=WITHOUT_8BITMIME).start()
    async with relay_for(store_url, test_pki, {DOMAIN: peer}, peer_identity) as relay:
        relay.start_worker(signer=signer)
        await relay.queue([RECIPIENT], SINGLE, body="8BITMIME")
        await relay.queue([RECIPIENT], MIXED, body="8BITMIME")
        await relay.run_once()
        assert {e.state for e in (await relay.entries()).values()} == {"delivered"}
    # The two may travel over two connections (a domain is spread over
    # relay.max_connections_per_peer): told apart by content, not arrival order.
    single, mixed = sorted(peer.received, key=lambda received: len(_parts(received.data)))
    for received in (single, mixed):
        assert received.data.isascii()
        assert "BODY=8BITMIME" not in received.mail
        assert (
            verifier.header(received.data)
            == (
                f"Authentication-Results: mx.pair; dkim=pass header.d={SENDER_DOMAIN} "
                "header.s=mssd\r\n"
            ).encode()
        )
    assert _parts(single.data) == [("text/plain", "quoted-printable", TEXT)]
    assert b"R=C3=A9sultats : h=C3=A9moglobine 14,2 g/dl, =C3=A0 revoir" in single.data
    # RFC 2046 §5.1.1: the line break before a delimiter belongs to the delimiter.
    assert _parts(mixed.data) == [
        ("text/plain", "quoted-printable", TEXT.removesuffix("\r\n")),
        ("application/pdf", "base64", PDF.removesuffix(b"\r\n")),
    ]


async def test_a_peer_with_8bitmime_gets_the_message_as_it_is(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    peer = await ScriptedPeer(peer_identity.context).start()
    async with relay_for(store_url, test_pki, {DOMAIN: peer}, peer_identity) as relay:
        # Declared 7BIT by a careless client: the octets decide.
        await relay.queue([RECIPIENT], SINGLE, body="7BIT")
        await relay.run_once()
    [received] = peer.received
    assert received.mail.endswith(" BODY=8BITMIME") and received.data == SINGLE


async def test_a_message_that_cannot_be_made_7_bit_fails_with_a_report(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    raw_header = SINGLE.replace(b"Subject: CR", "Subject: Compte rendu d'hémato".encode())
    peer = await ScriptedPeer(peer_identity.context, extensions=WITHOUT_8BITMIME).start()
    async with relay_for(store_url, test_pki, {DOMAIN: peer}, peer_identity) as relay:
        await relay.queue([RECIPIENT], raw_header)
        await relay.run_once()
        entry = (await relay.entries())[RECIPIENT]
        [report] = await relay.reports()
    assert not peer.received and not any(c.startswith("MAIL") for c in peer.commands)
    reason = (
        f"127.0.0.1:{peer.port} does not offer 8BITMIME and the message cannot be made "
        "7-bit: 8-bit octets in a header field"
    )
    assert (entry.state, entry.last_error) == ("failed", reason)
    _, recipient = report_fields(report)
    assert (recipient["Action"], recipient["Status"]) == ("failed", "5.6.3")
    assert recipient["Diagnostic-Code"] == f"smtp; {reason}"
