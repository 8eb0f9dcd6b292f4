"""One IMAP session: its state (RFC 9051 §3), the command table per state,
and the commands that do not touch messages.

The asyncio layer (``server.py``) feeds commands in and writes what
:attr:`Session.send` is given; commands on messages live in ``messages.py``
(SEARCH in ``search.py``), mailbox commands in ``mailboxes.py``. Everything a command answers goes
through ``send``; a command's tagged reply is always the last thing it sends.

Invariants:
- Sequence numbers change only through :meth:`Session.sync` (``view.py``), and
  EXPUNGE is not announced during FETCH, STORE or SEARCH (RFC 9051 §7.5.1).
- A PSC token that expires ends the session at the next command with
  ``* BYE`` (MSSanté client rules), never in the middle of a response.
- Every login, selection and content fetch is audited.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mssd.auth import (
    AuthContext,
    Authenticator,
    Challenge,
    EncryptionRequired,
    Failure,
    Principal,
    SaslExchange,
    Success,
    UnknownMechanism,
)
from mssd.imap import encode
from mssd.imap.commands import AuthenticateArgs, Command, EnableArgs, IdArgs, LoginArgs
from mssd.imap.facts import FactCache
from mssd.imap.heads import HeadCache
from mssd.imap.index import FolderIndex, Indexes
from mssd.imap.view import SelectedView, ViewUpdate
from mssd.store.changes import ChangeBus, FlagRow, Subscription
from mssd.store.delivery import GroupCommitter
from mssd.store.mailstore import MailStore
from mssd.store.records import AuditEvent

log = logging.getLogger(__name__)

State = Literal["not-authenticated", "authenticated", "selected", "logout"]

SERVER_ID = (("name", "mssd"), ("vendor", "mssd project"), ("support-url", None))

ENABLEABLE = {n.upper(): n for n in ("CONDSTORE", "QRESYNC", "UTF8=ACCEPT", "IMAP4rev2")}
"""What ENABLE accepts (RFC 5161 §3.1), upper-cased, to the name ENABLED answers."""


class Bye(Exception):
    """End the session after sending ``* BYE <text>``."""


def during_uid_command(command: Command) -> bool:
    """Whether the expunges another session made may be told at the end of
    ``command``, a FETCH, STORE or SEARCH: RFC 9051 §7.5.1 (RFC 3501 §7.4.1)
    forbids EXPUNGE responses while answering FETCH, STORE and SEARCH, whose
    client still counts on its sequence numbers, and allows them during UID
    FETCH, UID STORE and UID SEARCH, which name messages by UID. Telling them there
    rather than at the next NOOP also lets the session's view go back to
    sharing the folder's state instead of holding a copy of it (``view.py``)."""
    return command.uid


@dataclass
class Services:
    authenticator: Authenticator
    mailstore: MailStore
    bus: ChangeBus
    audit: GroupCommitter
    append_limit: int
    heads: HeadCache
    facts: FactCache
    indexes: Indexes = field(init=False)

    def __post_init__(self) -> None:
        self.indexes = Indexes(self.mailstore, self.bus)


class Session:
    def __init__(
        self,
        services: Services,
        *,
        send: Callable[[bytes], Awaitable[None]],
        queue: Callable[[bytes], bool],
        remote_ip: str,
        tls: bool,
        trusted: bool,
        peer_certificate: Callable[[], bytes | None],
        starttls_available: bool,
    ) -> None:
        self.services = services
        self.send = send
        self.queue = queue
        """``send`` without the wait; True when the caller must ``await send(b"")``."""
        self.remote_ip = remote_ip
        self.tls = tls
        self.trusted = trusted
        self.peer_certificate = peer_certificate
        self.starttls_available = starttls_available
        self.state: State = "not-authenticated"
        self.principal: Principal | None = None
        self.view: SelectedView | None = None
        self.subscription: Subscription | None = None
        """Changes to the selected folder (:meth:`sync` reads the store only after one)."""
        self.index: FolderIndex | None = None
        """The selected folder's shared index (``index.py``), held until the session leaves it."""
        self.last_read = 0.0
        self.enabled: set[str] = set()
        self.utf8 = False
        """UTF-8 mailbox names and strings: UTF8=ACCEPT or IMAP4rev2 is enabled."""

    # -- helpers ---------------------------------------------------------------

    @property
    def rev2(self) -> bool:
        """Whether the client enabled IMAP4rev2 (RFC 9051 §6.3.1); until it does,
        the session speaks IMAP4rev1 (RFC 3501) and its extensions."""
        return "IMAP4rev2" in self.enabled

    async def tagged(
        self, command: Command, status: str, text: str, code: str | None = None
    ) -> None:
        await self.send(encode.tagged(command.tag, status, code, text, utf8=self.utf8))

    async def untagged(self, *parts: encode.ImapValue) -> None:
        await self.send(encode.untagged(*parts, utf8=self.utf8))

    async def audit(self, action: str, target: str, **details: object) -> None:
        assert self.principal is not None
        await self.services.audit.record(
            AuditEvent(
                actor=self.principal.login,
                action=action,
                target=target,
                remote=self.remote_ip,
                details=dict(details),
            )
        )

    def auth_context(self) -> AuthContext:
        return AuthContext(
            protocol="imap",
            remote_ip=self.remote_ip,
            tls=self.tls,
            peer_certificate=self.peer_certificate() if self.tls else None,
            trusted_network=self.trusted,
        )

    def capabilities(self) -> list[str]:
        # RFC 9051 §6.1.1: both revisions; a session is rev1 until it enables rev2.
        caps = ["IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        caps += ["NAMESPACE", "UIDPLUS", "MOVE", "UNSELECT", "CHILDREN", "SPECIAL-USE"]
        caps += ["MULTIAPPEND"]  # RFC 3502: APPEND takes several messages, all or none
        caps += ["CONDSTORE", "QRESYNC", "ESEARCH", "SEARCHRES", "BINARY", "UTF8=ACCEPT"]
        caps += ["LIST-EXTENDED", "LIST-STATUS", "STATUS=SIZE"]
        caps += ["SORT", "SORT=DISPLAY", "THREAD=REFERENCES", "THREAD=ORDEREDSUBJECT"]
        caps += ["ACL", "RIGHTS=texk", "QUOTA", "QUOTA=RES-STORAGE"]
        caps.append(f"APPENDLIMIT={self.services.append_limit}")
        if self.state == "not-authenticated":
            if self.starttls_available and not self.tls:
                caps.append("STARTTLS")
            mechanisms = self.services.authenticator.mechanisms(self.auth_context())
            caps += [f"AUTH={m}" for m in mechanisms]
            if not (self.tls or self.trusted):
                # RFC 9051 §6.2.3: no LOGIN until the connection is protected.
                caps.append("LOGINDISABLED")
        return caps

    def check_expiry(self) -> None:
        """MSSanté client rules: a session lives no longer than its PSC token."""
        principal = self.principal
        if principal is not None and principal.expires_at is not None:
            if time.time() >= principal.expires_at:
                raise Bye("Authentication token expired, please log in again")

    # -- state changes -----------------------------------------------------------

    async def logged_in(self, principal: Principal) -> None:
        self.principal = principal
        self.state = "authenticated"

    def select(self, view: SelectedView, index: FolderIndex) -> None:
        """Make ``view`` the selected folder; the session now holds ``index``
        (from ``services.indexes.acquire``) until it leaves the folder."""
        self.leave_folder()
        self.view = view
        self.index = index
        self.state = "selected"
        self.subscription = self.services.bus.subscribe(view.folder.id)
        self.last_read = time.monotonic()

    def up_to_date(self, view: SelectedView) -> bool:
        """Whether the store can hold nothing new for the view: no change was
        published for the folder since the last read, and the change bus would
        have told (``ChangeBus.silence_proves_nothing_changed``)."""
        subscription = self.subscription
        return (
            subscription is not None
            and not subscription.pending()
            and not view.expunges_withheld
            and self.services.bus.silence_proves_nothing_changed(self.last_read)
        )

    def own_change(self, count: int) -> int | None:
        """After a write of this session that gave ``count`` messages of the
        selected folder new modseqs: the folder's new HIGHESTMODSEQ when that
        write is provably the only change since the view was last brought up to
        date, so the caller can apply it to the view without reading the store;
        else None, and :meth:`sync` reads.

        The proof rests on the store's modseq policy (``mailstore``: each changed
        message takes the next modseq, under the folder lock) and on the store
        publishing each change, with the folder's new HIGHESTMODSEQ, before the
        write returns: the write's ``count`` modseqs end at ``view.highestmodseq
        + count`` only if it started right after the view, and no pending change
        above that means nobody wrote since."""
        view, subscription = self.view, self.subscription
        if view is None or subscription is None or count <= 0 or view.expunges_withheld:
            return None
        target = view.highestmodseq + count
        pending = [change.modseq for change in subscription.peek()]
        if not pending or max(pending) != target or 0 in pending:
            return None  # 0: a "resync", anything may have changed
        subscription.drain()
        return target

    async def own_update(
        self,
        changed: Sequence[FlagRow],
        vanished: Sequence[int],
        highest: int,
        *,
        allow_expunge: bool,
    ) -> ViewUpdate:
        """Bring the view forward by this session's own write, which
        :meth:`own_change` proved the only change since the view's state (the
        folder's HIGHESTMODSEQ after it is ``highest``): through the folder
        index, whose next state a view that shares its state adopts
        (``SelectedView.catch_up``), so that the write costs the folder's
        arrays one copy, the index's, not a second one for the view."""
        view, index = self.view, self.index
        assert view is not None and index is not None
        state = await index.latest()
        return view.catch_up(state, changed, vanished, highest, allow_expunge=allow_expunge)

    async def sync(self, *, allow_expunge: bool, force: bool = False) -> None:
        """Tell the client what changed in the selected folder since it last heard.

        The changes come from the folder's shared index (``index.py``), which
        reads the store once for every session on the folder. Where expunges
        may be told, a view that is current goes back to sharing the index's
        state (``SelectedView.share``)."""
        view, index = self.view, self.index
        if view is None or index is None:
            return
        if force or not self.up_to_date(view):
            if self.subscription is not None:
                # Before the read: a change committed during it stays pending.
                self.subscription.drain()
            self.last_read = time.monotonic()
            changed, vanished, highest = await index.changes_since(view.highestmodseq)
            await self.announce(
                view.catch_up(index.state, changed, vanished, highest, allow_expunge=allow_expunge)
            )
        if not view.shared:
            state = await index.latest() if allow_expunge else index.state
            view.share(state)

    async def announce(self, update: ViewUpdate) -> None:
        view = self.view
        assert view is not None
        if "QRESYNC" in self.enabled and update.expunged_uids:
            # RFC 7162 §3.2.10: with QRESYNC, VANISHED replaces EXPUNGE.
            uids = encode.compress_uids(update.expunged_uids)
            await self.send(f"* VANISHED {uids}\r\n".encode())
        else:
            for seq in update.expunged:
                await self.send(b"* %d EXPUNGE\r\n" % seq)
        if update.exists is not None:
            await self.send(b"* %d EXISTS\r\n" % update.exists)
        for seq in update.flags:
            uid = view.uid_at(seq)
            items: list[tuple[str, encode.ImapValue]] = [
                ("UID", uid),
                ("FLAGS", encode.message_flags(view.flags[uid])),
            ]
            if view.condstore:
                items.append(("MODSEQ", [view.modseqs[uid]]))
            if self.queue(encode.fetch_response(seq, items, utf8=self.utf8)):
                await self.send(b"")

    def leave_folder(self) -> None:
        self.view = None
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None
        if self.index is not None:
            self.services.indexes.release(self.index)
            self.index = None
        if self.state == "selected":
            self.state = "authenticated"

    # -- any state ---------------------------------------------------------------

    async def cmd_capability(self, command: Command) -> None:
        await self.send(("* CAPABILITY " + " ".join(self.capabilities()) + "\r\n").encode())
        await self.tagged(command, "OK", "CAPABILITY completed")

    async def cmd_noop(self, command: Command) -> None:
        await self.sync(allow_expunge=True)
        await self.tagged(command, "OK", "NOOP completed")

    async def cmd_logout(self, command: Command) -> None:
        await self.send(b"* BYE mssd logging out\r\n")
        await self.tagged(command, "OK", "LOGOUT completed")
        self.state = "logout"

    async def cmd_id(self, command: Command) -> None:
        assert isinstance(command.args, IdArgs)
        if command.args.params:
            client = dict(command.args.params)
            log.info(
                "%s IMAP client %s %s", self.remote_ip, client.get("name"), client.get("version")
            )
        values: list[encode.ImapValue] = []
        for key, value in SERVER_ID:
            values += [key, value]
        await self.untagged(encode.Atom("ID"), values)
        await self.tagged(command, "OK", "ID completed")

    async def cmd_enable(self, command: Command) -> None:
        assert isinstance(command.args, EnableArgs)
        enabled = []
        for capability in command.args.capabilities:
            name = ENABLEABLE.get(capability.upper())
            if name is not None and name not in self.enabled:
                self.enabled.add(name)
                enabled.append(name)
                if name in ("UTF8=ACCEPT", "IMAP4rev2"):
                    # RFC 6855 §3, RFC 9051 §5.1: UTF-8 names and strings from now on.
                    self.utf8 = True
                if name == "QRESYNC" and "CONDSTORE" not in self.enabled:
                    # RFC 7162 §3.2.3: enabling QRESYNC enables CONDSTORE.
                    self.enabled.add("CONDSTORE")
                if name in ("CONDSTORE", "QRESYNC") and self.view is not None:
                    self.view.condstore = True
        await self.send(("* ENABLED" + "".join(" " + n for n in enabled) + "\r\n").encode())
        await self.tagged(command, "OK", "ENABLE completed")

    # -- not authenticated ---------------------------------------------------------

    async def cmd_login(self, command: Command) -> None:
        assert isinstance(command.args, LoginArgs)
        if not (self.tls or self.trusted):
            await self.tagged(
                command, "NO", "LOGIN needs TLS: use STARTTLS first", "PRIVACYREQUIRED"
            )
            return
        try:
            exchange = self.services.authenticator.start("PLAIN", self.auth_context())
        except (UnknownMechanism, EncryptionRequired):
            await self.tagged(command, "NO", "LOGIN is not available", "PRIVACYREQUIRED")
            return
        userid, password = command.args.userid, command.args.password
        message = b"\0" + userid.encode("utf-8", "surrogateescape") + b"\0"
        message += password.encode("utf-8", "surrogateescape")
        await self.finish_auth(command, exchange, await exchange.step(message), None)

    async def finish_auth(
        self,
        command: Command,
        exchange: SaslExchange,
        step: Challenge | Success | Failure,
        respond: Callable[[bytes], Awaitable[bytes | None]] | None,
    ) -> None:
        """Drive a SASL exchange to its end; ``respond`` sends a challenge and
        returns the client's answer (None when it cancelled)."""
        while isinstance(step, Challenge):
            if respond is None:
                exchange.cancel()
                await self.tagged(command, "NO", "Authentication failed", "AUTHENTICATIONFAILED")
                return
            answer = await respond(step.data)
            if answer is None:
                exchange.cancel()
                await self.tagged(command, "BAD", "Authentication cancelled")
                return
            step = await exchange.step(answer)
        if isinstance(step, Success):
            await self.logged_in(step.principal)
            caps = " ".join(self.capabilities())
            await self.tagged(command, "OK", "Logged in", f"CAPABILITY {caps}")
            return
        if step.temporary:
            await self.tagged(command, "NO", step.reason, "UNAVAILABLE")
        elif step.malformed:
            await self.tagged(command, "BAD", step.reason)
        else:
            await self.tagged(command, "NO", "Authentication failed", "AUTHENTICATIONFAILED")

    async def start_authenticate(
        self, command: Command
    ) -> tuple[SaslExchange, Challenge | Success | Failure] | None:
        """AUTHENTICATE's first step; None when already answered."""
        assert isinstance(command.args, AuthenticateArgs)
        try:
            exchange = self.services.authenticator.start(
                command.args.mechanism, self.auth_context()
            )
        except EncryptionRequired:
            await self.tagged(command, "NO", "Use STARTTLS first", "PRIVACYREQUIRED")
            return None
        except UnknownMechanism:
            await self.tagged(command, "NO", "Unsupported authentication mechanism", "CANNOT")
            return None
        return exchange, await exchange.step(command.args.initial_response)
