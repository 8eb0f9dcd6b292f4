"""Change notifications between the processes of one SQLite file
(``mssd.store.change_links``): ``mssd serve``'s bus is the hub, each IMAP
worker's bus has a link to it. Here the buses of a hub and its children live
in one test process, linked by real socket pairs; the same links between real
processes are in ``test_imap_workers.py``."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.auth.ratelimit import CHANNEL as FAILURES
from mssd.store.change_links import (
    BUFFER_LIMIT,
    MAX_FRAME,
    RESET,
    FrameError,
    FrameReader,
    Link,
    encode_frame,
)
from mssd.store.changes import (
    CHANNEL,
    SILENCE_TRUST_SECONDS,
    ChangeBus,
    FlagState,
    FolderChange,
    FolderDelta,
    decode_payload,
)
from mssd.store.engine import create_engine, dispose


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'mssd.db'}")
    yield engine
    await dispose(engine)


@dataclass
class Family:
    hub: ChangeBus
    children: list[ChangeBus]
    links: list[Link]
    """The hub's link to each child."""


@pytest.fixture
async def family(engine: AsyncEngine) -> AsyncIterator[Family]:
    """``mssd serve``'s bus and two workers' buses, linked as ``mssd.workers`` links them."""
    hub = ChangeBus(engine, hub=True)
    await hub.start()
    children, links = [], []
    for number in (1, 2):
        ours, theirs = socket.socketpair()
        links.append(await hub.attach(ours, f"to worker {number}"))
        child = ChangeBus(engine, uplink=theirs)
        await child.start()
        children.append(child)
    yield Family(hub, children, links)
    for bus in (*children, hub):
        await bus.stop()


async def eventually(predicate: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def heard(subscription: Awaitable[FolderChange]) -> FolderChange:
    return await asyncio.wait_for(subscription, 1)


async def test_a_childs_change_reaches_the_hub_and_the_other_child_with_its_delta(
    family: Family,
) -> None:
    (first, second), hub = family.children, family.hub
    delta = FolderDelta(10, (FlagState(7, frozenset({"\\Seen"}), 11),), (3,))
    with (
        hub.subscribe(42) as at_hub,
        first.subscribe(42) as at_first,
        second.subscribe(42) as at_second,
    ):
        first.notify(FolderChange(42, 11, "flags", delta))
        for subscription in (at_hub, at_second):
            change = await heard(subscription.get())
            assert change == FolderChange(42, 11, "flags") and change.delta == delta
        # The sender's own subscribers hear it once (locally), not back from the hub.
        assert await heard(at_first.get()) == FolderChange(42, 11, "flags")
        await asyncio.sleep(0.1)
        assert at_first.pending() == 0

        # The hub's own changes (deliveries, in mssd serve) reach every child.
        await hub.publish([FolderChange(42, 12, "exists")])
        for subscription in (at_first, at_second):
            assert await heard(subscription.get()) == FolderChange(42, 12, "exists")


async def test_other_channels_travel_to_every_other_process(family: Family) -> None:
    (first, second), hub = family.children, family.hub
    received: dict[str, list[str]] = {"hub": [], "first": [], "second": []}
    for name, bus in (("hub", hub), ("first", first), ("second", second)):
        await bus.listen(FAILURES, received[name].append)
    first.post(FAILURES, "origin:0:failure:a:b")
    hub.post(FAILURES, "origin:1:reset:b")
    await eventually(lambda: len(received["second"]) == 2)
    await asyncio.sleep(0.1)
    assert received["hub"] == ["origin:0:failure:a:b"]
    assert received["first"] == ["origin:1:reset:b"]  # not its own
    assert sorted(received["second"]) == ["origin:0:failure:a:b", "origin:1:reset:b"]


async def test_with_several_processes_silence_is_trusted_for_a_moment_only(
    family: Family, engine: AsyncEngine
) -> None:
    alone = ChangeBus(engine)
    assert not alone.crosses_processes
    assert alone.silence_proves_nothing_changed(time.monotonic() - 3600)
    for bus in (family.hub, *family.children):
        assert bus.crosses_processes and bus.reliable
        assert bus.silence_proves_nothing_changed(time.monotonic())
        assert not bus.silence_proves_nothing_changed(time.monotonic() - SILENCE_TRUST_SECONDS)


async def test_a_child_whose_link_closes_rereads_everything_and_trusts_no_silence(
    family: Family,
) -> None:
    child = family.children[0]
    with child.subscribe(5) as subscription:
        family.links[0].close()
        assert await heard(subscription.get()) == FolderChange(5, 0, "resync")
        assert not child.reliable
        assert not child.silence_proves_nothing_changed(time.monotonic())


async def test_when_a_childs_link_closes_the_others_reread_everything(family: Family) -> None:
    """The child may have committed changes it did not get to send."""
    (first, second), hub = family.children, family.hub
    with hub.subscribe(5) as at_hub, second.subscribe(6) as at_second:
        await first.stop()
        assert await heard(at_hub.get()) == FolderChange(5, 0, "resync")
        assert await heard(at_second.get()) == FolderChange(6, 0, "resync")
        assert second.reliable


def big_change(modseq: int) -> FolderChange:
    """A change whose payload is near the largest a frame carries."""
    rows = tuple(FlagState(uid, frozenset({"\\Seen"}), modseq) for uid in range(1, 400))
    return FolderChange(9, modseq, "flags", FolderDelta(modseq - 1, rows))


async def test_a_worker_too_far_behind_gets_a_reset_and_the_hub_never_waits_for_it(
    engine: AsyncEngine,
) -> None:
    hub = ChangeBus(engine, hub=True)
    behind, worker = socket.socketpair()  # `worker`: a process that reads nothing
    link = await hub.attach(behind, "to a stuck worker")
    try:
        started = time.monotonic()
        modseq = 1
        while link.dropped == 0:
            modseq += 1
            hub.notify(big_change(modseq))
            await asyncio.sleep(0)  # the frames of this turn go out
        assert time.monotonic() - started < 5
        assert link.buffered <= BUFFER_LIMIT + MAX_FRAME
        for _ in range(20):
            hub.notify(big_change(modseq := modseq + 1))
            await asyncio.sleep(0)
        assert link.dropped == 21

        # The worker reads again: what was written arrives whole and in order,
        # then a reset, then what was published after the worker caught up.
        worker.setblocking(False)
        loop = asyncio.get_running_loop()
        reader = FrameReader()
        frames: list[tuple[str, str]] = []
        caught_up = False
        while not frames or frames[-1][0] != CHANNEL or not caught_up:
            data = await asyncio.wait_for(loop.sock_recv(worker, 1 << 16), 2)
            frames += [(channel, payload) for channel, payload, _ in reader.feed(data)]
            if frames and frames[-1][0] == RESET and not caught_up:
                caught_up = True
                hub.notify(FolderChange(9, 10**6, "exists"))
        channels = [channel for channel, _ in frames]
        assert channels == [CHANNEL] * (len(frames) - 2) + [RESET, CHANNEL]
        modseqs = [decode_payload(payload)[0].modseq for _, payload in frames if payload]  # type: ignore[index]
        assert modseqs == [*range(2, len(frames)), 10**6]
        assert link.resets_sent == 1
    finally:
        worker.close()
        await hub.stop()


async def test_frames_the_hub_could_not_read_in_time_make_everyone_reread(
    family: Family,
) -> None:
    (first, second), hub = family.children, family.hub
    stuck = family.links[0]._transport
    assert stuck is not None
    stuck.pause_reading()  # mssd serve does not read what the first worker sends
    with hub.subscribe(9) as at_hub, second.subscribe(9) as at_second:
        uplink = first._uplink
        assert uplink is not None
        modseq = 1
        while uplink.dropped == 0:
            modseq += 1
            first.notify(big_change(modseq))
            await asyncio.sleep(0)
        stuck.resume_reading()
        for subscription in (at_hub, at_second):
            await eventually(lambda s=subscription: FolderChange(9, 0, "resync") in s.peek(), 5)
        assert uplink.resets_sent == 1


def test_frames_are_read_whole_however_the_stream_is_cut() -> None:
    frames = [
        encode_frame(CHANNEL, "1:2:exists:abc"),
        encode_frame(RESET, ""),
        encode_frame("x", "é"),
    ]
    stream = b"".join(frames)
    reader = FrameReader()
    got = []
    for octet in range(len(stream)):
        got += reader.feed(stream[octet : octet + 1])
    assert got == [
        (CHANNEL, "1:2:exists:abc", frames[0]),
        (RESET, "", frames[1]),
        ("x", "é", frames[2]),
    ]
    with pytest.raises(FrameError):
        FrameReader().feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        FrameReader().feed(b"\0\0\0\3abc")
    with pytest.raises(ValueError):
        encode_frame(CHANNEL, "x" * MAX_FRAME)
