"""What the relay does when the store refuses to record: it stops sending rather than
hand over messages whose outcomes it cannot keep. The store's refusal is real (a trigger
that makes the database raise, ``store_faults.py``). SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

from conftest import PkiBundle
from scripted_peer import (
    PeerIdentity,
    ScriptedPeer,
    message,
    relay_for,
    report_fields,
)
from store_faults import allow, refuse

DOMAIN = "pair.mssd.test"


async def test_when_outcomes_cannot_be_recorded_the_relay_stops_sending(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    async def script(command: str) -> str | None:
        if command == ".":
            await asyncio.sleep(0.2)  # meanwhile the first outcome fails to be recorded
        return None

    peer = await ScriptedPeer(peer_identity.context, script=script).start()
    # One connection, so that what "already on its way" means is one message.
    async with relay_for(
        store_url,
        test_pki,
        {DOMAIN: peer},
        peer_identity,
        max_connections_per_peer=1,
    ) as relay:
        for n in range(10):
            await relay.queue([f"patient{n}@{DOMAIN}"], message(f"m{n}"))
        await refuse(relay.url, "refuse_outcome", "outbound_queue", "UPDATE",
                     "NEW.state = 'delivered'")  # fmt: skip
        await relay.run_once()
        entries = list((await relay.entries()).values())
        sent = len(peer.received)
        # The first message, and at most the one already on its way when the store
        # refused, reach the peer; then sending stops.
        assert 1 <= sent <= 2
        # What the peer may hold keeps its claim until the lease ends (as after a crash);
        # the rest is due again at once, this attempt not counted.
        assert sorted(e.state for e in entries) == ["queued"] * (10 - sent) + ["sending"] * sent
        assert all(e.attempts == 0 for e in entries if e.state == "queued")


async def test_a_failure_is_never_recorded_without_its_report(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    def script(command: str) -> str | None:
        return "550 5.1.1 no such user here" if command.startswith("RCPT") else None

    peer = await ScriptedPeer(peer_identity.context, script=script).start()
    async with relay_for(
        store_url, test_pki, {DOMAIN: peer}, peer_identity, lease_seconds=3
    ) as relay:
        await relay.queue([f"inconnu@{DOMAIN}"], message("refus"), envid="ENV-42")
        # Reports have the null sender (RFC 3461 §6.2): the store refuses to write them.
        await refuse(relay.url, "refuse_report", "envelopes", "INSERT", "NEW.mail_from = ''")
        await relay.run_once()
        [entry] = (await relay.entries()).values()
        # The failure could not be written with its report, so it was not written at
        # all: the entry comes back when its lease ends.
        assert entry.state == "sending" and await relay.reports() == []
        await allow(relay.url, "refuse_report", "envelopes")
        await asyncio.sleep(3.1)
        await relay.run_once()
        [entry] = (await relay.entries()).values()
        assert entry.state == "failed"
        assert entry.last_error == "127.0.0.1 said: 550 5.1.1 no such user here"
        [report] = await relay.reports()
        about, recipient = report_fields(report)
        assert about["Original-Envelope-Id"] == "ENV-42"
        assert (recipient["Final-Recipient"], recipient["Action"], recipient["Status"]) == (
            f"rfc822; inconnu@{DOMAIN}",
            "failed",
            "5.1.1",
        )
        assert recipient["Diagnostic-Code"] == "smtp; 127.0.0.1 said: 550 5.1.1 no such user here"
