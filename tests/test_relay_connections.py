"""The relay's connections to other operators: ``relay.max_connections`` and
``relay.max_connections_per_peer`` bound the connections open at once (not only the TLS
handshakes), and a slow peer answering RSET on a reused connection holds up no one else.
Real relay, real store on SQLite and PostgreSQL, scripted peers on loopback sockets."""

from __future__ import annotations

import asyncio

from conftest import PkiBundle
from scripted_peer import Gauge, PeerIdentity, ScriptedPeer, relay_for


async def test_max_connections_bounds_open_connections_not_handshakes(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    gauge = Gauge()
    first = await ScriptedPeer(peer_identity.context, gauge=gauge).start()
    second = await ScriptedPeer(peer_identity.context, gauge=gauge).start()
    routes = {"un.mssd.test": first, "deux.mssd.test": second}
    async with relay_for(
        store_url, test_pki, routes, peer_identity,
        max_connections=1, idle_connection_seconds=30,
    ) as relay:  # fmt: skip
        for domain in routes:
            await relay.queue([f"confrere@{domain}"])
        await relay.run_once()
        entries = await relay.entries()
        assert {e.state for e in entries.values()} == {"delivered"}
        assert len(first.received) == len(second.received) == 1
        # Each peer got its message, never both connections at once: the idle connection
        # to one peer was closed (QUIT) to make room for the other.
        assert gauge.most == 1
        assert first.commands[-1] == "QUIT" or second.commands[-1] == "QUIT"


async def test_a_slow_rset_on_a_reused_connection_holds_up_no_other_delivery(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    second_connection = asyncio.Event()
    rset_waited_for_nothing: list[bool] = []

    async def script(command: str) -> str | None:
        if command.startswith("EHLO") and peer.sessions == 2:
            second_connection.set()
        if command == "RSET" and not rset_waited_for_nothing:
            # Answer only once another connection has started (or after 3 s): a relay
            # that sends RSET while holding up the others never opens the second one.
            try:
                await asyncio.wait_for(second_connection.wait(), 3)
                rset_waited_for_nothing.append(True)
            except TimeoutError:
                rset_waited_for_nothing.append(False)
        return None

    peer = await ScriptedPeer(peer_identity.context, script=script).start()
    routes = {"un.mssd.test": peer, "deux.mssd.test": peer}
    async with relay_for(
        store_url, test_pki, routes, peer_identity,
        max_connections_per_peer=2, idle_connection_seconds=30,
    ) as relay:  # fmt: skip
        await relay.queue(["premier@un.mssd.test"])
        await relay.run_once()  # leaves one idle connection to the peer
        await relay.queue(["second@un.mssd.test"])
        await relay.queue(["troisieme@deux.mssd.test"])
        await relay.run_once()
        entries = await relay.entries()
        assert {e.state for e in entries.values()} == {"delivered"}
        assert len(peer.received) == 3 and peer.sessions == 2
        assert rset_waited_for_nothing == [True]


async def test_one_domain_is_spread_over_max_connections_per_peer(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    async def script(command: str) -> str | None:
        if command == ".":
            await asyncio.sleep(0.1)  # a peer that takes its time over each message
        return None

    peer = await ScriptedPeer(peer_identity.context, script=script).start()
    async with relay_for(
        store_url, test_pki, {"un.mssd.test": peer}, peer_identity,
        max_connections_per_peer=3,
    ) as relay:  # fmt: skip
        for n in range(12):
            await relay.queue([f"patient{n}@un.mssd.test"])
        await relay.run_once()
        entries = await relay.entries()
        assert [e.state for e in entries.values()] == ["delivered"] * 12
    # Every message once, over three connections open together.
    assert sorted(r.recipients[0].split()[1] for r in peer.received) == sorted(
        f"TO:<patient{n}@un.mssd.test>" for n in range(12)
    )
    assert peer.sessions == 3 and peer.gauge.most == 3
