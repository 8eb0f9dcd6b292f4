"""The asyncio side of IMAP: listeners, the read loop, STARTTLS, AUTHENTICATE
exchanges and IDLE. Protocol decisions are in ``protocol``, ``session``,
``mailboxes``, ``messages`` and ``search``; this module only moves bytes.

Invariants:
- Plaintext that arrives before the TLS handshake completes is discarded
  (RFC 9051 §6.2.1): the command reader is replaced after STARTTLS.
- Memory per connection is bounded by the reader's line and literal limits,
  whatever the mailbox size.
- An unexpected error in a command is logged and answered with a tagged NO;
  the connection stays usable.
- With ``imap.proxy_protocol`` the session's address (trusted networks, rate
  limits, audit) is the PROXY header's source, read before the greeting and
  before TLS on the implicit-TLS port (``mssd.proxy_protocol``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mssd.auth.networks import trusted_matcher
from mssd.config import Settings
from mssd.imap import acl, encode, mailboxes, messages, search, sort
from mssd.imap.commands import Command, IdleDone, NeedContinuation, ProtocolError, SaslResponse
from mssd.imap.protocol import CommandReader
from mssd.imap.session import Bye, Services, Session
from mssd.proxy_protocol import ProxyHeader, start_proxied_server

log = logging.getLogger(__name__)

Handler = Callable[[Session, Command], Awaitable[None]]

_ANY: dict[str, Handler] = {
    "CAPABILITY": Session.cmd_capability,
    "NOOP": Session.cmd_noop,
    "LOGOUT": Session.cmd_logout,
    "ID": Session.cmd_id,
}
_AUTHENTICATED: dict[str, Handler] = {
    "ENABLE": Session.cmd_enable,
    "SELECT": mailboxes.cmd_select,
    "EXAMINE": mailboxes.cmd_select,
    "CREATE": mailboxes.cmd_create,
    "DELETE": mailboxes.cmd_delete,
    "RENAME": mailboxes.cmd_rename,
    "SUBSCRIBE": mailboxes.cmd_subscribe,
    "UNSUBSCRIBE": mailboxes.cmd_subscribe,
    "LIST": mailboxes.cmd_list,
    "LSUB": mailboxes.cmd_list,
    "NAMESPACE": mailboxes.cmd_namespace,
    "STATUS": mailboxes.cmd_status,
    "APPEND": messages.cmd_append,
    "MYRIGHTS": acl.cmd_myrights,
    "GETACL": acl.cmd_getacl,
    "LISTRIGHTS": acl.cmd_listrights,
    "SETACL": acl.cmd_setacl,
    "DELETEACL": acl.cmd_setacl,
    "GETQUOTAROOT": acl.cmd_getquotaroot,
    "GETQUOTA": acl.cmd_getquota,
}
_SELECTED: dict[str, Handler] = {
    "CHECK": messages.cmd_check,
    "CLOSE": messages.cmd_close,
    "UNSELECT": messages.cmd_close,
    "EXPUNGE": messages.cmd_expunge,
    "SEARCH": search.cmd_search,
    "FETCH": messages.cmd_fetch,
    "STORE": messages.cmd_store,
    "COPY": messages.cmd_copy,
    "MOVE": messages.cmd_copy,
    "SORT": sort.cmd_sort,
    "THREAD": sort.cmd_thread,
}
_READ_SIZE = 65536
_WRITE_BUFFER = 64 * 1024
"""Queued response octets that make :meth:`Connection.send` write at once."""


@dataclass(frozen=True)
class ImapListener:
    name: str
    server: asyncio.Server
    host: str
    port: int


class Connection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        services: Services,
        settings: Settings,
        tls: ssl.SSLContext,
        implicit_tls: bool,
        trusted: Callable[[str], bool],
        remote: str,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._output: list[bytes] = []
        self._output_size = 0
        self.settings = settings
        self.tls_context = tls
        self.commands = self._new_reader(services)
        self._reading = False
        self._deadline = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self.session = Session(
            services,
            send=self.send,
            queue=self.queue,
            remote_ip=remote,
            tls=implicit_tls,
            trusted=trusted(remote),
            peer_certificate=self.peer_certificate,
            starttls_available=not implicit_tls,
        )

    @staticmethod
    def _new_reader(services: Services) -> CommandReader:
        return CommandReader(max_literal=services.append_limit + 65536)

    def peer_certificate(self) -> bytes | None:
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        return bytes(der) if der else None

    async def send(self, data: bytes) -> None:
        """Queue a response; it leaves at the next :meth:`flush` (before the
        connection waits for the client) or once :data:`_WRITE_BUFFER` octets
        are queued. One write per command's answer, not per line, saves a TLS
        record and a system call for each of a FETCH's responses."""
        if self.queue(data):
            await self.flush()

    def queue(self, data: bytes) -> bool:
        """:meth:`send` without the wait, for loops that answer line after line
        (a FETCH of many messages): True once :data:`_WRITE_BUFFER` octets are
        queued, when the caller must ``await send(b"")`` before queueing more."""
        self._output.append(data)
        self._output_size += len(data)
        return self._output_size >= _WRITE_BUFFER

    async def flush(self) -> None:
        if self._output:
            data = b"".join(self._output)
            self._output.clear()
            self._output_size = 0
            self.writer.write(data)
            await self.writer.drain()

    def timeout(self) -> float:
        imap = self.settings.imap
        if self.session.state == "not-authenticated":
            return imap.login_timeout_seconds
        return imap.idle_timeout_seconds

    async def receive(self) -> bool:
        """Read more bytes into the command reader; False at end of stream, or
        after telling a client silent for :meth:`timeout` seconds goodbye."""
        await self.flush()
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.timeout()
        watchdog = self._watchdog
        if watchdog is None or watchdog.when() > self._deadline:
            if watchdog is not None:
                watchdog.cancel()
            self._watchdog = loop.call_at(self._deadline, self._expire)
        self._reading = True
        try:
            data = await self.reader.read(_READ_SIZE)
        except TimeoutError:
            await self.send(b"* BYE Autologout: idle for too long\r\n")
            await self.flush()
            return False
        finally:
            self._reading = False
        if not data:
            return False
        self.commands.feed(data)
        return True

    def _expire(self) -> None:
        """The idle timer: one per connection, moved on only when it fires, so a
        read costs the store of its deadline rather than a timer of its own (a
        timer per read was ~2 % of the CPU under load). A read still waiting past
        its deadline fails with TimeoutError (``receive`` says goodbye)."""
        self._watchdog = None
        if not self._reading:
            return  # the next read arms it again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._watchdog = loop.call_at(self._deadline, self._expire)
            return
        self.reader.set_exception(TimeoutError("no command within the idle timeout"))

    async def run(self) -> None:
        caps = " ".join(self.session.capabilities())
        await self.send(f"* OK [CAPABILITY {caps}] mssd IMAP ready\r\n".encode())
        try:
            while self.session.state != "logout":
                event = self.commands.next()
                if event is None:
                    if not await self.receive():
                        return
                    continue
                if isinstance(event, NeedContinuation):
                    await self.send(b"+ Ready for literal data\r\n")
                    continue
                if isinstance(event, ProtocolError):
                    await self.send(
                        encode.tagged(event.tag or "*", event.status, event.code, event.message)
                    )
                    continue
                await self.dispatch(event)
        except Bye as bye:
            await self.send(f"* BYE {bye}\r\n".encode())
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
        with contextlib.suppress(ConnectionError):
            await self.flush()

    async def dispatch(self, command: Command) -> None:
        session = self.session
        session.check_expiry()
        name = command.name
        if name == "STARTTLS" and session.state == "not-authenticated":
            await self.starttls(command)
            return
        if name == "AUTHENTICATE" and session.state == "not-authenticated":
            await self.authenticate(command)
            return
        if name == "LOGIN" and session.state == "not-authenticated":
            await session.cmd_login(command)
            return
        if name == "IDLE" and session.state in ("authenticated", "selected"):
            await self.idle(command)
            return
        handler = _ANY.get(name)
        if handler is None and session.state in ("authenticated", "selected"):
            handler = _AUTHENTICATED.get(name)
        if handler is None and session.state == "selected":
            handler = _SELECTED.get(name)
        if handler is None:
            known = (
                name in _AUTHENTICATED
                or name in _SELECTED
                or name in ("STARTTLS", "AUTHENTICATE", "LOGIN", "IDLE")
            )
            text = f"{name} not allowed now" if known else f"{name} is not supported"
            await session.tagged(command, "BAD", text)
            return
        try:
            await handler(session, command)
        except (Bye, ConnectionError):
            raise
        except Exception:
            log.exception("IMAP %s failed for %s", name, session.remote_ip)
            await session.tagged(
                command, "NO", "Internal error; nothing was changed", "UNAVAILABLE"
            )
        # After ENABLE UTF8=ACCEPT or IMAP4rev2 the next commands are read as UTF-8
        # (RFC 6855 §3, RFC 9051 §5.1); the reader parses them only after this one ends.
        self.commands.utf8 = session.utf8

    async def starttls(self, command: Command) -> None:
        session = self.session
        if session.tls:
            await session.tagged(command, "BAD", "TLS is already active")
            return
        await session.tagged(command, "OK", "Begin TLS negotiation now")
        await self.flush()
        await self.writer.start_tls(self.tls_context)
        # RFC 9051 §6.2.1: anything sent before the handshake is discarded.
        self.commands = self._new_reader(session.services)
        session.tls = True

    async def read_sasl(self) -> SaslResponse | ProtocolError:
        while True:
            response = self.commands.next_sasl_response()
            if response is not None:
                return response
            if not await self.receive():
                raise ConnectionError("client left during AUTHENTICATE")

    async def authenticate(self, command: Command) -> None:
        session = self.session
        started = await session.start_authenticate(command)
        if started is None:
            return
        exchange, step = started

        async def respond(challenge: bytes) -> bytes | None:
            await self.send(encode.continuation(challenge))
            response = await self.read_sasl()
            if isinstance(response, ProtocolError) or response.cancelled:
                return None
            return response.data

        await session.finish_auth(command, exchange, step, respond)

    async def idle(self, command: Command) -> None:
        """RFC 2177: changes to the selected folder go out as they happen."""
        session = self.session
        subscription = session.subscription
        await self.send(b"+ idling\r\n")
        read_task: asyncio.Task[bytes] | None = None
        try:
            await session.sync(allow_expunge=True)
            while True:
                done = self.commands.next_idle_done()
                if isinstance(done, IdleDone):
                    await session.tagged(command, "OK", "IDLE terminated")
                    return
                if isinstance(done, ProtocolError):
                    await session.tagged(command, "BAD", "Expected DONE")
                    return
                await self.flush()
                if read_task is None:
                    read_task = asyncio.ensure_future(self.reader.read(_READ_SIZE))
                waits: set[asyncio.Future[object]] = {read_task}  # type: ignore[arg-type]
                change_task = None
                if subscription is not None:
                    change_task = asyncio.ensure_future(subscription.wait())
                    waits.add(change_task)  # type: ignore[arg-type]
                finished, _ = await asyncio.wait(
                    waits, timeout=self.timeout(), return_when=asyncio.FIRST_COMPLETED
                )
                if change_task is not None and not change_task.done():
                    change_task.cancel()
                if not finished:
                    raise Bye("Autologout: idle for too long")
                if change_task is not None and change_task in finished:
                    session.check_expiry()
                    await session.sync(allow_expunge=True, force=True)
                if read_task in finished:
                    data = read_task.result()
                    read_task = None
                    if not data:
                        raise ConnectionError("client left during IDLE")
                    self.commands.feed(data)
        finally:
            if read_task is not None:
                read_task.cancel()


def imap_addresses(settings: Settings) -> list[tuple[str, str]]:
    """(listener name, ``host:port``) of the IMAP listeners configured."""
    plans = [("imap", settings.imap.imap_listen), ("imaps", settings.imap.imaps_listen)]
    return [(name, address) for name, address in plans if address]


_Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter, ProxyHeader | None], Awaitable[None]]
"""Serves one IMAP connection; the PROXY header, if the listener expects one."""


def _without_header(
    serve: _Serve,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    return lambda reader, writer: serve(reader, writer, None)


async def start_imap(
    settings: Settings,
    services: Services,
    tls: ssl.SSLContext,
    *,
    sockets: dict[str, socket.socket] | None = None,
) -> list[ImapListener]:
    """The listeners on their configured addresses, or on ``sockets`` (by
    listener name) bound already (``mssd.workers``)."""
    trusted = trusted_matcher(settings.server.trusted_networks)
    balancers = trusted_matcher(settings.imap.proxy_protocol_networks)
    listeners: list[ImapListener] = []

    def handler(implicit: bool) -> _Serve:
        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, header: ProxyHeader | None
        ) -> None:
            # Behind a load balancer the client is the header's source (DESIGN.md,
            # Scale-out); without one (or with a LOCAL header) the socket's peer.
            if header is not None and header.source is not None:
                remote = header.source.address
            else:
                peer = writer.get_extra_info("peername")
                remote = str(peer[0]) if peer else ""
            connection = Connection(
                reader,
                writer,
                services=services,
                settings=settings,
                tls=tls,
                implicit_tls=implicit,
                trusted=trusted,
                remote=remote,
            )
            try:
                await connection.run()
            except Exception:
                log.exception("IMAP connection failed")
            finally:
                connection.session.leave_folder()
                writer.close()

        return handle

    for name, address in imap_addresses(settings):
        implicit = name == "imaps"
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            sock = sockets[name] if sockets is not None else None
            if settings.imap.proxy_protocol:
                # The header comes first, before the greeting or the TLS handshake.
                server = await start_proxied_server(
                    handler(implicit),
                    host,
                    int(port),
                    name=name,
                    allowed=balancers,
                    header_timeout=settings.imap.proxy_protocol_timeout_seconds,
                    tls=tls if implicit else None,
                    limit=_READ_SIZE,
                    backlog=512,
                    sock=sock,
                )
            elif sock is not None:
                server = await asyncio.start_server(
                    _without_header(handler(implicit)),
                    sock=sock,
                    ssl=tls if implicit else None,
                    limit=_READ_SIZE,
                )
            else:
                server = await asyncio.start_server(
                    _without_header(handler(implicit)),
                    host,
                    int(port),
                    ssl=tls if implicit else None,
                    reuse_address=True,
                    backlog=512,
                    limit=_READ_SIZE,
                )
        except OSError as error:
            for listener in listeners:
                listener.server.close()
            raise OSError(f"cannot listen for imap.{name}_listen on {address}: {error}") from error
        bound = server.sockets[0].getsockname()
        listeners.append(ImapListener(name, server, host, int(bound[1])))
    return listeners
