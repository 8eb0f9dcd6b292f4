"""Bad and hostile SMTP input: every mistake gets its exact reply (RFC 5321
§4.2 code, RFC 3463 enhanced code), nothing is half-stored, and the server
keeps serving the session and everyone else.

Most tests speak raw bytes over a socket (TLS-wrapped after STARTTLS) so that
what is sent is exactly what the test says; ``smtplib`` and ``swaks`` check
that ordinary clients still get through.
"""

from __future__ import annotations

import base64
import contextlib
import select
import smtplib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import (
    DOMAIN,
    ORG,
    PASSWORD,
    PER,
    PER2,
    MssdProcess,
    PkiBundle,
    run,
    seed,
    start_mssd,
    store_url_for,
)
from conftest import inbox as shared_inbox
from sqlalchemy import func
from sqlalchemy import select as sql_select

from mssd.store.engine import create_engine
from mssd.store.schema import blobs, envelopes

STRICT_SIZE = 100_000
STRICT_TIMEOUT = 2.0


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def strict(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[MssdProcess]:
    """mssd with a 2 s idle timeout and a 100 000-octet message limit."""
    workdir = tmp_path_factory.mktemp(f"strict-{request.param}")
    for url in store_url_for(request.param, workdir):
        run(seed(url, test_pki))
        server = start_mssd(
            url,
            test_pki,
            workdir,
            MSSD_SMTP_TIMEOUT_SECONDS=str(STRICT_TIMEOUT),
            MSSD_SMTP_MAX_MESSAGE_SIZE=str(STRICT_SIZE),
        )
        try:
            yield server
        finally:
            server.stop()


# -- a raw SMTP client ---------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    lines: list[bytes]

    @property
    def text(self) -> bytes:
        return b"\n".join(self.lines)


def _parse(lines: list[bytes]) -> Reply:
    last = lines[-1]
    code = int(last[:3])
    words = last[4:].split(b" ", 1)
    enhanced = words[0].decode("ascii", "replace") if words and words[0][:1].isdigit() else ""
    return Reply(code, enhanced, lines)


class Wire:
    """An SMTP session at the byte level: exactly these bytes go out."""

    def __init__(self, server: MssdProcess, port: int | None = None, timeout: float = 15) -> None:
        self.server = server
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port or server.submission), timeout=timeout
        )
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()
        assert self.greeting.code == 220, self.greeting

    def reply(self) -> Reply:
        lines: list[bytes] = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"connection closed after {lines!r}")
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return _parse(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes) -> Reply:
        self.send(line + b"\r\n")
        return self.reply()

    def starttls(self) -> Wire:
        assert self.command(b"EHLO client.mssd.test").code == 250
        assert self.command(b"STARTTLS").code == 220
        context = self.server.pki.client_context()
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")
        assert self.command(b"EHLO client.mssd.test").code == 250
        return self

    def login(self, login: str = PER, password: str = PASSWORD) -> Wire:
        reply = self.command(b"AUTH PLAIN " + plain(login, password))
        assert (reply.code, reply.enhanced) == (235, "2.7.0"), reply
        return self

    def submit(self, content: bytes, *, sender: str = PER, to: str = PER2) -> Reply:
        """A whole transaction; ``content`` goes on the wire as is (already stuffed)."""
        assert self.command(f"MAIL FROM:<{sender}>".encode()).code == 250
        assert self.command(f"RCPT TO:<{to}>".encode()).code == 250
        assert self.command(b"DATA").code == 354
        self.send(content + b".\r\n")
        return self.reply()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def session(server: MssdProcess, *, login: bool = True) -> Iterator[Wire]:
    wire = Wire(server).starttls()
    if login:
        wire.login()
    try:
        yield wire
    finally:
        wire.close()


def plain(login: str, password: str) -> bytes:
    return base64.b64encode(f"\0{login}\0{password}".encode())


def token() -> str:
    return uuid.uuid4().hex


def message(tag: str, body: bytes = b"bonjour\r\n") -> bytes:
    return (
        f"From: <{PER}>\r\nTo: <{PER2}>\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@client.mssd.test>\r\nDate: Mon, 2 Mar 2026 10:00:00 +0100\r\n\r\n"
    ).encode() + body


def assert_delivered(wire: Wire) -> str:
    """Send one more message in this session: proof that the session still works."""
    tag = token()
    reply = wire.submit(message(tag))
    assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    return tag


# -- the store -----------------------------------------------------------------


def inbox(server: MssdProcess, address: str = PER2) -> list[tuple[int, bytes]]:
    return shared_inbox(server, address)


def holding(server: MssdProcess, tag: str, address: str = PER2) -> list[bytes]:
    return [content for _, content in inbox(server, address) if tag.encode() in content]


async def _counts(url: str) -> tuple[int, int]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            n_envelopes = await conn.scalar(sql_select(func.count()).select_from(envelopes))
            n_blobs = await conn.scalar(sql_select(func.count()).select_from(blobs))
        return int(n_envelopes or 0), int(n_blobs or 0)
    finally:
        await engine.dispose()


def counts(server: MssdProcess) -> tuple[int, int]:
    """(envelopes, blobs) in the whole store."""
    return tuple(run(_counts(server.url)))  # type: ignore[return-value]


# -- malformed commands ----------------------------------------------------------

MAIL = f"MAIL FROM:<{PER}>".encode()

MALFORMED = [
    # (id, commands before, bad line, code, enhanced) — RFC 5321 §4.2.4, RFC 3463 §3.6
    ("empty-line", [], b"", 500, "5.5.2"),
    ("unknown-verb", [], b"FROBNICATE now", 500, "5.5.2"),
    ("non-ascii-verb", [], b"\xff\xfeLO client", 500, "5.5.2"),
    ("mail-from-garbage", [], b"MAIL FROM:garbage<", 501, "5.5.4"),
    ("mail-without-colon", [], b"MAIL <" + PER.encode() + b">", 501, "5.5.4"),
    ("rcpt-before-mail", [], b"RCPT TO:<" + PER2.encode() + b">", 503, "5.5.1"),
    ("data-before-rcpt", [MAIL], b"DATA", 503, "5.5.1"),
    ("nested-mail", [MAIL], MAIL, 503, "5.5.1"),
    ("repeated-mail-parameter", [], MAIL + b" BODY=8BITMIME BODY=8BITMIME", 501, "5.5.4"),
    ("size-not-a-number", [], b"MAIL FROM:<a@b> SIZE=abc", 501, "5.5.4"),
    ("unknown-mail-parameter", [], MAIL + b" FROB=1", 555, "5.5.4"),
    ("data-with-argument", [MAIL, b"RCPT TO:<" + PER2.encode() + b">"], b"DATA now", 501, "5.5.4"),
]


@pytest.mark.parametrize(
    ("before", "line", "code", "enhanced"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_command_gets_5xx_and_the_session_still_delivers(
    mssd: MssdProcess, before: list[bytes], line: bytes, code: int, enhanced: str
) -> None:
    with session(mssd) as wire:
        for command in before:
            assert wire.command(command).code == 250
        reply = wire.command(line)
        assert (reply.code, reply.enhanced) == (code, enhanced), reply
        assert wire.command(b"RSET").code == 250
        tag = assert_delivered(wire)
    assert len(holding(mssd, tag)) == 1


def test_command_line_of_100_kb_is_refused_and_the_session_continues(mssd: MssdProcess) -> None:
    with session(mssd) as wire:
        # RFC 5321 §4.5.3.1.4 (512-octet command lines) and §4.2.4: 500.
        reply = wire.command(b"MAIL FROM:<" + b"a" * 100_000 + b"@x>")
        assert reply.code == 500 and reply.enhanced.startswith("5.5."), reply
        assert wire.command(b"NOOP").code == 250  # the rest of the long line was not a command
        assert_delivered(wire)


def test_line_of_100_kb_inside_data_is_stored_byte_for_byte(mssd: MssdProcess) -> None:
    # RFC 5321 §4.5.3.1.6 allows refusing text lines over 1000 octets; mssd
    # accepts them (real documents carry long base64-less lines) and keeps them intact.
    tag = token()
    long_line = (b"0123456789abcdef" * 6250) + b"."  # 100 001 octets, ending in a period
    content = message(tag, b"avant\r\n" + long_line + b"\r\napres\r\n")
    with session(mssd) as wire:
        reply = wire.submit(content)
        assert reply.code == 250, reply
    (stored,) = holding(mssd, tag)
    assert stored.endswith(content)


def test_dot_stuffed_lines_are_stored_unstuffed(mssd: MssdProcess) -> None:
    # RFC 5321 §4.5.2: the client doubles a leading period; the server removes one.
    tag = token()
    wire_body = b"..\r\n...\r\n..signature\r\n...x\r\nfin.\r\n. \r\n"
    stored_body = b".\r\n..\r\n.signature\r\n..x\r\nfin.\r\n \r\n"
    with session(mssd) as wire:
        reply = wire.submit(message(tag, wire_body))
        assert reply.code == 250, reply
    (stored,) = holding(mssd, tag)
    assert stored.endswith(message(tag, stored_body))


def test_message_starting_with_a_stuffed_period_keeps_it(mssd: MssdProcess) -> None:
    tag = token()
    with session(mssd) as wire:
        # No header block at all: the very first octet of DATA is a stuffed period.
        reply = wire.submit(b"..first\r\n" + tag.encode() + b"\r\n")
        assert reply.code == 250, reply
    (stored,) = holding(mssd, tag)
    assert stored.endswith(b"\r\n.first\r\n" + tag.encode() + b"\r\n")


def test_pipelined_commands_get_their_replies_in_order(mssd: MssdProcess) -> None:
    # RFC 2920 §3.1: MAIL, RCPT... and DATA may be sent in one group; the replies
    # come back in order, one per command.
    tag = token()
    with session(mssd) as wire:
        wire.send(
            MAIL
            + b"\r\nRCPT TO:<"
            + PER2.encode()
            + b">\r\nRCPT TO:<personne@"
            + DOMAIN.encode()
            + b">\r\nRCPT TO:<"
            + ORG.encode()
            + b">\r\nDATA\r\n"
        )
        replies = [wire.reply() for _ in range(5)]
        assert [(r.code, r.enhanced) for r in replies] == [
            (250, "2.1.0"),
            (250, "2.1.5"),
            (550, "5.1.1"),
            (250, "2.1.5"),
            (354, ""),
        ]
        wire.send(message(tag) + b".\r\n")
        assert wire.reply().code == 250
    assert len(holding(mssd, tag, PER2)) == 1
    assert len(holding(mssd, tag, ORG)) == 1


# -- addresses -------------------------------------------------------------------


def test_non_utf8_address_bytes_are_refused_and_nothing_is_stored(mssd: MssdProcess) -> None:
    before = counts(mssd)
    with session(mssd) as wire:
        for line in (b"MAIL FROM:<\xff\xfe@x>", b"MAIL FROM:<\xff\xfe@x> SMTPUTF8"):
            reply = wire.command(line)
            assert (reply.code, reply.enhanced) == (553, "5.1.7"), reply
        assert wire.command(MAIL).code == 250
        reply = wire.command(b"RCPT TO:<\xc3\x28@" + DOMAIN.encode() + b">")
        assert (reply.code, reply.enhanced) == (553, "5.1.3"), reply
        reply = wire.command(b"DATA")
        assert (reply.code, reply.enhanced) == (503, "5.5.1"), reply
        assert wire.command(b"RSET").code == 250
        assert_delivered(wire)
    envelopes_after, blobs_after = counts(mssd)
    assert (envelopes_after, blobs_after) == (before[0] + 1, before[1] + 1)


def test_non_ascii_address_without_smtputf8_is_refused_with_553_5_6_7(mssd: MssdProcess) -> None:
    with session(mssd) as wire:
        assert wire.command(MAIL).code == 250
        # RFC 6531 §3.4: without SMTPUTF8 on MAIL, a UTF-8 address is refused.
        reply = wire.command("RCPT TO:<élodie@hopital.mssd.test>".encode())
        assert (reply.code, reply.enhanced) == (553, "5.6.7"), reply
        assert wire.command(b"RSET").code == 250
        reply = wire.command(MAIL + b" SMTPUTF8")
        assert (reply.code, reply.enhanced) == (250, "2.1.0"), reply
        reply = wire.command("RCPT TO:<élodie@hopital.mssd.test>".encode())
        assert (reply.code, reply.enhanced) == (550, "5.1.1"), reply
        assert wire.command(b"RSET").code == 250
        assert_delivered(wire)


# -- size ----------------------------------------------------------------------


def test_size_parameter_over_the_limit_is_refused_with_552_5_3_4(strict: MssdProcess) -> None:
    with session(strict) as wire:
        # RFC 1870 §6.1: a declared size over the limit is refused at MAIL.
        reply = wire.command(MAIL + f" SIZE={STRICT_SIZE + 1}".encode())
        assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
        reply = wire.command(MAIL + f" SIZE={STRICT_SIZE}".encode())
        assert (reply.code, reply.enhanced) == (250, "2.1.0"), reply
        assert wire.command(b"RSET").code == 250
        assert_delivered(wire)


def test_message_over_the_limit_is_refused_after_the_dot_and_nothing_is_stored(
    strict: MssdProcess,
) -> None:
    tag = token()
    before = counts(strict)
    body = (b"x" * 98 + b"\r\n") * (STRICT_SIZE // 100 + 500)  # ~150 KB, no SIZE declared
    with session(strict) as wire:
        reply = wire.submit(message(tag, body))
        # RFC 1870 §6.3 / RFC 5321 §4.5.3.1.10: 552 once the whole message was read.
        assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
        assert wire.command(b"NOOP").code == 250
        delivered = assert_delivered(wire)
    assert holding(strict, tag) == []
    assert len(holding(strict, delivered)) == 1
    assert counts(strict) == (before[0] + 1, before[1] + 1)


# -- clients that go away --------------------------------------------------------


def test_client_vanishing_in_the_middle_of_data_stores_nothing(mssd: MssdProcess) -> None:
    tag = token()
    before = counts(mssd)
    inbox_before = len(inbox(mssd))
    wire = Wire(mssd).starttls().login()
    assert wire.command(MAIL).code == 250
    assert wire.command(b"RCPT TO:<" + PER2.encode() + b">").code == 250
    assert wire.command(b"DATA").code == 354
    wire.send(message(tag, b"debut du compte rendu\r\n" * 2000))
    wire.sock.shutdown(socket.SHUT_RDWR)
    wire.close()
    time.sleep(0.3)
    with session(mssd) as other:
        delivered = assert_delivered(other)
    assert holding(mssd, tag) == []
    assert len(holding(mssd, delivered)) == 1
    assert len(inbox(mssd)) == inbox_before + 1
    assert counts(mssd) == (before[0] + 1, before[1] + 1)


def test_client_going_silent_in_data_is_cut_off_and_nothing_is_stored(
    strict: MssdProcess,
) -> None:
    tag = token()
    before = counts(strict)
    wire = Wire(strict).starttls().login()
    try:
        assert wire.command(MAIL).code == 250
        assert wire.command(b"RCPT TO:<" + PER2.encode() + b">").code == 250
        assert wire.command(b"DATA").code == 354
        wire.send(message(tag))
        started = time.monotonic()
        reply = wire.reply()  # the server gives up: RFC 5321 §4.5.3.2
        assert (reply.code, reply.enhanced) == (421, "4.4.2"), reply
        assert wire.file.read() == b""
        assert time.monotonic() - started < STRICT_TIMEOUT + 3
    finally:
        wire.close()
    assert holding(strict, tag) == []
    assert counts(strict) == before


def test_slow_but_active_data_transfer_is_not_cut_by_the_idle_timeout(
    strict: MssdProcess,
) -> None:
    # RFC 5321 §4.5.3.2.5: the DATA timeout is per block, not for the whole transfer.
    tag = token()
    with session(strict) as wire:
        assert wire.command(MAIL).code == 250
        assert wire.command(b"RCPT TO:<" + PER2.encode() + b">").code == 250
        assert wire.command(b"DATA").code == 354
        wire.send(message(tag))
        deadline = time.monotonic() + 2 * STRICT_TIMEOUT
        lines = 0
        while time.monotonic() < deadline:
            wire.send(b"ligne %d\r\n" % lines)
            lines += 1
            time.sleep(STRICT_TIMEOUT / 4)
        wire.send(b".\r\n")
        reply = wire.reply()
        assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
    (stored,) = holding(strict, tag)
    assert stored.endswith(b"ligne %d\r\n" % (lines - 1))


def test_idle_connections_do_not_block_others_and_are_closed_by_the_timeout(
    strict: MssdProcess,
) -> None:
    idle: list[socket.socket] = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", strict.submission), timeout=10)
            idle.append(sock)
        for sock in idle:
            assert sock.recv(512).startswith(b"220 "), "no greeting"
        opened = time.monotonic()
        tag = token()
        with strict.smtp() as client:
            assert client.sendmail(PER, [PER2], message(tag)) == {}
        assert len(holding(strict, tag)) == 1
        # Every idle connection is told 421 and closed (RFC 5321 §4.5.3.2).
        pending = {sock.fileno(): sock for sock in idle}
        received = {fd: b"" for fd in pending}
        deadline = opened + STRICT_TIMEOUT + 6
        while pending and time.monotonic() < deadline:
            ready, _, _ = select.select(list(pending.values()), [], [], 0.5)
            for sock in ready:
                data = sock.recv(512)
                received[sock.fileno()] += data
                if not data:
                    del pending[sock.fileno()]
        assert not pending, f"{len(pending)} idle connections still open"
        assert all(data.startswith(b"421 4.4.2 ") for data in received.values())
    finally:
        for sock in idle:
            sock.close()


# -- AUTH on submission (RFC 4954) ------------------------------------------------


def test_plaintext_pipelined_after_starttls_is_discarded(mssd: MssdProcess) -> None:
    # RFC 3207 §4.2 (and CVE-2011-0411): commands sent in clear text behind
    # STARTTLS must not be executed inside the TLS session.
    wire = Wire(mssd)
    try:
        assert wire.command(b"EHLO client.mssd.test").code == 250
        wire.send(b"STARTTLS\r\nAUTH PLAIN " + plain(PER, PASSWORD) + b"\r\n" + MAIL + b"\r\n")
        assert wire.reply().code == 220
        wire.sock = mssd.pki.client_context().wrap_socket(wire.sock, server_hostname="localhost")
        wire.file = wire.sock.makefile("rb")
        reply = wire.command(b"NOOP")  # the first reply in TLS answers this, nothing injected
        assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
        assert wire.command(b"EHLO client.mssd.test").code == 250
        reply = wire.command(MAIL)
        assert (reply.code, reply.enhanced) == (530, "5.7.0"), reply  # AUTH did not happen
    finally:
        wire.close()


def test_auth_before_starttls_is_refused_with_530_5_7_0(mssd: MssdProcess) -> None:
    wire = Wire(mssd)
    try:
        assert wire.command(b"EHLO client.mssd.test").code == 250
        # RFC 3207 §4 and RFC 4954 §4: no credentials over plaintext.
        reply = wire.command(b"AUTH PLAIN " + plain(PER, PASSWORD))
        assert (reply.code, reply.enhanced) == (530, "5.7.0"), reply
        reply = wire.command(MAIL)
        assert (reply.code, reply.enhanced) == (530, "5.7.0"), reply
    finally:
        wire.close()


def test_auth_with_bad_base64_is_refused_with_501_5_5_2(mssd: MssdProcess) -> None:
    with session(mssd, login=False) as wire:
        reply = wire.command(b"AUTH PLAIN !!!notbase64")
        assert (reply.code, reply.enhanced) == (501, "5.5.2"), reply
        assert wire.command(b"AUTH PLAIN").code == 334
        reply = wire.command(b"%%%")
        assert (reply.code, reply.enhanced) == (501, "5.5.2"), reply
        wire.login()
        assert_delivered(wire)


def test_auth_cancelled_with_star_gets_501_5_7_0(mssd: MssdProcess) -> None:
    with session(mssd, login=False) as wire:
        assert wire.command(b"AUTH PLAIN").code == 334
        # RFC 4954 §4: "*" cancels; the server must reply 501 (§6: 5.7.0).
        reply = wire.command(b"*")
        assert (reply.code, reply.enhanced) == (501, "5.7.0"), reply
        wire.login()
        assert_delivered(wire)


def test_auth_response_over_12288_octets_is_refused_with_500_5_5_6(mssd: MssdProcess) -> None:
    with session(mssd, login=False) as wire:
        assert wire.command(b"AUTH PLAIN").code == 334
        # RFC 4954 §4 (12288-octet lines) and §6: 500 5.5.6, once, and the rest
        # of the long line is not taken for a command.
        reply = wire.command(b"A" * 100_000)
        assert (reply.code, reply.enhanced) == (500, "5.5.6"), reply
        reply = wire.command(b"NOOP")
        assert (reply.code, reply.enhanced) == (250, "2.0.0"), reply
        wire.login()
        assert_delivered(wire)


def test_wrong_password_is_refused_with_535_5_7_8(mssd: MssdProcess) -> None:
    with session(mssd, login=False) as wire:
        reply = wire.command(b"AUTH PLAIN " + plain(PER2, "wrong password"))
        assert (reply.code, reply.enhanced) == (535, "5.7.8"), reply
        reply = wire.command(MAIL)
        assert (reply.code, reply.enhanced) == (530, "5.7.0"), reply


def test_five_failures_lock_the_login_even_for_the_right_password(strict: MssdProcess) -> None:
    with session(strict, login=False) as wire:
        for _ in range(5):
            reply = wire.command(b"AUTH PLAIN " + plain(PER2, "wrong password"))
            assert (reply.code, reply.enhanced) == (535, "5.7.8"), reply
        reply = wire.command(b"AUTH PLAIN " + plain(PER2, PASSWORD))
        assert (reply.code, reply.enhanced) == (454, "4.7.0"), reply
        # Another login from the same address is not affected.
        wire.login(PER, PASSWORD)
        assert_delivered(wire)


def test_server_survives_many_concurrent_bad_sessions(mssd: MssdProcess) -> None:
    """Hostile clients in parallel do not disturb a well-behaved one."""

    def hostile(kind: int) -> None:
        with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
            wire = Wire(mssd, timeout=5)
            try:
                if kind == 0:
                    wire.send(b"\x00\xff" * 5000 + b"\r\n" * 10)
                elif kind == 1:
                    wire.starttls()
                    wire.send(b"AUTH PLAIN\r\n" + b"=" * 50_000)
                else:
                    wire.send(b"EHLO x\r\nSTARTTLS\r\n" + b"\x16\x03\x01garbage" * 100)
                time.sleep(0.05)
            finally:
                wire.close()

    threads = [threading.Thread(target=hostile, args=(i % 3,)) for i in range(30)]
    for thread in threads:
        thread.start()
    with session(mssd) as wire:
        tag = assert_delivered(wire)
    for thread in threads:
        thread.join(10)
    assert len(holding(mssd, tag)) == 1
    with smtplib.SMTP("127.0.0.1", mssd.submission, timeout=10) as client:
        assert client.noop()[0] == 250
