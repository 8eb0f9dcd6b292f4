"""Change notifications: how an IMAP session in IDLE learns that its folder changed.

A writer (the mail store, the group committer) publishes a :class:`FolderChange`
after its transaction committed; every :class:`Subscription` on that folder in
this process wakes up at once, and the change also travels to the other mssd
processes sharing the store (DESIGN.md, "One message", step 6; "Scale-out"):

- on PostgreSQL, over ``LISTEN/NOTIFY`` on the channel ``mssd_changes``;
- on a SQLite file with ``imap.workers`` > 1, over the links of
  ``mssd.store.change_links``: ``mssd serve`` is the hub, linked to each IMAP
  process it starts by a socket pair; it delivers a child's frames to its own
  subscribers and forwards them to every other child, and sends its own
  changes to all of them; a child sends its changes to the hub only. Frames
  carry the NOTIFY payloads below, channel included. A link that had to drop
  frames (its peer too far behind) sends a reset once it can: the receiver
  (and, on the hub, every other child) tells every subscriber to ``resync``;
  so does a child whose link to the hub closed (it then trusts no silence),
  and the hub when a child's link closes (the child may have committed
  changes it could not send).

Invariants:
- publish after COMMIT, never before: a session woken by a change must find it
  in the store;
- a notification is a hint: a woken session re-reads the store
  (``MailStore.changes_since``), unless its folder index can chain the
  change's delta onto the state it holds, without a gap (then the delta is
  exactly what the store would answer). So a subscriber's queue is bounded by
  coalescing (one pending change per kind, carrying the highest modseq seen),
  and a lost notification is repaired by a synthetic ``resync`` change: after
  the listening connection to PostgreSQL was lost and re-established, or a
  link reset or lost (above), every subscribed folder gets one; and with
  several processes, silence is trusted for :data:`SILENCE_TRUST_SECONDS` only;
- no state here is needed for correctness: a process that restarts loses only
  wake-ups, which sessions recover by re-reading the store;
- payloads are ``folder_id:modseq:kind:origin[:delta]``; ``origin`` names the
  sending process so that it does not deliver its own changes twice (it
  delivered them locally already). Payloads without an origin
  (``folder_id:modseq:kind``, e.g. sent by hand from psql) are delivered
  everywhere. The delta (JSON, when it fits) lets the other processes' folder
  indexes follow the change without reading the store (``mssd.imap.index``);
  one they cannot chain from their state is read from the store as before.

Other owners share the machinery on their own channels (:meth:`ChangeBus.listen`,
:meth:`ChangeBus.post`: the authentication rate limiter, ``mssd.auth.ratelimit``):
the same LISTEN connection and reconnects (or the same links), a batched sender
that never makes the poster wait. Their payloads are opaque here, and best
effort: nothing is resent after a failed NOTIFY or a dropped frame, nor
replayed after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd import background
from mssd.store.change_links import RESET, Link, encode_frame, open_link
from mssd.store.change_payloads import (
    ChangeKind,
    FlagRow,
    FlagState,
    FolderChange,
    FolderDelta,
    changes_from_stored,
    decode_payload,
    encode_payload,
)
from mssd.store.delivery import StoredMessage
from mssd.store.engine import run_statements

__all__ = [
    "APPLICATION_NAME",
    "CHANNEL",
    "SILENCE_TRUST_SECONDS",
    "ChangeBus",
    "ChangeKind",
    "FlagRow",
    "FlagState",
    "FolderChange",
    "FolderDelta",
    "Subscription",
    "SubscriptionClosed",
    "changes_from_stored",
    "decode_payload",
    "encode_payload",
]

log = logging.getLogger(__name__)

CHANNEL = "mssd_changes"
APPLICATION_NAME = "mssd-changes"
"""``application_name`` of the listening connection (visible in pg_stat_activity)."""

SILENCE_TRUST_SECONDS = 1.0
"""With several processes, how long the absence of a notification is trusted
before a reader re-reads the store anyway (a NOTIFY that could not be sent is
then noticed within this time)."""
NOTIFY_LINGER = 0.02
"""Seconds the sender of change notifications waits, after the first change
that needs sending, for others to share its NOTIFY. Each NOTIFY transaction
costs PostgreSQL far more than its statement (the commit, the notification
queue, waking every listening backend of the database): with ten IMAP clients
on two cores, one per write cost some 20 % of the benchmark's throughput; 20 ms
of batching got back 9 % (bench/README.md). Other processes hear a change that
much later, well within the second the sessions in IDLE are promised."""
_MAX_DELTAS = 256
"""Deltas a subscription keeps between drains; past that its reader re-reads."""
_NOTIFY = text(
    "SELECT pg_notify(c, p) FROM unnest("
    "CAST(:channels AS text[]), CAST(:payloads AS text[])) AS t(c, p)"
)
_HEALTH_INTERVAL = 10.0
_HEALTH_TIMEOUT = 5.0
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
_MAX_POSTS = 10_000
"""Payloads :meth:`ChangeBus.post` queues at most while the sender is busy or
the database unreachable; past that, new ones are dropped."""


class SubscriptionClosed(Exception):
    """The subscription was closed while a reader waited on it."""


class Subscription:
    """The changes of one folder, coalesced: at most one pending change per kind.

    Use ``await sub.get()``, ``await sub.wait()`` (everything pending: the shape
    an IDLE loop wants), or ``async for``.
    Close it (or use it as a context manager) when the session leaves the folder.
    """

    def __init__(self, bus: ChangeBus, folder_id: int, *, deltas: bool = False) -> None:
        self.folder_id = folder_id
        self._bus = bus
        self._pending: dict[ChangeKind, FolderChange] = {}
        self._ready = asyncio.Event()
        self._closed = False
        self._deltas: list[FolderChange] | None = [] if deltas else None
        """With ``deltas``: every change offered since the last drain, while
        each carried its :class:`FolderDelta` (None after one did not, or
        after too many)."""
        self._collect = deltas

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        return len(self._pending)

    def offer(self, change: FolderChange) -> None:
        """Queue a change, merging it with a pending one of the same kind."""
        if self._closed:
            return
        if self._deltas is not None:
            if change.delta is None or len(self._deltas) >= _MAX_DELTAS:
                self._deltas = None
            else:
                self._deltas.append(change)
        previous = self._pending.get(change.kind)
        if previous is None or change.modseq > previous.modseq:
            self._pending[change.kind] = change
        self._ready.set()

    def peek(self) -> list[FolderChange]:
        """What is pending, left pending."""
        return list(self._pending.values())

    def drain(self) -> list[FolderChange]:
        """Everything pending, oldest kind first; leaves the queue empty."""
        changes = list(self._pending.values())
        self._pending.clear()
        self._ready.clear()
        if self._collect:
            self._deltas = []
        return changes

    def drain_deltas(self) -> list[FolderChange] | None:
        """With ``deltas``: :meth:`drain`, answering the changes themselves, in
        the order offered, when every one carried its delta; else None."""
        deltas = self._deltas
        self.drain()
        return deltas

    def get_nowait(self) -> FolderChange | None:
        if not self._pending:
            return None
        kind = next(iter(self._pending))
        change = self._pending.pop(kind)
        if not self._pending:
            self._ready.clear()
        return change

    async def get(self) -> FolderChange:
        while True:
            change = self.get_nowait()
            if change is not None:
                return change
            if self._closed:
                raise SubscriptionClosed(f"subscription to folder {self.folder_id} is closed")
            await self._ready.wait()

    async def wait(self) -> list[FolderChange]:
        """Everything pending, once something is (wrap in ``asyncio.timeout`` to
        bound the wait); [] when the subscription is closed."""
        while not self._pending and not self._closed:
            await self._ready.wait()
        return self.drain()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bus._unsubscribe(self)
            self._ready.set()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> FolderChange:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None


class ChangeBus:
    """Fans changes out to subscribers, across processes on PostgreSQL, and on
    SQLite between the processes of one ``mssd serve`` (``imap.workers``):
    ``hub`` in ``mssd serve`` (children are :meth:`attach`-ed as they start),
    ``uplink`` (its end of the socket pair) in each child. Without either, a
    SQLite process is alone: only the local fan-out runs. Both are ignored on
    PostgreSQL, where every process LISTENs.
    """

    def __init__(
        self, engine: AsyncEngine, *, hub: bool = False, uplink: socket.socket | None = None
    ) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._hub = hub and not self._postgres
        self._uplink_socket = None if self._postgres else uplink
        self._links: set[Link] = set()
        self._uplink: Link | None = None
        self._stopping = False
        self._subscribers: dict[int, set[Subscription]] = {}
        self._origin = secrets.token_hex(8)
        self._listener: Any = None
        self._supervisor: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._outbox: list[FolderChange] = []
        self._outbox_ready = asyncio.Event()
        self._channels: dict[str, Callable[[str], None]] = {}
        self._poster: asyncio.Task[None] | None = None
        self._posts: list[tuple[str, str]] = []
        self._posts_ready = asyncio.Event()
        self._overflow = 0
        self.posts_dropped = 0
        """Payloads :meth:`post` could not queue or send (for metrics, tests)."""
        self.reconnects = 0
        """How many times the listening connection was re-established (for metrics, tests)."""

    @property
    def crosses_processes(self) -> bool:
        """Whether other processes may share the store (PostgreSQL, or a SQLite
        hub or child): only then does :meth:`post` send anything or
        :meth:`listen` hear anything."""
        return self._postgres or self._hub or self._uplink_socket is not None

    @property
    def hub(self) -> bool:
        """Whether the other processes on this SQLite file link to this one (:meth:`attach`)."""
        return self._hub

    @property
    def reliable(self) -> bool:
        """Whether every committed change reaches this process's subscribers:
        always for a process alone on SQLite and for the hub; for a SQLite
        child while its link to the hub is up; on PostgreSQL while the LISTEN
        connection is up (after it comes back, every subscriber gets ``resync``)."""
        if self._postgres:
            return self._listener is not None and not self._listener.is_closed()
        if self._uplink_socket is not None:
            return self._uplink is not None and self._uplink.up
        return True

    def silence_proves_nothing_changed(self, last_read: float) -> bool:
        """Whether a subscriber that read the store at ``last_read``
        (``time.monotonic()``) and has been told nothing since may skip reading
        it again: always with one process, while the bus misses nothing
        (:attr:`reliable`), and with several processes for
        :data:`SILENCE_TRUST_SECONDS` at most."""
        if not self.reliable:
            return False
        return not self.crosses_processes or time.monotonic() - last_read < SILENCE_TRUST_SECONDS

    # -- subscribers -------------------------------------------------------------

    def subscribe(self, folder_id: int, *, deltas: bool = False) -> Subscription:
        """The folder's changes; with ``deltas``, also what each was
        (:meth:`Subscription.drain_deltas`)."""
        subscription = Subscription(self, folder_id, deltas=deltas)
        self._subscribers.setdefault(folder_id, set()).add(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        group = self._subscribers.get(subscription.folder_id)
        if group is not None:
            group.discard(subscription)
            if not group:
                del self._subscribers[subscription.folder_id]

    def publish_local(self, change: FolderChange) -> None:
        """Wake this process's subscribers on the folder (call after COMMIT)."""
        for subscription in tuple(self._subscribers.get(change.folder_id, ())):
            subscription.offer(change)

    async def publish(self, changes: Sequence[FolderChange]) -> None:
        """Local fan-out, then tell the other processes (call after COMMIT)."""
        for change in changes:
            self.publish_local(change)
            if self._links:
                self._send(CHANNEL, encode_payload(change, self._origin))
        if self._postgres and changes:
            await self._notify(changes)

    def notify(self, change: FolderChange) -> None:
        """Synchronous :meth:`publish`, for callbacks that cannot await
        (``MailStore(on_change=bus.notify)``): the local fan-out happens now;
        the NOTIFY is sent by a background task, with the changes of the next
        :data:`NOTIFY_LINGER` seconds, and frames at the end of this turn of the
        loop, together (only between ``start`` and ``stop``: before, the change
        stays in this process)."""
        self.publish_local(change)
        if self._links:
            self._send(CHANNEL, encode_payload(change, self._origin))
        elif self._postgres and self._sender is not None:
            self._outbox.append(change)
            self._outbox_ready.set()

    def notify_stored(self, results: Sequence[StoredMessage]) -> None:
        """For ``GroupCommitter(on_commit=bus.notify_stored)``."""
        for change in changes_from_stored(results):
            self.notify(change)

    async def _notify(self, changes: Sequence[FolderChange]) -> None:
        await self._pg_notify([(CHANNEL, encode_payload(c, self._origin)) for c in changes])

    async def _pg_notify(self, pairs: Sequence[tuple[str, str]]) -> None:
        """NOTIFY each (channel, payload), in one statement that is its own
        transaction: they are delivered when it returns."""
        parameters = {"channels": [c for c, _ in pairs], "payloads": [p for _, p in pairs]}
        await run_statements(self._engine, lambda conn: conn.execute(_NOTIFY, parameters))

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """On PostgreSQL, LISTEN before returning: changes published by other
        processes after ``start`` returns are heard; a SQLite child opens its
        link to the hub."""
        if self._uplink_socket is not None and self._uplink is None:
            self._uplink = await open_link("to mssd serve", self._uplink_socket, *self._handlers())
            self._links.add(self._uplink)
        if not self._postgres or self._supervisor is not None:
            return
        connection, lost = await self._connect()
        self._supervisor = asyncio.create_task(self._supervise(connection, lost), name="changes")
        self._sender = asyncio.create_task(self._send_outbox(), name="changes-notify")
        self._poster = asyncio.create_task(self._send_posts(), name="changes-post")

    async def stop(self) -> None:
        self._stopping = True
        for link in tuple(self._links):
            link.close()  # after what is queued
        await background.cancel(self._supervisor, self._sender, self._poster)
        self._supervisor = self._sender = self._poster = None
        if self._posts:
            posts, self._posts = self._posts, []
            await self._try_post(posts)
        if self._outbox:
            pending, self._outbox = self._outbox, []
            try:
                await self._notify(pending)
            except (OSError, SQLAlchemyError):
                log.warning("could not send %d change notifications at stop", len(pending))
        await self._close_listener()

    async def _close_listener(self) -> None:
        connection, self._listener = self._listener, None
        if connection is not None and not connection.is_closed():
            try:
                await asyncio.wait_for(connection.close(), _HEALTH_TIMEOUT)
            except (OSError, TimeoutError, asyncpg.PostgresError):
                connection.terminate()

    async def _connect(self) -> tuple[Any, asyncio.Event]:
        url = self._engine.url.set(drivername="postgresql")
        connection = await asyncpg.connect(
            url.render_as_string(hide_password=False),
            server_settings={"application_name": APPLICATION_NAME},
        )
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _: lost.set())
        await connection.add_listener(CHANNEL, self._on_notification)
        # Until no channel is missing: listen() may add one while this awaits,
        # seeing no live listener to add it to.
        heard: set[str] = set()
        while missing := self._channels.keys() - heard:
            for channel in missing:
                await connection.add_listener(channel, self._on_other_channel)
            heard |= missing
        self._listener = connection
        return connection, lost

    def _on_notification(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self._heard(payload)

    def _heard(self, payload: str) -> None:
        """A change another process published."""
        parts = payload.split(":", 4)
        if len(parts) >= 4 and parts[3] == self._origin:
            return  # this process's own change, delivered locally already: no delta to read
        if parts[0].isdigit() and int(parts[0]) not in self._subscribers:
            return  # nobody here reads the folder: no delta to read either
        decoded = decode_payload(payload)
        if decoded is None:
            log.warning("ignoring malformed change notification %r", payload)
            return
        self.publish_local(decoded[0])

    def _resync_all(self) -> None:
        for folder_id in tuple(self._subscribers):
            self.publish_local(FolderChange(folder_id, 0, "resync"))

    async def _supervise(self, connection: Any, lost: asyncio.Event) -> None:
        """Keep LISTEN alive: detect a dropped or silent connection, reconnect
        with backoff, then tell every subscriber to re-read its folder."""
        while True:
            await self._watch(connection, lost)
            log.warning("change notification connection lost; reconnecting")
            await self._close_listener()
            delay = _BACKOFF_FIRST
            while True:
                try:
                    connection, lost = await self._connect()
                    break
                except (OSError, asyncpg.PostgresError, TimeoutError) as error:
                    log.warning("change notifications: reconnect failed (%s)", error)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
            self.reconnects += 1
            # Notifications sent while we were away are gone: everyone re-checks.
            self._resync_all()

    async def _watch(self, connection: Any, lost: asyncio.Event) -> None:
        """Returns when the connection is gone (closed, or no answer to a ping)."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), _HEALTH_INTERVAL)
                return
            try:
                await asyncio.wait_for(connection.fetchval("SELECT 1"), _HEALTH_TIMEOUT)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                return

    async def _send_outbox(self) -> None:
        while True:
            await self._outbox_ready.wait()
            await asyncio.sleep(NOTIFY_LINGER)  # (stop() sends what is left)
            self._outbox_ready.clear()
            pending, self._outbox = self._outbox, []
            if not pending:
                continue
            try:
                await self._notify(pending)
            except (OSError, SQLAlchemyError) as error:
                # Local subscribers were woken already; other processes' sessions
                # will see the change at their next command or resync.
                log.warning("could not send %d change notifications (%s)", len(pending), error)

    # -- other channels ------------------------------------------------------------

    async def listen(self, channel: str, on_payload: Callable[[str], None]) -> None:
        """Call ``on_payload`` with every payload NOTIFYed on ``channel``,
        whichever process sent it (this one too), on the listening connection
        from now on and again after each reconnect (what was sent while the
        connection was down is lost); on SQLite, every payload another linked
        process posts on ``channel`` (not this one's)."""
        self._channels[channel] = on_payload
        listener = self._listener
        if listener is not None and not listener.is_closed():
            await listener.add_listener(channel, self._on_other_channel)

    def post(self, channel: str, payload: str) -> None:
        """Queue a NOTIFY of ``payload`` (under 8000 bytes) on ``channel`` for a
        background task that sends what accumulated in one transaction (or a
        frame to the linked processes: they hear it, this one does not). Never
        waits and never raises: a payload that cannot be sent is dropped with
        a warning. Only between ``start`` and ``stop``."""
        if self._links:
            self._send(channel, payload)
            return
        if not self._postgres or self._poster is None:
            return
        if len(self._posts) >= _MAX_POSTS:
            self._overflow += 1
            self.posts_dropped += 1
            return
        self._posts.append((channel, payload))
        self._posts_ready.set()

    def _on_other_channel(self, _connection: Any, _pid: int, channel: str, payload: str) -> None:
        on_payload = self._channels.get(channel)
        if on_payload is not None:
            on_payload(payload)

    async def _send_posts(self) -> None:
        while True:
            await self._posts_ready.wait()
            self._posts_ready.clear()
            posts, self._posts = self._posts, []
            if self._overflow:
                log.warning("dropped %d notifications: too many were waiting", self._overflow)
                self._overflow = 0
            if posts:
                await self._try_post(posts)

    async def _try_post(self, posts: list[tuple[str, str]]) -> None:
        try:
            await self._pg_notify(posts)
        except (OSError, SQLAlchemyError) as error:
            self.posts_dropped += len(posts)
            log.warning("could not send %d notifications (%s)", len(posts), error)

    # -- links between the processes of one SQLite file (mssd.store.change_links) --------

    async def attach(self, sock: socket.socket, name: str) -> Link:
        """The hub's link to a child over ``sock`` (its end of their socket
        pair); close it when the child has exited."""
        assert self._hub, "only the hub attaches links"
        link = await open_link(name, sock, *self._handlers())
        self._links.add(link)
        return link

    def _handlers(self) -> tuple[Callable[[Link, str, str, bytes], None], Callable[[Link], None]]:
        return self._on_frame, self._on_link_lost

    def _send(self, channel: str, payload: str) -> None:
        try:
            frame = encode_frame(channel, payload)
        except ValueError as error:
            self.posts_dropped += 1
            log.warning("could not send a notification (%s)", error)
            return
        for link in self._links:
            link.send(frame)

    def _on_frame(self, link: Link, channel: str, payload: str, frame: bytes) -> None:
        if self._hub:
            for other in self._links:
                if other is not link:
                    other.send(frame)
        if channel == CHANNEL:
            self._heard(payload)
        elif channel == RESET:
            log.warning("change link %s was reset: every folder is re-read", link.name)
            self._resync_all()
        elif (on_payload := self._channels.get(channel)) is not None:
            on_payload(payload)

    def _on_link_lost(self, link: Link) -> None:
        self._links.discard(link)
        if self._stopping:
            return
        if link is self._uplink:
            log.error("change link %s lost: sessions now re-read the store", link.name)
        else:
            # The child may have committed changes it did not get to send.
            for other in self._links:
                other.send(encode_frame(RESET, ""))
        self._resync_all()
