"""The links that carry change notifications between the mssd processes of one
SQLite file (``imap.workers``): where PostgreSQL has LISTEN/NOTIFY, ``mssd
serve`` is a hub with one link per IMAP process it starts, a
``socket.socketpair()`` whose other end the child inherits (``mssd.workers``).
:class:`~mssd.store.changes.ChangeBus` decides what travels; this module only
moves frames.

A frame is a 4-octet big-endian length, then that many octets: a channel name
(ASCII, no NUL), a NUL, and the payload, in UTF-8, exactly as the bus would
NOTIFY it on that channel. A frame whose channel is empty is a *reset*: "frames
meant for you were lost; re-read everything".

Invariants:
- writing never blocks the event loop, and a link's memory is bounded: frames
  sent during one turn of the loop go out in one write; past
  :data:`BUFFER_LIMIT` octets that the peer has not read, frames to it are
  dropped (counted, logged) and a reset is owed, sent first once the peer has
  read enough (``resume_writing``). Nothing is dropped silently;
- a frame that is not well-formed ends the link (the peer is not an mssd of
  this version): the loss is then noticed as any lost link is.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import cast

log = logging.getLogger(__name__)

RESET = ""
"""The channel of a reset frame."""
MAX_FRAME = 65536
"""Octets after the length at most (payloads stay under 8000, as NOTIFY's)."""
BUFFER_LIMIT = 1 << 20
"""Octets written to a link and not yet read by its peer, at most."""
_LENGTH = struct.Struct("!I")


class FrameError(ValueError):
    """What the peer sent is not a frame."""


def encode_frame(channel: str, payload: str) -> bytes:
    body = channel.encode("ascii") + b"\0" + payload.encode("utf-8", "surrogatepass")
    if len(body) > MAX_FRAME or "\0" in channel:
        raise ValueError(f"cannot frame a payload of {len(body)} octets on {channel!r}")
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Frames out of a byte stream (no I/O: feed it what was read)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, str, bytes]]:
        """The frames completed by ``data``: (channel, payload, the whole frame)."""
        buffer = self._buffer
        buffer += data
        frames = []
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if length > MAX_FRAME:
                raise FrameError(f"frame of {length} octets")
            end = start + _LENGTH.size + length
            if end > len(buffer):
                break
            frame = bytes(buffer[start:end])
            channel, nul, payload = frame[_LENGTH.size :].partition(b"\0")
            if not nul:
                raise FrameError("frame without a channel")
            try:
                frames.append((channel.decode("ascii"), payload.decode("utf-8"), frame))
            except UnicodeDecodeError as error:
                raise FrameError(f"frame not in UTF-8: {error}") from None
            start = end
        del buffer[:start]
        return frames


OnFrame = Callable[["Link", str, str, bytes], None]
"""Called with the link, the channel, the payload and the whole frame (to forward)."""


class Link(asyncio.Protocol):
    """One end of a link to another mssd process."""

    def __init__(self, name: str, on_frame: OnFrame, on_lost: Callable[[Link], None]) -> None:
        self.name = name
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._reader = FrameReader()
        self._transport: asyncio.Transport | None = None
        self._queue: list[bytes] = []
        self._queued = 0
        self._paused = False
        self._owe_reset = False
        self._closing = False
        self.dropped = 0
        """Frames not sent because the peer was too far behind (for metrics, tests)."""
        self.resets_sent = 0

    @property
    def up(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    @property
    def buffered(self) -> int:
        """Octets written to the link that its socket has not taken yet."""
        queued = self._queued
        if self._transport is not None:
            queued += self._transport.get_write_buffer_size()
        return queued

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not subclasses of asyncio.Transport.)
        self._transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=BUFFER_LIMIT, low=BUFFER_LIMIT // 4)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except FrameError as error:
            log.error("change link %s: %s; closing it", self.name, error)
            assert self._transport is not None
            self._transport.abort()
            return
        for channel, payload, frame in frames:
            self._on_frame(self, channel, payload, frame)

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self._queue.clear()
        self._queued = 0
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._paused = True
        log.warning(
            "change link %s: the other process is %d octets behind; dropping its "
            "notifications until it catches up (it then re-reads everything)",
            self.name,
            BUFFER_LIMIT,
        )

    def resume_writing(self) -> None:
        self._paused = False
        if self._owe_reset and self._transport is not None:
            log.warning(
                "change link %s: %d notifications were dropped; sending a reset",
                self.name,
                self.dropped,
            )
            self._owe_reset = False
            self.resets_sent += 1
            self._transport.write(encode_frame(RESET, ""))

    # -- sending -----------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue ``frame``; everything queued in this turn of the loop goes out
        together, without waiting."""
        if self._transport is None or self._transport.is_closing():
            return  # lost: the peer notices and re-reads
        if self._paused or self._queued + len(frame) > BUFFER_LIMIT:
            self.dropped += 1
            self._owe_reset = True
            return
        if not self._queue:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queue.append(frame)
        self._queued += len(frame)

    def _flush(self) -> None:
        queue, self._queue, self._queued = self._queue, [], 0
        if self._transport is None or self._transport.is_closing():
            return
        if queue:
            self._transport.write(b"".join(queue))
        if self._owe_reset and not self._paused:
            # Frames were dropped in this turn alone (more than the limit at once).
            self.resume_writing()

    def close(self) -> None:
        """Send what is queued, then close (the peer sees the link end)."""
        self._flush()
        if self._transport is not None:
            self._transport.close()


async def open_link(
    name: str, sock: socket.socket, on_frame: OnFrame, on_lost: Callable[[Link], None]
) -> Link:
    """A link over ``sock`` (a connected Unix stream socket, which it takes over)."""
    sock.setblocking(False)
    _, link = await asyncio.get_running_loop().create_unix_connection(
        lambda: Link(name, on_frame, on_lost), sock=sock
    )
    return link
