"""The relay's connections to other operators: bounded per peer and in total, reused.

A connection holds a *slot* from the moment it is decided (before connecting) until it
is closed (after QUIT), so ``relay.max_connections`` and
``relay.max_connections_per_peer`` bound open connections, handshakes and idle ones
included. A task that needs a slot when every slot is taken waits; when the only free
room is held by an idle connection to another peer, that connection is closed to make
room (an idle connection must not starve a busy peer).

Invariants:
- The bookkeeping is synchronous (no ``await`` between reading the counts and changing
  them), so it needs no lock and no network I/O can ever hold up another task: RSET
  before reuse, connecting and QUIT happen between bookkeeping steps, never inside one.
- Every slot given back wakes the waiters (one place: :meth:`ConnectionPool._release`).
- What a connection is used for (which domain, whether its certificate is acceptable)
  is the relay's business; this module only counts, keeps and closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mssd.smtp.client import SmtpClient
from mssd.smtp.routes import Peer


@dataclass
class _PeerSlots:
    open: int = 0
    """Slots held for this peer: connecting, in use, idle or closing."""
    idle: list[tuple[SmtpClient, float]] = field(default_factory=list)
    """Connections ready for reuse, with the moment they became idle."""


class ConnectionPool:
    def __init__(self, *, total: int, per_peer: int, keep_idle_seconds: float) -> None:
        self._total = total
        self._per_peer = per_peer
        self._keep_idle = keep_idle_seconds
        self._peers: dict[Peer, _PeerSlots] = {}
        self._open = 0
        self._evicting = 0
        self._changed = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> int:
        return self._open

    async def take(self, peer: Peer, connect: Callable[[], Awaitable[SmtpClient]]) -> SmtpClient:
        """A live connection to ``peer``: an idle one that answers RSET, else a new one
        from ``connect`` (whose failure gives the slot back and propagates)."""
        while True:
            client = await self._reserve(peer)
            try:
                if client is None:
                    return await connect()
                # RFC 5321 §4.1.1.5: a clean state for the next transaction; the reply
                # also proves that the peer did not drop the idle connection meanwhile.
                if await client.rset():
                    return client
            except BaseException:
                if client is not None:
                    client.close()
                self._release(peer)
                raise
            client.close()
            self._release(peer)

    async def give_back(self, peer: Peer, client: SmtpClient, *, reusable: bool) -> None:
        """Keep ``client`` for reuse, or close it (QUIT when it is still usable)."""
        if reusable and self._keep_idle > 0:
            self._slots(peer).idle.append((client, time.monotonic()))
            self._wake()
            return
        await self.discard(peer, client, polite=reusable)

    async def discard(self, peer: Peer, client: SmtpClient, *, polite: bool = False) -> None:
        """Close a connection taken from the pool and give its slot back."""
        try:
            if polite:
                await client.quit()
            else:
                client.close()
        finally:
            self._release(peer)

    def close_idle(self, *, all_of_them: bool = False) -> None:
        """Close the connections idle for longer than ``relay.idle_connection_seconds``
        (every idle one with ``all_of_them``); QUIT runs in the background."""
        limit = time.monotonic() - self._keep_idle
        for peer, slots in self._peers.items():
            stale = [c for c, since in slots.idle if all_of_them or since < limit]
            if stale:
                slots.idle = [(c, s) for c, s in slots.idle if c not in stale]
                for client in stale:
                    self._quit_later(peer, client)

    async def close(self) -> None:
        """Close every idle connection and wait until they are closed."""
        self.close_idle(all_of_them=True)
        await asyncio.gather(*self._closing, return_exceptions=True)

    # -- bookkeeping (synchronous between awaits) ---------------------------------------------

    def _slots(self, peer: Peer) -> _PeerSlots:
        return self._peers.setdefault(peer, _PeerSlots())

    async def _reserve(self, peer: Peer) -> SmtpClient | None:
        """An idle connection to ``peer``, or None when a new slot was reserved for it."""
        while True:
            slots = self._slots(peer)
            if slots.idle:
                return slots.idle.pop()[0]
            if slots.open < self._per_peer:
                if self._open < self._total:
                    slots.open += 1
                    self._open += 1
                    return None
                if not self._evicting:
                    self._evict_one(peer)
            await self._changed.wait()

    def _evict_one(self, needed_by: Peer) -> None:
        """Close the longest-idle connection to another peer to make room (its slot is
        released once QUIT is done, which wakes the waiters)."""
        candidates = [
            (since, peer, client)
            for peer, slots in self._peers.items()
            if peer != needed_by
            for client, since in slots.idle
        ]
        if not candidates:
            return
        _, peer, client = min(candidates, key=lambda c: c[0])
        slots = self._peers[peer]
        slots.idle = [(c, s) for c, s in slots.idle if c is not client]
        self._evicting += 1
        self._quit_later(peer, client, evicted=True)

    def _quit_later(self, peer: Peer, client: SmtpClient, *, evicted: bool = False) -> None:
        async def close() -> None:
            try:
                await client.quit()
            finally:
                if evicted:
                    self._evicting -= 1
                self._release(peer)

        task = asyncio.create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _release(self, peer: Peer) -> None:
        self._slots(peer).open -= 1
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        """Every waiter looks again (each waits on the event current when it looked)."""
        self._changed.set()
        self._changed = asyncio.Event()
