"""The SMTP client of the relay: a sans-I/O reply parser and a thin asyncio adapter.

:class:`ReplyParser` eats bytes and returns complete replies (RFC 5321 §4.2); it never
touches a socket, so it is tested and fuzzed in-process. :class:`SmtpClient` writes
commands on an asyncio stream and reads replies through the parser: EHLO, STARTTLS,
one mail transaction (pipelined when the server offers PIPELINING, RFC 2920), RSET, QUIT.

Invariants:
- Every wait for the server is bounded by ``timeout`` (RFC 5321 §4.5.3.2 timeouts).
- A reply that cannot be parsed, or a connection lost, raises :class:`ConnectionFailed`:
  the caller defers what was not confirmed. Nothing here decides what a reply means for a
  queue entry; the relay does.
- Message data is dot-stuffed here (RFC 5321 §4.5.2) and always ends with CRLF.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_LINE = 4096
MAX_LINES = 500
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


class ConnectionFailed(Exception):
    """The connection or the conversation broke down (not a reply from the server)."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 status code of the first line, when the server sent one."""
        first = self.lines[0].split(" ", 1)[0] if self.lines and self.lines[0] else ""
        return first if _ENHANCED.match(first) else None

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} " + " / ".join(line for line in self.lines if line)


class ReplyParser:
    """Sans-I/O: ``feed`` bytes, get the replies they complete."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._code: int | None = None

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    raise ConnectionFailed("reply line too long")
                return replies
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            reply = self._line(raw)
            if reply is not None:
                replies.append(reply)

    def _line(self, raw: bytes) -> Reply | None:
        # RFC 5321 §4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
        #                              Reply-code [ SP textstring ] CRLF
        if len(raw) < 3 or not raw[:3].isdigit() or raw[:1] not in b"2345":
            raise ConnectionFailed(f"malformed reply line {raw[:80]!r}")
        code = int(raw[:3])
        separator = raw[3:4]
        if separator not in (b"", b" ", b"-"):
            raise ConnectionFailed(f"malformed reply line {raw[:80]!r}")
        if self._code is not None and code != self._code:
            raise ConnectionFailed("reply code changed inside a multi-line reply")
        self._code = code
        self._lines.append(raw[4:].decode("utf-8", "replace"))
        if len(self._lines) > MAX_LINES:
            raise ConnectionFailed("reply with too many lines")
        if separator == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._lines, self._code = [], None
        return reply


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 §4.5.2: double every leading period; end with CRLF then ``.CRLF``."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@dataclass
class TransactionResult:
    mail: Reply
    recipients: list[Reply]
    data: Reply | None
    """The reply after the message data (or to DATA itself when it was refused); None when
    no recipient was accepted and DATA was not sent."""


@dataclass
class SmtpClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    timeout: float
    peer: str
    extensions: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    _parser: ReplyParser = field(default_factory=ReplyParser)
    _pending: list[Reply] = field(default_factory=list)

    @classmethod
    async def connect(
        cls, host: str, port: int, *, connect_timeout: float, reply_timeout: float
    ) -> tuple[SmtpClient, Reply]:
        """Open a connection and read the greeting (RFC 5321 §3.1)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=MAX_LINE * 4), connect_timeout
            )
        except (OSError, TimeoutError) as error:
            raise ConnectionFailed(
                f"cannot connect to {host}:{port}: {error or 'timeout'}"
            ) from None
        client = cls(reader, writer, reply_timeout, f"{host}:{port}")
        greeting = await client.read_reply()
        return client, greeting

    async def read_reply(self) -> Reply:
        while not self._pending:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), self.timeout)
            except TimeoutError:
                raise ConnectionFailed(f"{self.peer}: no reply within {self.timeout:g}s") from None
            except (OSError, ssl.SSLError) as error:
                raise ConnectionFailed(f"{self.peer}: {error}") from None
            if not data:
                raise ConnectionFailed(f"{self.peer} closed the connection")
            self._pending += self._parser.feed(data)
        return self._pending.pop(0)

    async def _write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except (OSError, ssl.SSLError, TimeoutError) as error:
            raise ConnectionFailed(f"{self.peer}: cannot send: {error or 'timeout'}") from None

    async def command(self, line: str) -> Reply:
        await self._write(line.encode("utf-8") + b"\r\n")
        return await self.read_reply()

    async def ehlo(self, hostname: str) -> Reply:
        reply = await self.command(f"EHLO {hostname}")
        if reply.code == 250:
            # RFC 5321 §4.1.1.1: the first line greets, the others name extensions.
            self.extensions = {}
            for line in reply.lines[1:]:
                keyword, _, value = line.partition(" ")
                self.extensions[keyword.upper()] = value
        return reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> Reply:
        """RFC 3207: STARTTLS, then the handshake; the caller sends EHLO again (§4.2)."""
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            return reply
        if self._pending or self._parser._buffer:
            raise ConnectionFailed(f"{self.peer} sent data after 220 to STARTTLS")
        try:
            await asyncio.wait_for(
                self.writer.start_tls(context, server_hostname=server_hostname), self.timeout
            )
        except (OSError, ssl.SSLError, TimeoutError) as error:
            raise ConnectionFailed(f"TLS handshake with {self.peer} failed: {error}") from None
        self.tls = True
        self.extensions = {}
        return reply

    def peer_certificate(self) -> bytes | None:
        tls = self.writer.get_extra_info("ssl_object")
        if not isinstance(tls, ssl.SSLObject | ssl.SSLSocket):
            return None
        der = tls.getpeercert(binary_form=True)
        return bytes(der) if der else None

    async def transaction(
        self,
        mail_from: str,
        mail_params: Sequence[str],
        recipients: Sequence[tuple[str, Sequence[str]]],
        data: bytes,
    ) -> TransactionResult:
        """One mail transaction; pipelined (RFC 2920 §3.1: MAIL, every RCPT and DATA in one
        write, the replies read in order) when the server offers PIPELINING."""
        mail_line = " ".join([f"MAIL FROM:<{mail_from}>", *mail_params])
        rcpt_lines = [" ".join([f"RCPT TO:<{address}>", *params]) for address, params in recipients]
        if "PIPELINING" in self.extensions:
            batch = [mail_line, *rcpt_lines, "DATA"]
            await self._write("".join(line + "\r\n" for line in batch).encode("utf-8"))
            mail = await self.read_reply()
            replies = [await self.read_reply() for _ in rcpt_lines]
            go_ahead = await self.read_reply()
        else:
            mail = await self.command(mail_line)
            if not mail.positive:
                return TransactionResult(mail, [mail] * len(rcpt_lines), None)
            replies = [await self.command(line) for line in rcpt_lines]
            if not any(reply.positive for reply in replies):
                return TransactionResult(mail, replies, None)
            go_ahead = await self.command("DATA")
        accepted = mail.positive and any(reply.positive for reply in replies)
        if go_ahead.code != 354:
            return TransactionResult(mail, replies, go_ahead if accepted else None)
        if not accepted:
            # RFC 2920 §3.1: a server that said 354 with no valid recipient still gets the
            # end of data; nothing is delivered.
            await self._write(b".\r\n")
            await self.read_reply()
            return TransactionResult(mail, replies, None)
        await self._write(dot_stuff(data))
        return TransactionResult(mail, replies, await self.read_reply())

    async def rset(self) -> bool:
        try:
            return (await self.command("RSET")).code == 250
        except ConnectionFailed:
            return False

    async def quit(self) -> None:
        """QUIT (RFC 5321 §4.1.1.10) and close, never raising."""
        try:
            await asyncio.wait_for(self.command("QUIT"), min(self.timeout, 5.0))
        except (ConnectionFailed, TimeoutError):
            pass
        self.close()

    def close(self) -> None:
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass
