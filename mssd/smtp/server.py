"""The SMTP protocol class: aiosmtpd's ``SMTP`` with the commands mssd needs.

aiosmtpd refuses RFC 3461 DSN parameters (555) and the null reverse-path,
buffers DATA line by line, and does not know mssd's SASL mechanisms, so
``MAIL``, ``RCPT``, ``DATA`` and ``AUTH`` are overridden here; everything else
(greeting, EHLO base, STARTTLS, timeouts, RSET, QUIT) is aiosmtpd's. Policy
is not decided here: the handler (``handler.py``) asks the delivery pipeline.

Invariants:
- Every reply sent after EHLO carries an enhanced status code (RFC 2034 §3):
  :meth:`MssdSMTP.push` adds one to aiosmtpd's own replies that lack it.
- No AUTH exchange without TLS unless the peer is on a trusted network.
- Behind a load balancer the peer is the PROXY header's source (``client``), for
  everything: ``session.peer``, trusted networks, rate limits, audit, Received.
- The 250 after DATA is sent only once the handler's commit returned.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import logging
import re
from base64 import b64decode, b64encode
from collections.abc import Callable
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from mssd.auth import (
    AuthContext,
    Authenticator,
    Challenge,
    EncryptionRequired,
    Failure,
    Success,
    UnknownMechanism,
)
from mssd.mime import OFFLOAD_BYTES
from mssd.proxy_protocol import Endpoint

log = logging.getLogger(__name__)

# RFC 4954 §4: servers must accept AUTH command lines and responses of 12288 octets.
AUTH_LINE_LIMIT = 12288

# Default enhanced codes (RFC 3463) for aiosmtpd replies that carry none.
_ENHANCED_DEFAULTS = {
    221: "2.0.0",
    250: "2.0.0",
    252: "2.0.0",
    421: "4.4.2",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    550: "5.0.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.7.0",
    555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+$")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
# RFC 5321 §4.5.3.1: path 256, local part 64, domain 255 octets.
_MAX_PATH = 256
# The common path: "<dot-atom@domain>" then parameters (RFC 5321 §4.1.2). Anything
# else (quoted local parts, source routes, address literals) goes through aiosmtpd's
# full parser, which costs about a fifth of the event loop under load.
_SIMPLE_PATH = re.compile(r"<([^\x00-\x20<>()\[\]\\,;:\"@]+@[^\x00-\x20<>()\[\]\\,;:\"@]+)>(.*)")


class MssdEnvelope(Envelope):
    """aiosmtpd's envelope plus what mssd carries between commands."""

    def __init__(self) -> None:
        super().__init__()
        self.body: str | None = None
        self.dsn_ret: str | None = None
        self.dsn_envid: str | None = None
        self.size: int | None = None
        """The SIZE declared on MAIL (RFC 1870), for per-recipient quota checks."""
        self.recipients: list[Any] = []
        self.transaction: Any = None


def unstuff(received: bytes | bytearray) -> bytes:
    """Undo dot-stuffing: a line's leading period is removed (RFC 5321 §4.5.2)."""
    data = bytes(received)
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


def _xtext_ok(value: str) -> bool:
    """RFC 3461 §4: ENVID and ORCPT values are xtext."""
    return bool(_XTEXT.match(value))


class MssdSMTP(SMTP):
    line_length_limit = AUTH_LINE_LIMIT + 2

    def __init__(
        self,
        handler: Any,
        *,
        authenticator: Authenticator | None,
        trusted: Callable[[str], bool],
        max_recipients: int,
        client: Endpoint | None = None,
        **kwargs: Any,
    ) -> None:
        """``client``: the client a PROXY header named; None for the socket's peer."""
        super().__init__(handler, enable_SMTPUTF8=True, decode_data=False, **kwargs)
        # Per instance: aiosmtpd's class-level dict is shared by all sessions.
        self.command_size_limits = collections.defaultdict(
            lambda: self.command_size_limit, {"AUTH": AUTH_LINE_LIMIT}
        )
        self.mssd_authenticator = authenticator
        self._trusted = trusted
        self._max_recipients = max_recipients
        self._in_helo = False
        self._receiving_data = False
        self._client = client
        self.remote_ip = client.address if client is not None else ""

    # -- helpers -------------------------------------------------------------

    def _create_envelope(self) -> MssdEnvelope:
        return MssdEnvelope()

    def _envelope(self) -> MssdEnvelope:
        assert isinstance(self.envelope, MssdEnvelope)
        return self.envelope

    def _session(self) -> Session:
        assert self.session is not None
        return self.session

    def _reset_envelope(self) -> None:
        self.envelope = self._create_envelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._client is not None:
            # Behind a load balancer (DESIGN.md, Scale-out) the transport's peer is the
            # balancer; aiosmtpd's session, made anew after STARTTLS (RFC 3207 §4.2),
            # must name the client the header gave.
            # aiosmtpd annotates ``peer`` as a string but stores the peername tuple.
            peer = (self._client.address, self._client.port)
            self._session().peer = peer  # type: ignore[assignment]
            return
        peer = transport.get_extra_info("peername")
        if peer and not self.remote_ip:
            self.remote_ip = str(peer[0])

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._receiving_data:
            # RFC 5321 §4.5.3.2.5: the DATA timeout applies to each block received,
            # not to the whole transfer: a slow but active client is not cut off.
            self._reset_timeout()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2 (server timeouts) and §3.8: a server that gives up on
        # an idle client says so with 421 before closing, rather than vanishing.
        # Closing the transport makes aiosmtpd's connection_lost() clean up.
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.info("%s idle for %ss, closing", self.remote_ip, self._timeout_duration)
        # A stream transport (uvloop's is not an asyncio.WriteTransport subclass).
        cast(asyncio.WriteTransport, transport).write(
            f"421 4.4.2 {self.hostname} Idle timeout, closing connection\r\n".encode()
        )
        transport.close()

    def is_tls(self) -> bool:
        return (
            self.transport is not None and self.transport.get_extra_info("ssl_object") is not None
        )

    def tls_description(self) -> str | None:
        if self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return f"using {cipher[1]} with cipher {cipher[0]}" if cipher else "using TLS"

    def peer_certificate(self) -> bytes | None:
        if self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        return bytes(der) if der else None

    def auth_context(self) -> AuthContext:
        return AuthContext(
            protocol="smtp",
            remote_ip=self.remote_ip,
            tls=self.is_tls(),
            peer_certificate=self.peer_certificate(),
            trusted_network=self._trusted(self.remote_ip),
        )

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and not self._in_helo:
            await super().push(self._with_enhanced_code(status))
        else:
            await super().push(status)

    def _with_enhanced_code(self, status: str) -> str:
        code, sep, text = status[:3], status[3:4], status[4:]
        if not code.isdigit() or sep not in (" ", "-") or _HAS_ENHANCED.match(text):
            return status
        number = int(code)
        if number < 200 or 300 <= number < 400:
            return status  # greeting-less codes: 334 challenges, 354 go-ahead
        if number == 220:
            return status
        enhanced = _ENHANCED_DEFAULTS.get(number, f"{code[0]}.0.0")
        return f"{code}{sep}{enhanced} {text}"

    # -- EHLO / HELO: no enhanced codes in these replies (RFC 2034 §3) --------

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_helo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_helo = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._in_helo = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_helo = False

    # -- AUTH (RFC 4954) -------------------------------------------------------

    @syntax("AUTH <mechanism> [initial-response]")
    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        session = self.session
        assert session is not None and self.envelope is not None
        if self.mssd_authenticator is None or not session.extended_smtp:
            await self.push("502 5.5.1 AUTH is not available on this port")
            return
        if session.authenticated:
            await self.push("503 5.5.1 Already authenticated")
            return
        if self.envelope.mail_from is not None:
            # RFC 4954 §4: AUTH is not permitted during a mail transaction.
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        parts = (arg or "").split()
        if not parts or len(parts) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = parts[0].upper()
        initial: bytes | None = None
        if len(parts) == 2:
            if parts[1] == "=":
                initial = b""
            else:
                try:
                    initial = b64decode(parts[1], validate=True)
                except (binascii.Error, ValueError):
                    await self.push("501 5.5.2 Cannot decode the initial response (base64)")
                    return
        try:
            exchange = self.mssd_authenticator.start(mechanism, self.auth_context())
        except EncryptionRequired:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        except UnknownMechanism:
            await self.push(f"504 5.5.4 Unrecognized authentication type {mechanism}")
            return
        step = await exchange.step(initial)
        while isinstance(step, Challenge):
            await self.push(b"334 " + b64encode(step.data))
            line = await self._read_auth_line()
            if line is None:
                exchange.cancel()
                # RFC 4954 §4: the server must accept lines of 12288 octets; longer
                # ones are refused with 500 5.5.6 (RFC 4954 §6) once fully read.
                await self.push("500 5.5.6 Authentication exchange line is too long")
                return
            answer = line.strip()
            if answer == b"*":
                exchange.cancel()
                await self.push("501 5.7.0 Authentication cancelled")
                return
            try:
                decoded = b64decode(answer, validate=True)
            except (binascii.Error, ValueError):
                exchange.cancel()
                await self.push("501 5.5.2 Cannot decode the response (base64)")
                return
            step = await exchange.step(decoded)
        if isinstance(step, Success):
            session.authenticated = True
            session.auth_data = step.principal  # type: ignore[assignment]
            await self.push("235 2.7.0 Authentication successful")
            return
        assert isinstance(step, Failure)
        if step.temporary:
            await self.push(f"454 4.7.0 {step.reason}")
        elif step.malformed:
            await self.push(f"501 5.5.2 {step.reason}")
        else:
            await self.push("535 5.7.8 Authentication credentials invalid")

    async def _read_auth_line(self) -> bytes | None:
        """One client line of an AUTH exchange; None (the whole line read and
        discarded) when it exceeds :data:`AUTH_LINE_LIMIT`, so the rest of an
        over-long line is never taken for the next command."""
        too_long = False
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as overrun:
                await self._reader.read(overrun.consumed)
                too_long = True
                continue
            except asyncio.IncompleteReadError:
                # The client closed the connection during the exchange.
                self._writer.close()
                raise asyncio.CancelledError from None
            # Each line the client sends is activity: RFC 5321 §4.5.3.2 timeouts
            # are per command or per read, not per exchange.
            self._reset_timeout()
            if too_long or len(line) > AUTH_LINE_LIMIT + 2:
                return None
            return line

    # -- MAIL (RFC 5321 §4.1.1.2, RFC 1870, RFC 6152, RFC 6531, RFC 3461) ----

    def _split_path(self, arg: str | None, keyword: str) -> tuple[str, list[str]] | None:
        """Parse ``FROM:<path> params``; None on a syntax error."""
        if arg is None or arg[: len(keyword)].upper() != keyword:
            return None
        rest = arg[len(keyword) :].lstrip()
        if rest.startswith("<>"):
            return "", rest[2:].split()
        simple = _SIMPLE_PATH.fullmatch(rest)
        if simple is not None and ".." not in simple[1] and not simple[1].startswith("."):
            return simple[1], simple[2].split()
        address, params = self._getaddr(rest)
        if address is None or not address:
            return None
        return address, (params or "").split()

    async def _path_error(self, address: str, smtputf8: bool, sender: bool) -> bool:
        """Reply and return True if the address cannot be used."""
        code = "5.1.7" if sender else "5.1.3"
        try:
            address.encode("utf-8")
        except UnicodeEncodeError:
            await self.push(f"553 {code} Address is not valid UTF-8")
            return True
        if not address.isascii() and not smtputf8:
            # RFC 6531 §3.4: non-ASCII addresses need the SMTPUTF8 parameter.
            await self.push("553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter")
            return True
        local, at, domain = address.rpartition("@")
        if (
            not at
            or not local
            or not domain
            or len(address.encode("utf-8")) > _MAX_PATH
            or len(local.encode("utf-8")) > 64
        ):
            await self.push(f"553 {code} Malformed address <{address}>")
            return True
        return False

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("MAIL"):
            return
        envelope = self._envelope()
        if envelope.mail_from is not None:
            await self.push("503 5.5.1 Nested MAIL command")
            return
        parsed = self._split_path(arg, "FROM:")
        if parsed is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        address, raw_params = parsed
        if raw_params and not self._session().extended_smtp:
            await self.push("501 5.5.4 Parameters need EHLO")
            return
        params: dict[str, str | None] = {}
        for raw in raw_params:
            key, eq, value = raw.partition("=")
            key = key.upper()
            if key in params or not key.isalnum() or (eq and not value):
                await self.push(f"501 5.5.4 Bad or repeated parameter {key}")
                return
            params[key] = value if eq else None
        smtputf8 = "SMTPUTF8" in params
        if smtputf8 and params.pop("SMTPUTF8") is not None:
            await self.push("501 5.5.4 SMTPUTF8 takes no value")
            return
        body = params.pop("BODY", None)
        if body is not None and body.upper() not in ("7BIT", "8BITMIME"):
            await self.push("501 5.5.4 BODY must be 7BIT or 8BITMIME")
            return
        size = params.pop("SIZE", None)
        if size is not None:
            if not size.isdigit():
                await self.push("501 5.5.4 SIZE must be a number of octets")
                return
            if self.data_size_limit and int(size) > self.data_size_limit:
                await self.push(
                    f"552 5.3.4 Message size exceeds the limit of {self.data_size_limit} octets"
                )
                return
        ret = params.pop("RET", None)
        if ret is not None and ret.upper() not in ("FULL", "HDRS"):
            await self.push("501 5.5.4 RET must be FULL or HDRS")
            return
        envid = params.pop("ENVID", None)
        if envid is not None and (len(envid) > 100 or not _xtext_ok(envid)):
            await self.push("501 5.5.4 ENVID must be xtext of at most 100 characters")
            return
        params.pop("AUTH", None)  # RFC 4954 §5: accepted; the authenticated identity is used.
        if params:
            await self.push(f"555 5.5.4 Unsupported MAIL parameter {', '.join(sorted(params))}")
            return
        if address and await self._path_error(address, smtputf8, sender=True):
            return
        envelope.smtp_utf8 = smtputf8
        envelope.body = body.upper() if body else None
        envelope.dsn_ret = ret.upper() if ret else None
        envelope.dsn_envid = envid
        envelope.size = int(size) if size is not None else None
        status = await self._call_handler_hook("MAIL", address, raw_params)
        if isinstance(status, str) and status.startswith("250"):
            envelope.mail_from = address
            envelope.mail_options.extend(raw_params)
        await self.push(status)

    # -- RCPT (RFC 5321 §4.1.1.3, RFC 3461 §4.1-4.2) ---------------------------

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("RCPT"):
            return
        envelope = self._envelope()
        if envelope.mail_from is None:
            await self.push("503 5.5.1 Need MAIL command first")
            return
        parsed = self._split_path(arg, "TO:")
        if parsed is None or not parsed[0]:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address> [parameters]")
            return
        address, raw_params = parsed
        notify: str | None = None
        orcpt: str | None = None
        for raw in raw_params:
            key, _, value = raw.partition("=")
            key = key.upper()
            if key == "NOTIFY" and notify is None and value:
                values = {v.strip().upper() for v in value.split(",")}
                if not (values == {"NEVER"} or values <= _NOTIFY):
                    await self.push("501 5.5.4 NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
                    return
                notify = ",".join(sorted(values))
            elif key == "ORCPT" and orcpt is None and value:
                addr_type, semicolon, xtext = value.partition(";")
                if not semicolon or not addr_type or not _xtext_ok(xtext) or len(value) > 500:
                    await self.push("501 5.5.4 ORCPT must be addr-type;xtext")
                    return
                orcpt = value
            else:
                await self.push(f"555 5.5.4 Unsupported or repeated RCPT parameter {key}")
                return
        if await self._path_error(address, bool(envelope.smtp_utf8), sender=False):
            return
        if address.lower() in (r.lower() for r in envelope.rcpt_tos):
            await self.push(f"250 2.1.5 <{address}> already a recipient")
            return
        if len(envelope.rcpt_tos) >= self._max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 and the client sends the rest later.
            await self.push(f"452 4.5.3 Too many recipients (at most {self._max_recipients})")
            return
        status = await self._call_handler_hook("RCPT", address, (notify, orcpt))
        await self.push(status)

    # -- DATA (RFC 5321 §4.1.1.4, §4.5.2) ---------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self._envelope()
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Need RCPT command first")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._receiving_data = True
        try:
            received = await self._read_data()
        finally:
            self._receiving_data = False
        if received is None:
            self._reset_envelope()
            await self.push(
                f"552 5.3.4 Message size exceeds the limit of {self.data_size_limit} octets; "
                "nothing was stored"
            )
            return
        if len(received) > OFFLOAD_BYTES:
            data = await asyncio.to_thread(unstuff, received)
        else:
            data = unstuff(received)
        status = await self._call_handler_hook("DATA", data)
        self._reset_envelope()
        await self.push(status)

    async def _read_data(self) -> bytearray | None:
        """The message after 354, still dot-stuffed, without the terminating
        ``.<CRLF>``; None once it has been read to its end if it was over the size limit."""
        limit = self.data_size_limit
        received = bytearray()
        total = 0
        too_big = False
        while True:
            try:
                chunk = await self._reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as overrun:
                chunk = await self._reader.read(overrun.consumed)
            except asyncio.IncompleteReadError:
                # The client closed the connection in the middle of DATA: nothing is stored.
                log.info("%s closed the connection during DATA", self.remote_ip)
                self._writer.close()
                raise asyncio.CancelledError from None
            total += len(chunk)
            if too_big:
                # Keep only enough to recognise the end of data.
                received = received[-4:] + chunk
            else:
                received += chunk
                if limit and total > limit + 5:
                    too_big = True
            if received == b".\r\n" or received.endswith(b"\r\n.\r\n"):
                break
        if too_big:
            return None
        del received[-3:]  # the terminating ".\r\n"; the CRLF before it ends the last line
        return received
