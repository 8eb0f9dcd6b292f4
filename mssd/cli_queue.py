"""``mssd queue`` (the outbound queue) and ``mssd dkim`` (signing keys) sub-commands.

Registered by ``mssd.cli.parser``; same conventions: one-line results, ``mssd: ...`` on
errors, exit status 1 for a refused change and 2 for bad input.
"""

from __future__ import annotations

import argparse
from typing import Any

from mssd.config import Settings


def _when(moment: Any) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else "-"


async def cmd_queue(settings: Settings, args: argparse.Namespace) -> None:
    from mssd.cli import actor, fail, with_engine
    from mssd.store import queue

    async def work(engine: Any) -> None:
        command = args.queue_command
        if command == "list":
            states = ("queued", "sending", "delivered", "failed") if args.all else queue.PENDING
            entries = await queue.list_entries(engine, states=states, limit=args.limit)
            counts = await queue.count_by_state(engine)
            print(
                "queue: "
                + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("queued", "sending", "failed"))
                + f", {counts.get('delivered', 0)} delivered"
            )
            for entry in entries:
                error = f"  {entry.last_error}" if entry.last_error else ""
                print(
                    f"{entry.id:>8} {entry.state:<9} {entry.attempts:>3} "
                    f"{_when(entry.next_attempt_at)} <{entry.mail_from}> -> <{entry.address}> "
                    f"{entry.size}B{error}"
                )
            return
        entry_id: int = args.id
        if command == "show":
            e = await queue.get_entry(engine, entry_id)
            if e is None:
                fail(f"no queue entry {entry_id}", 1)
            for label, value in (
                ("entry", e.id),
                ("envelope", e.envelope_id),
                ("from", f"<{e.mail_from}>"),
                ("to", f"<{e.address}>"),
                ("domain", e.domain),
                ("state", e.state),
                ("attempts", e.attempts),
                ("created", _when(e.created_at)),
                ("last attempt", _when(e.last_attempt_at)),
                ("next attempt", _when(e.next_attempt_at) if e.state in queue.PENDING else "-"),
                ("last error", e.last_error or "-"),
                ("remote MTA", e.remote_mta or "-"),
                ("size", f"{e.size} octets, sha256 {e.blob_sha256}"),
                (
                    "DSN",
                    f"NOTIFY={e.dsn_notify or '-'} ORCPT={e.dsn_orcpt or '-'} "
                    f"RET={e.dsn_ret or '-'} ENVID={e.dsn_envid or '-'}",
                ),
            ):
                print(f"{label + ':':<14}{value}")
            return
        if command == "retry":
            if not await queue.retry_now(engine, entry_id, actor=actor()):
                fail(f"no waiting or failed queue entry {entry_id}", 1)
            print(f"queue entry {entry_id} will be tried again now")
            return
        if not await queue.delete_entry(engine, entry_id, actor=actor()):
            fail(f"no queue entry {entry_id}", 1)
        print(f"queue entry {entry_id} deleted (no report sent to the sender)")

    await with_engine(settings, work)


async def cmd_dkim(settings: Settings, args: argparse.Namespace) -> None:
    from mssd.cli import check_domain
    from mssd.config import dkim_key_dir
    from mssd.delivery.dkim import generate_key

    domain = check_domain(args.domain)
    selector = args.selector or settings.dkim.selector
    key_file, record = generate_key(dkim_key_dir(settings), domain, selector, force=args.force)
    print(f"private key written to {key_file}")
    print("publish this DNS record:")
    print(f'{selector}._domainkey.{domain}. IN TXT "{record}"')


def add_parsers(sub: Any) -> None:
    """Add ``queue`` and ``dkim`` to the top-level sub-parsers of ``mssd``."""
    queue = sub.add_parser("queue", help="the outbound queue (mail for other operators)")
    qsub = queue.add_subparsers(dest="queue_command", required=True)
    listing = qsub.add_parser("list", help="waiting, in-flight and failed entries")
    listing.add_argument("--all", action="store_true", help="delivered entries too")
    listing.add_argument("--limit", type=int, default=100)
    for name, text in (
        ("show", "one entry in detail"),
        (
            "retry",
            "try a waiting or failed entry again now (once only if it is past "
            "relay.give_up_seconds: a new deferral fails it, with a new failure report)",
        ),
        ("delete", "remove an entry without sending it (no report)"),
    ):
        qsub.add_parser(name, help=text).add_argument("id", type=int)
    queue.set_defaults(run=cmd_queue)

    dkim = sub.add_parser("dkim", help="DKIM signing keys (RFC 6376)")
    dsub = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = dsub.add_parser("keygen", help="create a signing key and print its DNS record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", help="default: dkim.selector")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    dkim.set_defaults(run=cmd_dkim)
