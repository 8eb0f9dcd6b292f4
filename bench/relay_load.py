#!/usr/bin/env python3
"""Relay benchmark: messages per second relayed from one operator to another over mutual TLS.

Run on demand, never in the test suite (see bench/README.md)::

    .venv/bin/python bench/relay_load.py --backend sqlite --messages 5000 --size 4096 --runs 3

Two operators, A and B, each a real ``mssd serve`` with its own store (an SQLite file, or
a fresh PostgreSQL database ``mssd_bench_*`` dropped at the end), its own domain and its
own server certificate from a temporary development PKI; each whitelists the other and A
reaches B by a static route. For every run:

1. A starts with its relay worker off; ``--connections`` submission sessions (STARTTLS,
   AUTH PLAIN) put ``--messages`` messages of ``--size`` octets into A's outbound queue.
   A is stopped and its queue checked: exactly ``--messages`` entries waiting.
2. B starts, then A again with its relay on. The clock runs from A's first claim on the
   queue (the earliest ``last_attempt_at`` of its entries, each tried exactly once) to
   the arrival of the last message at B (the latest ``received_at`` of B's envelopes,
   which its commit follows within one group commit, a few milliseconds).
3. When B holds the messages and A has recorded every entry delivered, A is stopped with
   SIGTERM and its log line ``relay stopped: N TLS handshakes`` gives the handshakes.

A run is good only if B's INBOX holds exactly ``--messages`` placements (none lost, none
twice), A's queue has them all ``delivered`` after one attempt each, and neither log has
an ERROR or a traceback; otherwise the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import smtplib
import ssl
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smtp_load import (
    Server,
    add_pg_admin_url,
    add_run_options,
    bench_directory,
    check_counts,
    count_placements,
    cpu_seconds,
    fresh_store,
    message_body,
    mssd_env,
    print_rows,
    report,
    run_cli,
    run_each,
)

PASSWORD = "Bench-relay-password-1"


@dataclass(frozen=True)
class Operator:
    name: str
    domain: str
    structure: str
    cert: Path
    key: Path
    dn: str

    @property
    def host(self) -> str:
        return f"mx.{self.domain}"


@dataclass
class RunResult:
    run: int
    backend: str
    messages: int
    size: int
    delivered_at_b: int
    seconds: float
    """A's first claim to the last message received at B."""
    rate: float
    handshakes: int | None
    load_seconds: float
    """Submission of the messages to A (relay off), for information."""
    wall_seconds: float
    """From starting A with its relay on to B holding every message (A's start-up and the
    bench's polling included)."""
    cpu_ms_a: float | None = None
    cpu_ms_b: float | None = None
    errors: list[str] = field(default_factory=list)


# -- the trust space ---------------------------------------------------------------------


def issue_operator(env: dict[str, str], base: Path, pki_dir: Path, name: str) -> Operator:
    domain = f"{name.lower()}.bench.mssd.test"
    structure = {"A": "1750000051", "B": "1750000052"}[name]
    out = run_cli(
        env, base, "pki", "issue-server", "--dir", str(pki_dir), "--cn", f"mx.{domain}",
        "--structure", structure, "--organisation", f"Operateur bench {name}",
        "--name", f"relay-bench-{name.lower()}",
    )  # fmt: skip
    cert, key = re.search(r"certificate (\S+) key (\S+)", out).groups()  # type: ignore[union-attr]
    dn = re.search(r"^subject: (.+)$", out, re.M).group(1)  # type: ignore[union-attr]
    return Operator(name, domain, structure, Path(cert), Path(key), dn)


def write_whitelist(path: Path, operators: list[Operator]) -> Path:
    """Both operators in the ANS format (``listeblanchemssante.xml``)."""
    entries = "".join(
        f"<Domaine><Nom>{escape(o.domain)}</Nom><Description>bench</Description>"
        f"<DNCertificatOperateur>{escape(o.dn)}</DNCertificatOperateur></Domaine>"
        for o in operators
    )
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListeBlancheMSSante xmlns="https://listeblanche.mssante.fr/schema">'
        "<DateDeGeneration>2026-01-01T00:00:00Z</DateDeGeneration>"
        f"<ListeDomaines>{entries}</ListeDomaines></ListeBlancheMSSante>",
        encoding="utf-8",
    )
    return path


def operator_env(
    url: str, workdir: Path, pki_dir: Path, me: Operator, peer: Operator, mta_port: int,
    peer_port: int, whitelist: Path, *, relay: bool,
) -> dict[str, str]:  # fmt: skip
    env = mssd_env(url, workdir, pki_dir, plain=False)
    env.update(
        {
            "MSSD_SERVER_HOSTNAME": me.host,
            "MSSD_TLS_CERT_FILE": str(me.cert),
            "MSSD_TLS_KEY_FILE": str(me.key),
            # Port 25 as between operators: a client certificate from the organisation CA
            # whose DN the whitelist lists for the sender's domain.
            "MSSD_SMTP_MTA_LISTEN": f"127.0.0.1:{mta_port}",
            "MSSD_SMTP_MTA_REQUIRE_CLIENT_CERT": "true",
            "MSSD_TLS_OPERATOR_CA_FILE": str(pki_dir / "org-ca.pem"),
            "MSSD_WHITELIST_SOURCE": str(whitelist),
            "MSSD_RELAY_ENABLED": "true" if relay else "false",
            "MSSD_RELAY_ROUTES": f"{peer.domain}=127.0.0.1:{peer_port}",
            "MSSD_DKIM_VERIFY_INBOUND": "false",
            "MSSD_IMAP_IMAP_LISTEN": "127.0.0.1:0",
            "MSSD_IMAP_IMAPS_LISTEN": "127.0.0.1:0",
        }
    )
    return env


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def seed(url: str, domain: str, address: str, idnat: str, password: str | None) -> None:
    from mssd.auth.passwords import hash_password
    from mssd.config import AuthSettings
    from mssd.store import admin
    from mssd.store.engine import create_engine

    engine = create_engine(url)
    try:
        await admin.add_domain(engine, domain, actor="bench")
        await admin.create_mailbox(
            engine,
            address=address,
            bal_type="PER",
            owner_idnat=idnat,
            idnat_ps=idnat,
            password_hash=hash_password(password, AuthSettings()) if password else None,
            actor="bench",
        )
    finally:
        await engine.dispose()


# -- loading A's queue ---------------------------------------------------------------------


def message(index: int, sender: str, recipient: str, body: bytes) -> bytes:
    domain = sender.rpartition("@")[2]
    headers = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: relais {index}\r\n"
        f"Message-ID: <relais.{index}@{domain}>\r\n"
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    return headers.encode() + body


def load_queue(
    port: int, ca_file: Path, sender: str, recipient: str, messages: int, size: int,
    connections: int,
) -> list[str]:  # fmt: skip
    """Submit ``messages`` on 587 over ``connections`` sessions; returns the errors."""
    body = message_body(size)
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False  # the certificate names A's MX host, not 127.0.0.1

    def session(indices: range) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.starttls(context=context)
            client.login(sender, PASSWORD)
            for index in indices:
                data = message(index, sender, recipient, body)
                refused = client.sendmail(sender, [recipient], data)
                if refused:
                    raise RuntimeError(f"message {index} refused: {refused}")

    errors: list[str] = []
    with ThreadPoolExecutor(connections) as pool:
        shares = [range(n, messages, connections) for n in range(connections)]
        futures = [pool.submit(session, share) for share in shares]
        for future in futures:
            try:
                future.result()
            except Exception as error:  # reported: the run then fails
                errors.append(f"submission: {error!r}")
    return errors


# -- what the stores say --------------------------------------------------------------------


@dataclass(frozen=True)
class QueueState:
    by_state: dict[str, int]
    first_claim: dt.datetime | None
    max_attempts: int


async def queue_state(url: str) -> QueueState:
    from sqlalchemy import func, select

    from mssd.store import queue
    from mssd.store.engine import create_engine
    from mssd.store.schema import outbound_queue

    engine = create_engine(url)
    try:
        by_state = await queue.count_by_state(engine)
        async with engine.connect() as conn:
            first, attempts = (
                await conn.execute(
                    select(
                        func.min(outbound_queue.c.last_attempt_at),
                        func.max(outbound_queue.c.attempts),
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    return QueueState(by_state, aware(first) if first else None, int(attempts or 0))


async def last_arrival(url: str) -> dt.datetime | None:
    from sqlalchemy import func, select

    from mssd.store.engine import create_engine
    from mssd.store.schema import envelopes

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            value = await conn.scalar(select(func.max(envelopes.c.received_at)))
    finally:
        await engine.dispose()
    return aware(value) if value else None


def aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def log_problems(server: Server) -> list[str]:
    text = server.log.read_text(errors="replace")
    return [line for line in text.splitlines() if re.search(r"ERROR|Traceback", line)][:5]


def rename_log(server: Server, name: str) -> None:
    """Server writes ``mssd-serve.log`` in its workdir: keep each process's log apart."""
    server.log.rename(server.log.with_name(name))
    server.log = server.log.with_name(name)


# -- one run --------------------------------------------------------------------------------


def one_run(
    args: argparse.Namespace, number: int, base: Path, pki_dir: Path, ops: tuple[Operator, Operator]
) -> RunResult:
    op_a, op_b = ops
    workdir = base / f"run{number}"
    sender, recipient = f"expediteur@{op_a.domain}", f"destinataire@{op_b.domain}"
    whitelist = write_whitelist(base / "listeblanchemssante.xml", [op_a, op_b])
    errors: list[str] = []
    port_a, port_b = free_port(), free_port()
    with ExitStack() as stack:
        urls = []
        for name in ("a", "b"):
            (workdir / name).mkdir(parents=True)
            store = fresh_store(args.backend, workdir / name, args.pg_admin_url)
            urls.append(stack.enter_context(store))
        url_a, url_b = urls
        env_a = operator_env(url_a, workdir / "a", pki_dir, op_a, op_b, port_a, port_b, whitelist,
                             relay=False)  # fmt: skip
        env_b = operator_env(url_b, workdir / "b", pki_dir, op_b, op_a, port_b, port_a, whitelist,
                             relay=True)  # fmt: skip
        run_cli(env_a, workdir / "a", "db", "upgrade")
        run_cli(env_b, workdir / "b", "db", "upgrade")
        asyncio.run(seed(url_a, op_a.domain, sender, "810000000051", PASSWORD))
        asyncio.run(seed(url_b, op_b.domain, recipient, "810000000052", None))

        # 1. A's queue, filled with the relay off.
        a = Server(env_a, workdir / "a", args.serve_script)
        began = time.monotonic()
        try:
            errors += load_queue(a.ports["smtp_submission"], pki_dir / "ca-bundle.pem", sender,
                                 recipient, args.messages, args.size, args.connections)  # fmt: skip
            load_seconds = time.monotonic() - began
        finally:
            a.stop()
        rename_log(a, "mssd-load.log")
        errors += log_problems(a)
        queued = asyncio.run(queue_state(url_a)).by_state
        if queued != {"queued": args.messages}:
            errors.append(f"A's queue after loading: {queued}, expected {args.messages} queued")

        # 2. B up, then A with its relay on.
        b = Server(env_b, workdir / "b", args.serve_script)
        a = None
        delivered = 0
        try:
            cpu_b = cpu_seconds(b.process.pid)
            started = time.monotonic()
            a = Server(env_a | {"MSSD_RELAY_ENABLED": "true"}, workdir / "a", args.serve_script)
            cpu_a = cpu_seconds(a.process.pid)
            deadline = started + args.timeout
            while time.monotonic() < deadline:
                delivered = asyncio.run(count_placements(url_b, [recipient]))
                if delivered >= args.messages:
                    break
                time.sleep(0.25)
            wall = time.monotonic() - started
            if delivered < args.messages:
                errors.append(f"timed out: {delivered} of {args.messages} at B")
            state = asyncio.run(queue_state(url_a))
            while time.monotonic() < deadline and state.by_state.get("sending"):
                time.sleep(0.1)  # the last outcomes are being recorded
                state = asyncio.run(queue_state(url_a))
            cpu_a = cpu_seconds(a.process.pid) - cpu_a
            cpu_b = cpu_seconds(b.process.pid) - cpu_b
        finally:
            if a is not None:
                a.stop()
            b.stop()
        arrival = asyncio.run(last_arrival(url_b))
        delivered = asyncio.run(count_placements(url_b, [recipient]))
    handshakes = None
    if a is not None:
        errors += log_problems(a) + log_problems(b)
        found = re.search(r"relay stopped: (\d+) TLS handshakes", a.log.read_text(errors="replace"))
        if found is None:
            errors.append("A's log has no 'relay stopped' line (handshakes unknown)")
        else:
            handshakes = int(found.group(1))
    if delivered != args.messages:
        errors.append(f"B holds {delivered} messages, expected exactly {args.messages}")
    if state.by_state != {"delivered": args.messages}:
        errors.append(f"A's queue at the end: {state.by_state}")
    if state.max_attempts != 1:
        errors.append(f"some entry took {state.max_attempts} attempts (deferred once at least)")
    seconds = float("nan")
    if state.first_claim is not None and arrival is not None:
        seconds = (arrival - state.first_claim).total_seconds()
    return RunResult(
        run=number,
        backend=args.backend,
        messages=args.messages,
        size=args.size,
        delivered_at_b=delivered,
        seconds=seconds,
        rate=delivered / seconds if seconds > 0 else 0.0,
        handshakes=handshakes,
        load_seconds=load_seconds,
        wall_seconds=wall,
        cpu_ms_a=cpu_a * 1000 / delivered if delivered else None,
        cpu_ms_b=cpu_b * 1000 / delivered if delivered else None,
        errors=errors,
    )


def print_table(results: list[RunResult], summary: dict[str, object]) -> None:
    head = f"{'run':>6} {'backend':<10} {'at B':>11} {'seconds':>8} {'msg/s':>8} "
    head += f"{'handshakes':>10} {'wall s':>7} {'A cpu ms':>8} {'B cpu ms':>8} {'load s':>7}"
    rows = [
        (
            f"{r.run:>6} {r.backend:<10} {r.delivered_at_b:>5}/{r.messages:<5} {r.seconds:>8.2f} "
            f"{r.rate:>8.1f} {r.handshakes if r.handshakes is not None else '-':>10} "
            f"{r.wall_seconds:>7.2f} {r.cpu_ms_a or 0:>8.2f} {r.cpu_ms_b or 0:>8.2f} "
            f"{r.load_seconds:>7.1f}",
            r.errors,
        )
        for r in results
    ]
    print_rows(head, rows)
    print(f"{'median':>6} {results[0].backend:<10} {'':>11} {'':>8} {summary['rate']:>8.1f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=4096, help="body octets per message")
    p.add_argument("--connections", type=int, default=4,
                   help="submission sessions that load A's queue (default 4)")  # fmt: skip
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0, help="per-run relay time limit")
    add_pg_admin_url(p, "the bench databases")
    add_run_options(p)
    args = p.parse_args(argv)
    check_counts(p, args)
    return args


def progress_line(result: RunResult) -> str:
    return (
        f"run {result.run}: {result.delivered_at_b}/{result.messages} relayed in "
        f"{result.seconds:.2f} s = {result.rate:.1f} msg/s, "
        f"{result.handshakes} TLS handshake(s)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with bench_directory(args, "mssd-bench-relay-") as (base, pki_dir, env):
        ops = (issue_operator(env, base, pki_dir, "A"), issue_operator(env, base, pki_dir, "B"))
        results = run_each(args, lambda n: one_run(args, n, base, pki_dir, ops), progress_line)
    summary: dict[str, object] = {
        "backend": args.backend,
        "messages": args.messages,
        "size": args.size,
        "runs": len(results),
        "rate": statistics.median(r.rate for r in results) if results else 0.0,
        "handshakes": [r.handshakes for r in results],
        "ok": bool(results) and all(not r.errors for r in results),
    }
    return report(args, results, summary, print_table)


if __name__ == "__main__":
    sys.exit(main())
