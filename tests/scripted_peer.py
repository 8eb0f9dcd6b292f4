"""A scripted SMTP peer and an in-process relay in front of it, for the relay's unit tests.

:class:`ScriptedPeer` is a small asyncio SMTP server on a loopback port: EHLO with the
extensions it is told to offer, STARTTLS with an operator certificate of the development
PKI, then the replies a test scripts (4xx or 5xx at any command, multi-line replies, a
connection closed in the middle, silence), and sensible ones otherwise. It records what
it was sent and how many connections were open at once.

:class:`Relay` is mssd's real relay worker, queue and report writer on a real store
(SQLite or PostgreSQL), routing the peers' domains to their ports: a test queues
messages, runs one round of the relay, then reads the queue entries and the reports the
sender found in its INBOX.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.policy
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from conftest import PkiBundle, new_message

from mssd.config import RelaySettings, ServerSettings, Settings, TlsSettings
from mssd.delivery.dkim import DkimSigner
from mssd.delivery.dsn import Reporter
from mssd.smtp.relay import RelayWorker
from mssd.store import admin, queue
from mssd.store.accounts import StoreAccounts
from mssd.store.delivery import GroupCommitter, RecipientRecord
from mssd.store.engine import create_engine, dispose, upgrade
from mssd.store.messages import list_messages, read_blob
from mssd.store.queue import QueueEntry
from mssd.trust import pki
from mssd.trust.identity import normalise_dn
from mssd.trust.tls import server_context
from mssd.trust.whitelist import Whitelist

CLOSE = "<close the connection>"
SILENT = "<never answer>"
DEFAULT_EXTENSIONS = ("PIPELINING", "8BITMIME", "DSN", "SIZE 100000000", "ENHANCEDSTATUSCODES")
SENDER_DOMAIN = "emetteur.mssd.test"
SENDER = f"docteur@{SENDER_DOMAIN}"
ALL_STATES = ("queued", "sending", "delivered", "failed")

Script = Callable[[str], "str | Awaitable[str | None] | None"]
"""Given a command line (``"."`` for the end of the message data), the reply to send
(lines separated by newlines), CLOSE, SILENT, or None for the usual reply."""


@dataclass
class Gauge:
    """Connections open at once, over one or several peers."""

    now: int = 0
    most: int = 0


@dataclass(frozen=True)
class Received:
    """A message the peer accepted: its MAIL and accepted RCPT lines and its data."""

    mail: str
    recipients: tuple[str, ...]
    data: bytes


@dataclass
class ScriptedPeer:
    tls: ssl.SSLContext
    extensions: Sequence[str] = DEFAULT_EXTENSIONS
    script: Script | None = None
    gauge: Gauge = field(default_factory=Gauge)
    port: int = 0
    sessions: int = 0
    commands: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> ScriptedPeer:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reply(self, command: str, usual: str) -> str:
        answer = self.script(command) if self.script is not None else None
        if asyncio.iscoroutine(answer):
            answer = await answer
        return usual if answer is None else str(answer)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.sessions += 1
        self.gauge.now += 1
        self.gauge.most = max(self.gauge.most, self.gauge.now)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self.gauge.now -= 1
            self._tasks.discard(task)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, reply: str) -> bool:
        """Send ``reply``; False when the script said to close the connection."""
        if reply == CLOSE:
            return False
        if reply == SILENT:
            await asyncio.sleep(3600)
        lines = reply.split("\n")
        writer.write(b"".join(line.encode() + b"\r\n" for line in lines))
        await writer.drain()
        return True

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._send(writer, "220 mx.pair.mssd.test ESMTP scripted")
        secure = False
        mail: str | None = None
        recipients: list[str] = []
        while line := await reader.readline():
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            self.commands.append(command)
            verb = command.split(" ", 1)[0].upper()
            usual = {
                "EHLO": "\n".join(
                    ["250-mx.pair.mssd.test"]
                    + [f"250-{e}" for e in self.extensions]
                    + ["250 HELP" if secure else "250 STARTTLS"]
                ),
                "STARTTLS": "220 2.0.0 ready",
                "MAIL": "250 2.1.0 ok",
                "RCPT": "250 2.1.5 ok",
                "DATA": "354 go ahead" if recipients else "554 5.5.1 no valid recipients",
                "RSET": "250 2.0.0 ok",
                "NOOP": "250 2.0.0 ok",
                "QUIT": "221 2.0.0 bye",
            }.get(verb, "500 5.5.2 unknown command")
            reply = await self._reply(command, usual)
            if not await self._send(writer, reply):
                return
            positive = reply[:1] in "23"
            if verb == "STARTTLS" and positive:
                await writer.start_tls(self.tls)
                secure = True
            elif verb == "MAIL" and positive:
                mail, recipients = command, []
            elif verb == "RCPT" and positive:
                recipients.append(command)
            elif verb == "RSET":
                mail, recipients = None, []
            elif verb == "QUIT":
                return
            elif verb == "DATA" and reply.startswith("354"):
                data = await self._data(reader)
                final = await self._reply(".", "250 2.0.0 accepted")
                if not await self._send(writer, final):
                    return
                if final.startswith("2") and mail is not None:
                    self.received.append(Received(mail, tuple(recipients), data))
                mail, recipients = None, []

    async def _data(self, reader: asyncio.StreamReader) -> bytes:
        lines: list[bytes] = []
        while (line := await reader.readline()) != b".\r\n":
            if not line:
                raise ConnectionError("closed during DATA")
            lines.append(line[1:] if line.startswith(b".") else line)  # RFC 5321 §4.5.2
        return b"".join(lines)


@dataclass(frozen=True)
class PeerIdentity:
    """An operator server certificate for the scripted peers, and its TLS context."""

    cert: pki.IssuedCertificate
    context: ssl.SSLContext


def make_peer_identity(test_pki: PkiBundle, name: str = "pair") -> PeerIdentity:
    cert = pki.issue_server_certificate(
        test_pki.dev,
        common_name=f"mx.{name}.mssd.test",
        idnat_struct="1750000077",
        organisation="Operateur scripte",
        name=f"scripted-{name}-{time.monotonic_ns()}",
    )
    context = server_context(cert.cert, cert.key, client_ca_file=test_pki.dev.ca_bundle)
    return PeerIdentity(cert, context)


def message(subject: str, body: str = "Compte rendu.\n", to: str = "c@pair.mssd.test") -> bytes:
    text = f"From: <{SENDER}>\nTo: <{to}>\nSubject: {subject}\nMessage-ID: <{subject}@x>\n\n"
    text += body
    return text.replace("\n", "\r\n").encode()


@dataclass
class Relay:
    """The real relay worker, queue and reports, on a real store (see the module text)."""

    url: str
    engine: Any
    committer: GroupCommitter
    settings: Settings
    whitelist: Whitelist
    worker: RelayWorker | None = None

    def start_worker(self, signer: DkimSigner | None = None, **relay: Any) -> RelayWorker:
        settings = dataclasses.replace(
            self.settings, relay=dataclasses.replace(self.settings.relay, **relay)
        )
        reporter = Reporter(
            StoreAccounts(self.engine),
            hostname=settings.server.hostname,
            trust_space=lambda: self.whitelist,
        )
        self.worker = RelayWorker(
            self.engine,
            settings,
            whitelist=lambda: self.whitelist,
            reporter=reporter,
            signer=signer,
        )
        return self.worker

    async def queue(
        self,
        recipients: Sequence[str | tuple[str, str | None]],
        content: bytes | None = None,
        *,
        ret: str | None = None,
        envid: str | None = None,
        body: str | None = None,
    ) -> str:
        """Queue one message for ``recipients`` (address, or (address, NOTIFY)); its id."""
        content = content or message("essai")
        records = tuple(
            RecipientRecord(r, None) if isinstance(r, str) else RecipientRecord(r[0], None, r[1])
            for r in recipients
        )
        stored = await self.committer.store(
            new_message(content, records, mail_from=SENDER, dsn_ret=ret, dsn_envid=envid, body=body)
        )
        return stored.envelope_id

    async def run_once(self) -> None:
        """One round of the relay: claim what is due, deliver it, record every outcome."""
        worker = self.worker or self.start_worker()
        await worker.run_once()

    async def entries(self) -> dict[str, QueueEntry]:
        """Every queue entry by recipient address."""
        found = await queue.list_entries(self.engine, states=ALL_STATES, limit=1000)
        return {e.address: e for e in found}

    async def reports(self) -> list[email.message.EmailMessage]:
        """The delivery reports in the sender's INBOX, parsed."""
        placed = await list_messages(self.engine, SENDER, folder="INBOX")
        policy = email.policy.default
        return [
            email.message_from_bytes(await read_blob(self.engine, p.sha256), policy=policy)  # type: ignore[misc]
            for p in placed
        ]


def report_fields(report: email.message.EmailMessage) -> list[dict[str, str]]:
    """The per-message block then each per-recipient block of a report (RFC 3464 §2)."""
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    raw = status.as_bytes().decode("utf-8", "replace").split("\n\n", 1)[1]
    blocks = [b for b in re.split(r"\r?\n\r?\n", raw.strip()) if b.strip()]
    blocks = [re.sub(r"\r?\n[ \t]+", " ", block) for block in blocks]  # RFC 5322 §2.2.3
    return [
        {m[1]: m[2] for m in re.finditer(r"^([A-Za-z-]+): (.*?)\r?$", block, re.M)}
        for block in blocks
    ]


@contextlib.asynccontextmanager
async def relay_for(
    store_url: str,
    test_pki: PkiBundle,
    routes: dict[str, ScriptedPeer],
    identity: PeerIdentity,
    **relay: Any,
) -> AsyncIterator[Relay]:
    """A store with the sender's domain and mailbox, and a relay routing each domain of
    ``routes`` to its peer, whose certificate (``identity``) the whitelist lists for them."""
    engine = create_engine(store_url)
    await upgrade(engine)
    await admin.add_domain(engine, SENDER_DOMAIN, actor="test")
    await admin.create_mailbox(
        engine, address=SENDER, bal_type="PER", owner_idnat="810000000011",
        idnat_ps="810000000011", actor="test",
    )  # fmt: skip
    committer = GroupCommitter(engine)
    committer.start()
    settings = Settings(
        server=ServerSettings(hostname=f"mx.{SENDER_DOMAIN}"),
        tls=TlsSettings(
            cert_file=test_pki.dev.server_cert,
            key_file=test_pki.dev.server_key,
            client_ca_file=test_pki.dev.ca_bundle,
            crl_file=test_pki.dev.crl,
            operator_ca_file=test_pki.dev.org_ca,
        ),
        relay=RelaySettings(
            **{
                "routes": tuple(f"{d}=127.0.0.1:{p.port}" for d, p in routes.items()),
                "connect_timeout_seconds": 5,
                "command_timeout_seconds": 5,
                "retry_base_seconds": 3600,
                "retry_max_seconds": 3600,
            }
            | relay
        ),
    )
    listed = frozenset({normalise_dn(identity.cert.subject_dn)})
    whitelist = Whitelist(
        {d: listed for d in routes} | {SENDER_DOMAIN: frozenset({normalise_dn("CN=us")})}
    )
    rig = Relay(store_url, engine, committer, settings, whitelist)
    try:
        yield rig
    finally:
        if rig.worker is not None:
            await rig.worker.stop()
        for peer in {id(p): p for p in routes.values()}.values():
            await peer.stop()
        await committer.stop()
        await dispose(engine)
