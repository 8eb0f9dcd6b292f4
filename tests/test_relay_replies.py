"""How the relay judges a peer's replies (RFC 5321 §4.2, §6.1; RFC 3461, RFC 3464): for
each scripted answer (4xx or 5xx at MAIL, at RCPT for some recipients, at DATA, after
the data, multi-line, a connection closed in the middle, a peer that never answers),
the queue entry's resulting state and the report the sender finds in its INBOX.
Real relay and store on SQLite and PostgreSQL; the peer is a scripted SMTP server on a
loopback socket (``scripted_peer.py``)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from conftest import PkiBundle
from scripted_peer import (
    CLOSE,
    DEFAULT_EXTENSIONS,
    SILENT,
    PeerIdentity,
    Relay,
    Script,
    ScriptedPeer,
    message,
    relay_for,
    report_fields,
)

from mssd.store.queue import QueueEntry

DOMAIN = "pair.mssd.test"
A, B, C = (f"{name}@{DOMAIN}" for name in ("alice", "bruno", "chloe"))


def answer(replies: dict[str, str]) -> Script:
    """Reply ``replies[prefix]`` to a command starting with that prefix (``"."``: the end
    of the data); the usual reply otherwise."""

    def script(command: str) -> str | None:
        return next((r for prefix, r in replies.items() if command.startswith(prefix)), None)

    return script


async def attempt(
    store_url: str,
    test_pki: PkiBundle,
    peer_identity: PeerIdentity,
    script: Script,
    recipients: list[str | tuple[str, str | None]],
    *,
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    **relay_settings: object,
) -> tuple[Relay, ScriptedPeer, dict[str, QueueEntry], list[dict[str, str]]]:
    """One relay attempt of one message to the scripted peer: the entries by address, and
    the per-recipient blocks of the reports the sender got (in report order)."""
    peer = await ScriptedPeer(peer_identity.context, extensions=extensions, script=script).start()
    async with relay_for(
        store_url, test_pki, {DOMAIN: peer}, peer_identity, **relay_settings
    ) as relay:
        await relay.queue(recipients, message("essai"), envid="ENV-1")
        if relay.settings.relay.delay_report_seconds <= 1:
            await asyncio.sleep(1.1)  # the message has waited long enough for a delay report
        await relay.run_once()
        entries = await relay.entries()
        reports = [block for r in await relay.reports() for block in report_fields(r)[1:]]
    return relay, peer, entries, reports


def assert_deferred(entries: dict[str, QueueEntry], addresses: list[str], reason: str) -> None:
    """Each entry waits for a later attempt (not before the backoff), saying why."""
    for address in addresses:
        entry = entries[address]
        assert (entry.state, entry.last_error, entry.attempts) == ("queued", reason, 1)
        assert entry.next_attempt_at > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)


async def test_4xx_at_mail_defers_every_recipient_without_a_report(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    script = answer({"MAIL": "451 4.3.0 try again later"})
    _, peer, entries, reports = await attempt(store_url, test_pki, peer_identity, script, [A, B])
    assert_deferred(entries, [A, B], "127.0.0.1 said: 451 4.3.0 try again later")
    assert reports == [] and peer.received == []


async def test_a_long_deferral_sends_one_delay_report(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    script = answer({"MAIL": "421 4.3.2 shutting down"})
    _, _, entries, reports = await attempt(
        store_url, test_pki, peer_identity, script, [(A, "DELAY,FAILURE")], delay_report_seconds=1
    )
    assert entries[A].state == "queued" and entries[A].delay_reported
    [delayed] = reports
    assert (delayed["Action"], delayed["Status"]) == ("delayed", "4.3.2")
    assert delayed["Diagnostic-Code"] == "smtp; 127.0.0.1 said: 421 4.3.2 shutting down"
    assert "Will-Retry-Until" in delayed


async def test_5xx_at_mail_fails_every_recipient_with_one_report(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    script = answer({"MAIL": "553 5.7.1 sender refused"})
    _, peer, entries, reports = await attempt(store_url, test_pki, peer_identity, script, [A, B])
    assert {a: e.state for a, e in entries.items()} == {A: "failed", B: "failed"}
    assert [(r["Final-Recipient"], r["Action"], r["Status"]) for r in reports] == [
        (f"rfc822; {A}", "failed", "5.7.1"),
        (f"rfc822; {B}", "failed", "5.7.1"),
    ]
    assert reports[0]["Remote-MTA"] == "dns; 127.0.0.1" and peer.received == []


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_each_recipient_is_judged_by_its_own_rcpt_reply(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity, pipelining: bool
) -> None:
    script = answer(
        {f"RCPT TO:<{B}>": "550 5.1.1 no such user", f"RCPT TO:<{C}>": "452 4.2.2 full"}
    )
    extensions = tuple(e for e in DEFAULT_EXTENSIONS if pipelining or e != "PIPELINING")
    _, peer, entries, reports = await attempt(
        store_url, test_pki, peer_identity, script, [(A, "SUCCESS"), B, C], extensions=extensions
    )
    assert {a: e.state for a, e in entries.items()} == {
        A: "delivered", B: "failed", C: "queued",
    }  # fmt: skip
    assert entries[A].last_error == "250 2.0.0 accepted"
    # The message went once, to the one recipient accepted.
    [received] = peer.received
    assert [r.split(" ")[1] for r in received.recipients] == [f"TO:<{A}>"]
    # One failure report (the peer offers DSN: success is its own to report).
    [failed] = reports
    assert (failed["Final-Recipient"], failed["Status"]) == (f"rfc822; {B}", "5.1.1")
    assert failed["Diagnostic-Code"] == "smtp; 127.0.0.1 said: 550 5.1.1 no such user"


async def test_a_refused_data_command_fails_the_recipients_it_accepted(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    script = answer({"DATA": "554 5.3.4 message too big for this system"})
    _, peer, entries, reports = await attempt(store_url, test_pki, peer_identity, script, [A])
    assert entries[A].state == "failed" and peer.received == []
    [failed] = reports
    assert (failed["Action"], failed["Status"]) == ("failed", "5.3.4")


async def test_a_4xx_after_the_data_defers(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    script = answer({".": "452 4.3.1 insufficient system storage"})
    _, _, entries, reports = await attempt(store_url, test_pki, peer_identity, script, [A, B])
    assert_deferred(entries, [A, B], "127.0.0.1 said: 452 4.3.1 insufficient system storage")
    assert reports == []


async def test_a_multi_line_reply_is_kept_whole_and_its_code_read_from_the_first_line(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    script = answer({"RCPT": "550-5.7.1 this mailbox is closed\n550-see our site\n550 5.7.1 bye"})
    _, _, entries, reports = await attempt(store_url, test_pki, peer_identity, script, [A])
    text = "127.0.0.1 said: 550 5.7.1 this mailbox is closed / see our site / 5.7.1 bye"
    assert (entries[A].state, entries[A].last_error) == ("failed", text)
    [failed] = reports
    assert (failed["Status"], failed["Diagnostic-Code"]) == ("5.7.1", f"smtp; {text}")


async def test_a_reply_without_an_enhanced_code_gets_the_generic_one(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    script = answer({"RCPT": "550 unknown user"})
    _, _, entries, reports = await attempt(store_url, test_pki, peer_identity, script, [A])
    assert entries[A].state == "failed"
    assert reports[0]["Status"] == "5.0.0"  # RFC 3463 §3.1: the class, nothing more known


@pytest.mark.parametrize("when", ["DATA", "."], ids=["at-data", "after-the-data"])
async def test_a_connection_closed_mid_transaction_defers_without_a_report(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity, when: str
) -> None:
    _, peer, entries, reports = await attempt(
        store_url, test_pki, peer_identity, answer({when: CLOSE}), [A, B]
    )
    assert_deferred(entries, [A, B], f"127.0.0.1:{peer.port} closed the connection")
    assert reports == [] and peer.received == []


async def test_a_peer_that_never_answers_is_given_up_on_after_the_timeout(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    _, peer, entries, reports = await attempt(
        store_url, test_pki, peer_identity, answer({"MAIL": SILENT}), [A],
        command_timeout_seconds=1,
    )  # fmt: skip
    assert_deferred(entries, [A], f"127.0.0.1:{peer.port}: no reply within 1s")
    assert reports == []


async def test_a_peer_without_dsn_gets_no_dsn_parameters_and_success_is_reported_relayed(
    store_url: str, test_pki: PkiBundle, peer_identity: PeerIdentity
) -> None:
    extensions = tuple(e for e in DEFAULT_EXTENSIONS if e != "DSN")
    _, peer, entries, reports = await attempt(
        store_url, test_pki, peer_identity, answer({}), [(A, "SUCCESS")], extensions=extensions
    )
    assert entries[A].state == "delivered"
    [received] = peer.received
    assert "ENVID" not in received.mail and received.recipients == (f"RCPT TO:<{A}>",)
    # RFC 3461 §5.2.2: the peer cannot report the success, so we say it was relayed.
    [relayed] = reports
    assert (relayed["Action"], relayed["Status"]) == ("relayed", "2.0.0")
