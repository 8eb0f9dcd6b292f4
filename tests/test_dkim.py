"""DKIM signing and verification (no DNS: records come from a table), `mssd dkim keygen`,
and the X-MSS-NIL usage counter."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.resolver
import pytest

from mssd.delivery.dkim import (
    DkimSigner,
    DkimVerifier,
    generate_key,
    make_dns_function,
    read_txt_records,
)
from mssd.delivery.pipeline import MSS_NIL, count_mss_nil

DOMAIN = "operateur-a.mssd.test"
MESSAGE = (
    b"From: <docteur@operateur-a.mssd.test>\r\nTo: <confrere@operateur-b.mssd.test>\r\n"
    b"Subject: CR\r\nX-MSS-INS: 1234567890123456789\r\nX-MSS-NIL: Logiciel/1.0\r\n"
    b"\r\nCompte rendu\r\n"
)


@pytest.fixture
def keyed(tmp_path: Path) -> tuple[DkimSigner, dict[str, bytes]]:
    key_file, record = generate_key(tmp_path / "dkim", DOMAIN, "mssd")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert record.startswith("v=DKIM1; k=rsa; p=")
    return DkimSigner(tmp_path / "dkim", "mssd"), {f"mssd._domainkey.{DOMAIN}": record.encode()}


def _verify(records: dict[str, bytes], content: bytes) -> bytes:
    lookup = make_dns_function(records, use_dns=False, timeout=1)
    return DkimVerifier("mx.b.mssd.test", lookup, timeout=1).header(content)


def test_signed_mail_verifies_and_names_the_domain(
    keyed: tuple[DkimSigner, dict[str, bytes]],
) -> None:
    signer, records = keyed
    signed = signer.sign(MESSAGE, DOMAIN)
    assert signed.startswith(b"DKIM-Signature: ") and signed.endswith(MESSAGE)
    assert b"x-mss-ins" in signed.split(b"\r\n\r\n")[0].lower()
    assert (
        _verify(records, signed)
        == (
            f"Authentication-Results: mx.b.mssd.test; dkim=pass header.d={DOMAIN} header.s=mssd\r\n"
        ).encode()
    )


def test_a_changed_mssante_field_fails(keyed: tuple[DkimSigner, dict[str, bytes]]) -> None:
    signer, records = keyed
    signed = signer.sign(MESSAGE, DOMAIN).replace(b"X-MSS-INS: 1234", b"X-MSS-INS: 9999")
    assert b"dkim=fail" in _verify(records, signed)


def _result(outcome: str, signatures: int = 1) -> bytes:
    one = f"dkim={outcome} header.d={DOMAIN} header.s=mssd"
    return f"Authentication-Results: mx.b.mssd.test; {'; '.join([one] * signatures)}\r\n".encode()


def test_unsigned_unknown_key_and_no_key(
    keyed: tuple[DkimSigner, dict[str, bytes]], tmp_path: Path
) -> None:
    signer, records = keyed
    assert _verify({}, MESSAGE) == b"Authentication-Results: mx.b.mssd.test; dkim=none\r\n"
    signed = signer.sign(MESSAGE, DOMAIN)
    # RFC 6376 §6.1.2, RFC 8601 §2.7.1: no key record, or one that is not a key, is a
    # permanent error, not a failed signature (and never an exception).
    assert _verify({}, signed) == _result("permerror")
    [name] = records
    assert _verify({name: b"v=DKIM1; k=rsa; p=pas-du-base64!"}, signed) == _result("permerror")
    # A key that does not match the signature: that one fails.
    _, other = generate_key(tmp_path / "other", DOMAIN, "mssd")
    assert _verify({name: other.encode()}, signed) == _result("fail")
    # A domain without a key is sent unsigned.
    assert signer.sign(MESSAGE, "autre.mssd.test") == MESSAGE


@pytest.fixture
def silent_dns() -> Iterator[dns.resolver.Resolver]:
    """A resolver whose only server, on a loopback UDP port, never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = silent.getsockname()[1]
        yield resolver


async def test_a_hung_key_look_up_leaves_the_shared_threads_free(
    keyed: tuple[DkimSigner, dict[str, bytes]], silent_dns: dns.resolver.Resolver
) -> None:
    signer, _ = keyed
    signed = MESSAGE
    for _ in range(4):  # four signatures: four key look-ups of a second each
        signed = signer.sign(signed, DOMAIN)
    lookup = make_dns_function({}, use_dns=True, timeout=1, resolver=silent_dns)
    verifier = DkimVerifier("mx.b.mssd.test", lookup, timeout=1)
    # The executor that name resolution and the store's threads share, one thread wide.
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
    started = time.monotonic()
    header = await verifier.header_async(signed)
    assert time.monotonic() - started < 3.5
    # Two look-ups time out, then the message's time is up: none could be checked.
    assert header == _result("temperror", signatures=4)
    # The verification gave up on time and left no thread of the shared executor busy.
    free = await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 0.5)
    assert free == "free"


def test_dns_says_no_key_or_does_not_answer(
    keyed: tuple[DkimSigner, dict[str, bytes]], silent_dns: dns.resolver.Resolver
) -> None:
    signer, _ = keyed
    signed = signer.sign(MESSAGE, DOMAIN)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        answered = threading.Thread(target=_answer_nxdomain, args=(server,), daemon=True)
        answered.start()
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = server.getsockname()[1]
        lookup = make_dns_function({}, use_dns=True, timeout=2, resolver=resolver)
        # The name does not exist: no key for this signature, for good.
        assert DkimVerifier("mx.b.mssd.test", lookup, timeout=2).header(signed) == _result(
            "permerror"
        )
        answered.join(5)
    # No answer at all: perhaps later.
    lookup = make_dns_function({}, use_dns=True, timeout=0.5, resolver=silent_dns)
    assert DkimVerifier("mx.b.mssd.test", lookup, timeout=0.5).header(signed) == _result(
        "temperror"
    )


def _answer_nxdomain(server: socket.socket) -> None:
    """A DNS server for one query, whose answer is NXDOMAIN (RFC 1035 §4.1.1, RCODE 3)."""
    data, client = server.recvfrom(4096)
    response = dns.message.make_response(dns.message.from_wire(data))
    response.set_rcode(dns.rcode.NXDOMAIN)
    server.sendto(response.to_wire(), client)


def test_records_file(tmp_path: Path) -> None:
    path = tmp_path / "records.txt"
    path.write_text('# test\nmssd._domainkey.A.test. "v=DKIM1; p=abc"\n')
    assert read_txt_records(path) == {"mssd._domainkey.a.test": b"v=DKIM1; p=abc"}
    assert read_txt_records(None) == {}


def test_keygen_command(tmp_path: Path) -> None:
    from test_cli import Cli

    cli = Cli(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path)
    result = cli("dkim", "keygen", DOMAIN, env={"MSSD_SERVER_VAR_DIR": str(tmp_path / "var")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "var" / "dkim" / f"{DOMAIN}.mssd.key").is_file()
    assert f'mssd._domainkey.{DOMAIN}. IN TXT "v=DKIM1; k=rsa; p=' in result.stdout
    again = cli("dkim", "keygen", DOMAIN, env={"MSSD_SERVER_VAR_DIR": str(tmp_path / "var")})
    assert again.returncode == 1 and "--force" in again.stderr


def test_mss_nil_values_are_counted() -> None:
    before = MSS_NIL.value("Logiciel/1.0")
    assert count_mss_nil(MESSAGE) == ["Logiciel/1.0"]
    assert count_mss_nil(b"Subject: x\r\n\r\nX-MSS-NIL: dans le corps\r\n") == []
    assert MSS_NIL.value("Logiciel/1.0") == before + 1
