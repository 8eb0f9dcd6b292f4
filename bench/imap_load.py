#!/usr/bin/env python3
"""IMAP load benchmark: commands per second, latency per command and idle memory of
``mssd serve``.

Run on demand, never in the test suite (see bench/README.md)::

    .venv/bin/python bench/imap_load.py --backend sqlite --clients 10 --messages 10000 \\
        --mode persistent --duration 30 --runs 3
    .venv/bin/python bench/imap_load.py --backend postgresql --clients 50 \\
        --mode login-per-session --runs 3
    .venv/bin/python bench/imap_load.py --backend sqlite --idle-connections 1000 --duration 0

For every run it builds a fresh store (SQLite file, or a PostgreSQL database created
and dropped with asyncpg), runs ``mssd db upgrade``, creates one domain and
``--mailboxes`` mailboxes (clients share them round-robin), fills each INBOX with
``--messages`` deterministic messages by bulk SQL (the same blobs in every mailbox),
starts ``mssd serve`` on ephemeral loopback ports and drives it with ``--client-procs``
processes of asyncio IMAP clients (raw sockets, implicit TLS verified against the bench
CA, or ``--plain`` LOGIN from the trusted loopback). Each client loops over a mix of
commands for ``--duration`` seconds; see ``cycle`` below. Everything it created is
removed at the end.

With ``--server dovecot`` the same clients measure a real Dovecot instead, on Maildirs
(or sdbox, mdbox) holding the same messages, with its defaults or its documented
performance settings (``imap_dovecot.py``), to compare both on the same day.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imap_dovecot
from smtp_load import (
    PG_ADMIN_URL,
    ROOT,
    Server,
    cpu_seconds,
    fresh_store,
    mssd_env,
    percentile,
    py_spy,
    run_cli,
)

DOMAIN = "bench.mssd.test"
PASSWORD = "Bench-imap-password-1"
COMMANDS = (
    "LOGIN", "SELECT", "FETCH-HDR", "FETCH-BODY", "STORE", "SEARCH-UNSEEN",
    "SEARCH-SUBJECT", "APPEND", "EXPUNGE", "NOOP", "LOGOUT",
)  # fmt: skip


# -- the messages ----------------------------------------------------------------------

_WORDS = (
    "patient bilan biologie compte rendu consultation ordonnance radiologie scanner "
    "cardiologie suivi traitement hospitalisation sortie courrier medecin traitant "
    "analyse resultat normal controle rendez-vous urgence dossier synthese examen "
    "prescription infirmier kinesitherapie pharmacie laboratoire echographie"
).split()
_SENDERS = [f"dr.{name}@hopital.example" for name in ("martin", "bernard", "petit", "durand")]


def bench_message(index: int) -> bytes:
    """Message ``index``: deterministic, 2-20 KB, one in eight multipart with a PDF."""
    rng = random.Random(index)
    size = rng.randint(2048, 20480)
    subject = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6)))
    date = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=17 * index)
    headers = (
        f"Return-Path: <{_SENDERS[index % 4]}>\r\n"
        f"Received: from mx.hopital.example (mx.hopital.example [192.0.2.{index % 250}])\r\n"
        f"\tby mx.bench.mssd.test with ESMTPS id {index:08x};"
        f" {date:%a, %d %b %Y %H:%M:%S +0000}\r\n"
        f"From: <{_SENDERS[index % 4]}>\r\nTo: <destinataire@{DOMAIN}>\r\n"
        f"Subject: {subject} {index}\r\nDate: {date:%a, %d %b %Y %H:%M:%S +0000}\r\n"
        f"Message-ID: <imap.{index}@hopital.example>\r\nMIME-Version: 1.0\r\n"
    )

    def text(octets: int) -> str:
        lines, total = [], 0
        while total < octets:
            line = " ".join(rng.choice(_WORDS) for _ in range(10))[:76]
            lines.append(line)
            total += len(line) + 2
        return "\r\n".join(lines) + "\r\n"

    if index % 8 != 3:
        body = text(size - len(headers))
        return (headers + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body).encode()
    attachment = base64.encodebytes(rng.randbytes(max(512, (size - 1500) * 3 // 4))).decode()
    boundary = f"=-bench-{index}"
    return (
        headers
        + f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        + f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + text(800)
        + f'--{boundary}\r\nContent-Type: application/pdf; name="cr-{index}.pdf"\r\n'
        + f'Content-Disposition: attachment; filename="cr-{index}.pdf"\r\n'
        + "Content-Transfer-Encoding: base64\r\n\r\n"
        + attachment.replace("\n", "\r\n")
        + f"--{boundary}--\r\n"
    ).encode()


def append_message(client: int, number: int) -> bytes:
    """The ~5 KB message a client APPENDs (then deletes) in each cycle."""
    body = ("Brouillon de compte rendu, donnees de test sans personne reelle.\r\n" * 75)[:5000]
    return (
        f"From: <client{client}@{DOMAIN}>\r\nTo: <confrere@hopital.example>\r\n"
        f"Subject: brouillon {client}.{number}\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <draft.{client}.{number}.{os.getpid()}@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
    ).encode()


# -- store set-up ------------------------------------------------------------------------


def addresses(count: int) -> list[str]:
    return [f"praticien{i}@{DOMAIN}" for i in range(count)]


def seed_flags(messages: int) -> list[list[str]]:
    """Each seeded message's flags: older mail mostly read; ~10 % unread, 3 % flagged,
    2 % answered (the same on every server and in every mailbox)."""
    rng = random.Random(1)
    flags = []
    for _ in range(messages):
        roll = rng.random()
        chosen = [] if roll < 0.10 else ["\\Seen"]
        if roll > 0.97:
            chosen.append("\\Flagged")
        elif 0.95 < roll <= 0.97:
            chosen.append("\\Answered")
        flags.append(chosen)
    return flags


def internal_date(index: int) -> dt.datetime:
    return dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=17 * index)


async def seed(url: str, mailbox_addresses: list[str], messages: int, scrypt_ln: int) -> float:
    """Domain, mailboxes (password ``PASSWORD``), and ``messages`` placements in each
    INBOX by bulk SQL; returns the seconds spent filling."""
    from sqlalchemy import insert, select, update

    from mssd.auth.passwords import hash_password
    from mssd.config import AuthSettings
    from mssd.store import admin
    from mssd.store.engine import create_engine, write_transaction
    from mssd.store.schema import blobs, folders, mailbox_usage, mailboxes, placements

    password_hash = hash_password(PASSWORD, AuthSettings(scrypt_n=2**scrypt_ln))
    engine = create_engine(url)
    try:
        await admin.add_domain(engine, DOMAIN, actor="bench")
        for number, address in enumerate(mailbox_addresses):
            idnat = f"8200000{number:04d}{number % 10}"
            await admin.create_mailbox(
                engine,
                address=address,
                bal_type="PER",
                owner_idnat=idnat,
                idnat_ps=idnat,
                password_hash=password_hash,
                actor="bench",
            )
        began = time.monotonic()
        stamp = dt.datetime.now(dt.UTC)
        shas: list[tuple[str, int]] = []
        chunk: list[dict[str, Any]] = []
        for index in range(messages):
            data = bench_message(index)
            sha = hashlib.sha256(data).hexdigest()
            shas.append((sha, len(data)))
            chunk.append({"sha256": sha, "size": len(data), "data": data, "created_at": stamp})
            if len(chunk) == 500 or index == messages - 1:
                async with write_transaction(engine) as conn:
                    await conn.execute(insert(blobs), chunk)
                chunk = []
        flags = seed_flags(messages)
        for address in mailbox_addresses:
            async with write_transaction(engine) as conn:
                folder_id, mailbox_id, uidnext, modseq = (
                    await conn.execute(
                        select(
                            folders.c.id,
                            folders.c.mailbox_id,
                            folders.c.uidnext,
                            folders.c.highestmodseq,
                        )
                        .join(mailboxes, mailboxes.c.id == folders.c.mailbox_id)
                        .where(mailboxes.c.address == address, folders.c.name == "INBOX")
                    )
                ).one()
                rows = []
                for index, (sha, size) in enumerate(shas):
                    rows.append(
                        {
                            "folder_id": folder_id,
                            "uid": uidnext + index,
                            "blob_sha256": sha,
                            "flags": " ".join(sorted(flags[index])),
                            "modseq": modseq + 1 + index,
                            "internal_date": internal_date(index),
                            "size": size,
                        }
                    )
                for start in range(0, len(rows), 2000):
                    await conn.execute(insert(placements), rows[start : start + 2000])
                await conn.execute(
                    update(folders)
                    .where(folders.c.id == folder_id)
                    .values(uidnext=uidnext + messages, highestmodseq=modseq + messages)
                )
                # Placements written directly count towards the mailbox's usage (quota.py).
                await conn.execute(
                    update(mailbox_usage)
                    .where(mailbox_usage.c.mailbox_id == mailbox_id)
                    .values(used_bytes=sum(size for _, size in shas))
                )
        return time.monotonic() - began
    finally:
        await engine.dispose()


# -- the IMAP client -------------------------------------------------------------------

_LITERAL = re.compile(rb"\{(\d+)\+?\}$")


class ImapError(Exception):
    pass


class _Responses(asyncio.Protocol):
    """The client's side of the connection: splits what the server sends into
    responses (a line, with the literals it announces skipped, not kept) and
    hands them to the one waiting command. It works on the buffer as it comes,
    a few operations per line, where ``StreamReader.readline`` and
    ``readexactly`` cost a coroutine each: the clients share the two cores with
    the server they measure, and this takes about a tenth off their CPU."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.position = 0
        self.skip = 0  # octets of a literal still to pass over
        self.first: bytes | None = None  # first line of the response being read
        self.responses: list[bytes] = []
        self.prefix: bytes | None = None
        self.waiter: asyncio.Future[list[bytes]] | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, error: BaseException | None) -> None:
        self.lost = ConnectionError(f"connection closed by the server ({error!r})")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        position = self.position
        while True:
            if self.skip:
                available = len(buffer) - position
                if available < self.skip:
                    self.skip -= available
                    position = len(buffer)
                    break
                position += self.skip
                self.skip = 0
            end = buffer.find(b"\r\n", position)
            if end < 0:
                break
            if self.first is None:
                self.first = bytes(buffer[position:end])
            if end > position and buffer[end - 1] == 0x7D:  # "}": a literal follows?
                match = _LITERAL.search(buffer, max(position, end - 24), end)
                if match is not None:
                    self.skip = int(match.group(1))
                    position = end + 2
                    continue
            position = end + 2
            self.responses.append(self.first)
            self.first = None
            self._deliver()
        if position == len(buffer):
            buffer.clear()
            position = 0
        elif position > 1 << 16:
            del buffer[:position]
            position = 0
        self.position = position

    def _deliver(self) -> None:
        prefix, waiter = self.prefix, self.waiter
        if prefix is None or waiter is None or not self.responses[-1].startswith(prefix):
            return
        responses, self.responses = self.responses, []
        self.prefix = self.waiter = None
        if not waiter.done():
            waiter.set_result(responses)

    async def until(self, prefix: bytes) -> list[bytes]:
        """The responses up to and including the first that starts with ``prefix``."""
        for index, response in enumerate(self.responses):
            if response.startswith(prefix):
                found, self.responses = self.responses[: index + 1], self.responses[index + 1 :]
                return found
        if self.lost is not None:
            raise self.lost
        self.prefix = prefix
        self.waiter = asyncio.get_running_loop().create_future()
        return await self.waiter


class Imap:
    """Just enough IMAP: tagged commands, literals in responses, LITERAL+ in APPEND."""

    def __init__(self, transport: asyncio.Transport, responses: _Responses) -> None:
        self.transport = transport
        self.responses = responses
        self.counter = 0

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None) -> Imap:
        transport, responses = await asyncio.get_running_loop().create_connection(
            _Responses, "127.0.0.1", port, ssl=tls,
            server_hostname="localhost" if tls else None,
        )  # fmt: skip
        client = cls(transport, responses)  # type: ignore[arg-type]
        greeting = (await responses.until(b"*"))[-1]
        if not greeting.startswith(b"* OK"):
            raise ImapError(f"greeting: {greeting[:200]!r}")
        return client

    async def command(self, text: bytes, literal: bytes | None = None) -> list[bytes]:
        """Send ``tag text`` (with ``literal`` as a LITERAL+ after it); returns the
        first line of each response, the tagged one last; raises unless OK."""
        self.counter += 1
        tag = b"a%d" % self.counter
        if literal is None:
            self.transport.write(tag + b" " + text + b"\r\n")
        else:
            head = tag + b" " + text + b" {%d+}\r\n" % len(literal)
            self.transport.write(head + literal + b"\r\n")
        prefix = tag + b" "
        lines = await self.responses.until(prefix)
        if lines[-1][len(prefix) : len(prefix) + 2] != b"OK":
            raise ImapError(f"{text[:40]!r}: {lines[-1][:200]!r}")
        return lines

    async def start_idle(self) -> None:
        self.counter += 1
        self.transport.write(b"a%d IDLE\r\n" % self.counter)
        line = (await self.responses.until(b"+"))[-1]
        if not line.startswith(b"+"):
            raise ImapError(f"IDLE: {line[:200]!r}")

    def close(self) -> None:
        self.transport.close()


@dataclass
class ClientState:
    number: int
    login: str
    messages: int
    subject_every: int
    rng: random.Random
    cycles: int = 0
    only: str | None = None


async def login_select(imap: Imap, state: ClientState, timed: Any) -> None:
    login = b'LOGIN "%s" "%s"' % (state.login.encode(), PASSWORD.encode())
    await timed("LOGIN", imap.command(login))
    await timed("SELECT", imap.command(b"SELECT INBOX"))


async def cycle(imap: Imap, state: ClientState, timed: Any) -> None:
    """One round of the mix on the selected INBOX (UIDs 1..messages are the seed)."""
    n, rng = state.messages, state.rng
    state.cycles += 1
    if state.only is not None:
        await only(imap, state, timed)
        return
    await fetch_headers(imap, state, timed)
    await timed("FETCH-BODY", imap.command(b"UID FETCH %d BODY.PEEK[]" % rng.randint(1, n)))
    await store_seen(imap, state, timed)
    await timed("SEARCH-UNSEEN", imap.command(b"UID SEARCH UNSEEN"))
    if state.subject_every and state.cycles % state.subject_every == 0:
        word = rng.choice(_WORDS).encode()
        await timed("SEARCH-SUBJECT", imap.command(b'UID SEARCH SUBJECT "%s"' % word))
    await append_expunge(imap, state, timed)
    await timed("NOOP", imap.command(b"NOOP"))


async def fetch_headers(imap: Imap, state: ClientState, timed: Any) -> None:
    """The newest 50 messages' flags, sizes and a few header fields (a message list)."""
    last = max(1, state.messages - 49)
    await timed(
        "FETCH-HDR",
        imap.command(
            b"UID FETCH %d:* (FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (From Subject Date)])"
            % last
        ),
    )


async def store_seen(imap: Imap, state: ClientState, timed: Any) -> None:
    uids = b",".join(b"%d" % state.rng.randint(1, state.messages) for _ in range(3))
    sign = b"+" if state.cycles % 2 else b"-"
    await timed("STORE", imap.command(b"UID STORE %s %sFLAGS (\\Seen)" % (uids, sign)))


async def append_expunge(imap: Imap, state: ClientState, timed: Any) -> None:
    """APPEND a message, flag it \\Deleted, UID EXPUNGE it: the folder keeps its size."""
    lines = await timed(
        "APPEND",
        imap.command(b"APPEND INBOX (\\Seen)", append_message(state.number, state.cycles)),
    )
    found = re.search(rb"APPENDUID \d+ (\d+)", lines[-1])
    if found is None:
        raise ImapError(f"APPEND without APPENDUID: {lines[-1][:200]!r}")
    uid = found.group(1)
    await timed("STORE", imap.command(b"UID STORE %s +FLAGS.SILENT (\\Deleted)" % uid))
    await timed("EXPUNGE", imap.command(b"UID EXPUNGE %s" % uid))


ONLY = ("NOOP", "FETCH-HDR", "FETCH-BODY", "STORE", "SEARCH-UNSEEN", "APPEND-EXPUNGE")
"""``--only``: one part of the mix, repeated, to see what each costs."""


async def only(imap: Imap, state: ClientState, timed: Any) -> None:
    """Nine commands of one kind (the mix has nine), or three APPEND-STORE-EXPUNGE."""
    n = state.messages
    for _ in range(3 if state.only == "APPEND-EXPUNGE" else 9):
        if state.only == "NOOP":
            await timed("NOOP", imap.command(b"NOOP"))
        elif state.only == "FETCH-HDR":
            await fetch_headers(imap, state, timed)
        elif state.only == "FETCH-BODY":
            command = b"UID FETCH %d BODY.PEEK[]" % state.rng.randint(1, n)
            await timed("FETCH-BODY", imap.command(command))
        elif state.only == "STORE":
            state.cycles += 1
            await store_seen(imap, state, timed)
        elif state.only == "SEARCH-UNSEEN":
            await timed("SEARCH-UNSEEN", imap.command(b"UID SEARCH UNSEEN"))
        else:
            state.cycles += 1
            await append_expunge(imap, state, timed)


def _tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    return None if ca_file is None else ssl.create_default_context(cafile=ca_file)


def _load_process(
    port: int,
    ca_file: str | None,
    clients: list[tuple[int, str]],
    options: dict[str, Any],
    barrier: Any,
    queue: Any,
) -> None:
    """One client process: its clients prepare, wait for the barrier, then loop for
    ``duration`` seconds. Only commands answered inside the window count."""

    async def main() -> dict[str, Any]:
        tls = _tls_context(ca_file)
        duration = options["duration"]
        persistent = options["mode"] == "persistent"
        latencies: dict[str, list[float]] = {name: [] for name in COMMANDS}
        errors: list[str] = []
        window = [0.0, 0.0]
        sessions = [0]
        clock = time.monotonic

        async def timed(name: str, awaitable: Any) -> Any:
            began = clock()
            result = await awaitable
            ended = clock()
            if window[0] <= began and ended <= window[1]:
                latencies[name].append(ended - began)
            return result

        async def untimed(name: str, awaitable: Any) -> Any:
            return await awaitable

        states = [
            ClientState(
                number,
                login,
                options["messages"],
                options["subject_every"],
                random.Random(number * 7919 + options["run"]),
                only=options["only"],
            )
            for number, login in clients
        ]
        prepared: dict[int, Imap] = {}

        gate = asyncio.Semaphore(10)

        async def prepare(state: ClientState) -> None:
            if not persistent:
                return
            async with gate:
                try:
                    imap = await Imap.connect(port, tls)
                    await login_select(imap, state, untimed)
                    prepared[state.number] = imap
                except (ImapError, ConnectionError, OSError) as e:
                    errors.append(f"client {state.number} set-up: {e!r}"[:300])

        await asyncio.gather(*(prepare(s) for s in states))
        await asyncio.to_thread(barrier.wait)
        window[0] = clock()
        window[1] = window[0] + duration
        cpu0 = sum(os.times()[:2])

        async def run(state: ClientState) -> None:
            imap = prepared.get(state.number)
            while clock() < window[1]:
                try:
                    if imap is None and persistent:
                        imap = await Imap.connect(port, tls)
                        await login_select(imap, state, timed)
                    elif imap is None:
                        imap = await Imap.connect(port, tls)
                        await login_select(imap, state, timed)
                        await cycle(imap, state, timed)
                        await timed("LOGOUT", imap.command(b"LOGOUT"))
                        imap.close()
                        imap = None
                        if clock() <= window[1]:
                            sessions[0] += 1
                    else:
                        await cycle(imap, state, timed)
                except (ImapError, ConnectionError, OSError) as e:
                    if len(errors) < 20:
                        errors.append(f"client {state.number}: {e!r}"[:300])
                    if imap is not None:
                        imap.close()
                    imap = None
                    await asyncio.sleep(0.1)
            if imap is not None:
                with suppress(Exception):
                    await asyncio.wait_for(imap.command(b"LOGOUT"), 5)
                imap.close()

        tasks = [asyncio.create_task(run(s)) for s in states]
        done, pending = await asyncio.wait(tasks, timeout=duration + options["grace"])
        for task in pending:
            task.cancel()
        if pending:
            errors.append(f"{len(pending)} client(s) still busy {options['grace']} s after the end")
        errors += [repr(t.exception()) for t in done if t.exception() is not None]
        return {
            "latencies": latencies,
            "errors": errors,
            "sessions": sessions[0],
            "client_cpu": sum(os.times()[:2]) - cpu0,
        }

    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        queue.put(runner(main()))
    except BaseException as error:  # report, never hang the parent
        queue.put({"errors": [repr(error)], "latencies": {}, "sessions": 0, "client_cpu": 0.0})


def _spread(items: list[Any], procs: int) -> list[list[Any]]:
    procs = max(1, min(procs, len(items)))
    return [items[p::procs] for p in range(procs)]


def drive_load(
    port: int, ca_file: str | None, logins: list[str], args: argparse.Namespace, run: int
) -> dict[str, Any]:
    clients = [(number, logins[number % len(logins)]) for number in range(args.clients)]
    shares = _spread(clients, args.client_procs)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(shares))
    queue = context.Queue()
    options = {
        "duration": args.duration,
        "mode": args.mode,
        "messages": args.messages,
        "subject_every": args.subject_every,
        "only": args.only,
        "grace": 60.0,
        "run": run,
    }
    arguments = [(port, ca_file, share, options, barrier, queue) for share in shares]
    workers = _start(context, _load_process, arguments)
    reports = []
    try:
        for _ in workers:
            reports.append(queue.get(timeout=args.duration + 300))
    finally:
        _stop(workers, 10)
    latencies: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for report in reports:
        for name, values in report["latencies"].items():
            latencies[name].extend(values)
    return {
        "latencies": latencies,
        "errors": [e for r in reports for e in r["errors"]],
        "sessions": sum(r["sessions"] for r in reports),
        "client_cpu": sum(r["client_cpu"] for r in reports),
    }


# -- idle connections ------------------------------------------------------------------


def _idle_process(
    port: int, ca_file: str | None, logins: list[str], ready: Any, release: Any, queue: Any
) -> None:
    async def main() -> dict[str, Any]:
        tls = _tls_context(ca_file)
        gate = asyncio.Semaphore(20)  # handshakes and logins in flight
        errors: list[str] = []
        open_: list[Imap] = []

        async def one(login: str) -> None:
            async with gate:
                try:
                    imap = await Imap.connect(port, tls)
                    await imap.command(b'LOGIN "%s" "%s"' % (login.encode(), PASSWORD.encode()))
                    await imap.command(b"SELECT INBOX")
                    await imap.start_idle()
                    open_.append(imap)
                except Exception as error:
                    if len(errors) < 10:
                        errors.append(repr(error)[:300])

        await asyncio.gather(*(one(login) for login in logins))
        queue.put({"opened": len(open_), "errors": errors})
        await asyncio.to_thread(release.wait)
        for imap in open_:
            imap.close()
        await asyncio.sleep(0.5)
        return {}

    try:
        asyncio.run(main())
    except BaseException as error:
        queue.put({"opened": 0, "errors": [repr(error)]})


def process_tree(pid: int) -> list[int]:
    """The server and the processes it started (its IMAP workers; Dovecot's master,
    log, config, anvil, auth, stats, login and imap processes)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(p for child in children for p in process_tree(int(child)))]


def tree_cpu_seconds(pid: int) -> float:
    """CPU of the processes alive now and of those that ended (Dovecot's login and
    imap processes of each session): a parent counts its waited-for children's."""
    return sum(cpu_seconds(p, ended_children=True) for p in process_tree(pid))


def postgres_cpu_seconds() -> float | None:
    """CPU of every process named ``postgres`` on this machine (the postmaster,
    its backends, those that ended, its background workers): what the store's
    server costs, as long as nothing else uses that PostgreSQL during the load.
    None when none runs here (a PostgreSQL elsewhere is not measured)."""
    total: float | None = None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() != "postgres":
                    continue
            except OSError:
                continue
            total = (total or 0.0) + cpu_seconds(int(entry.name), ended_children=True)
    return total


def tree_memory_kib(pid: int) -> dict[str, int]:
    """RSS and PSS summed over the process tree. RSS counts pages shared between
    processes once per process (with Dovecot's two processes per connection, the
    sum overstates); PSS divides each shared page between its sharers."""
    total = {"rss": 0, "pss": 0}
    for p in process_tree(pid):
        with suppress(OSError):  # a process that has just ended
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total["rss"] += int(line.split()[1])
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total["pss"] += int(line.split()[1])
    return total


def idle_memory(
    pid: int, port: int, ca_file: str | None, logins: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    count = args.idle_connections
    wanted = [logins[i % len(logins)] for i in range(count)]
    shares = _spread(wanted, args.client_procs)
    context = multiprocessing.get_context("fork")
    release = context.Event()
    queue = context.Queue()
    before = tree_memory_kib(pid)
    began = time.monotonic()
    arguments = [(port, ca_file, share, None, release, queue) for share in shares]
    workers = _start(context, _idle_process, arguments)
    reports = []
    try:
        for _ in workers:
            reports.append(queue.get(timeout=args.timeout))
        opened = sum(r["opened"] for r in reports)
        setup = time.monotonic() - began
        time.sleep(3.0)
        after = tree_memory_kib(pid)
    finally:
        release.set()
        _stop(workers, 30)
    return {
        "connections": count,
        "opened": opened,
        "rss_before_kib": before["rss"],
        "rss_after_kib": after["rss"],
        "kib_per_connection": (after["rss"] - before["rss"]) / opened if opened else None,
        "pss_before_kib": before["pss"],
        "pss_after_kib": after["pss"],
        "pss_kib_per_connection": (after["pss"] - before["pss"]) / opened if opened else None,
        "setup_seconds": setup,
        "errors": [e for r in reports for e in r["errors"]],
    }


# -- runs ------------------------------------------------------------------------------


@dataclass
class RunResult:
    run: int
    server: str
    """``mssd`` or ``dovecot <version>``."""
    backend: str
    """mssd's store, or Dovecot's mail format (``maildir``, ``sdbox``, ``mdbox``)."""
    tuned: bool | None
    """Dovecot with ``--dovecot-tuned``; None for mssd."""
    mode: str
    transport: str
    clients: int
    mailboxes: int
    messages: int
    fill_seconds: float = 0.0
    commands: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    sessions: int = 0
    server_cpu_ms: float | None = None
    """Server CPU (user + system) per command."""
    database_cpu_ms: float | None = None
    """PostgreSQL's CPU per command (``--backend postgresql``)."""
    client_cpu_share: float | None = None
    """Client CPU seconds per wall second (out of 2 cores)."""
    per_command: dict[str, dict[str, float]] = field(default_factory=dict)
    idle: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    """The server under load, filled and listening."""

    pid: int
    """Its main process: the CPU and memory of its whole process tree are counted."""
    ports: dict[str, int]
    """Listener name (``imap``, ``imaps``) to loopback port."""


def _filled(result: RunResult, seconds: float) -> None:
    result.fill_seconds = seconds
    print(f"run {result.run}: filled {result.mailboxes} x {result.messages} in {seconds:.1f} s",
          file=sys.stderr, flush=True)  # fmt: skip


@contextmanager
def mssd_target(
    args: argparse.Namespace, workdir: Path, pki_dir: Path, result: RunResult
) -> Iterator[Target]:
    """A fresh store filled by bulk SQL, and ``mssd serve``; its log's ERROR lines
    and tracebacks go to ``result.errors``."""
    with fresh_store(args.backend, workdir, args.pg_admin_url) as url:
        env = mssd_env(url, workdir, pki_dir, True)
        env.update(
            {
                "MSSD_IMAP_IMAP_LISTEN": "127.0.0.1:0",
                "MSSD_IMAP_IMAPS_LISTEN": "127.0.0.1:0",
                "MSSD_SERVER_TRUSTED_NETWORKS": "127.0.0.0/8",
                "MSSD_IMAP_WORKERS": str(args.imap_workers),
            }
        )
        run_cli(env, workdir, "db", "upgrade")
        logins = addresses(args.mailboxes)
        _filled(result, asyncio.run(seed(url, logins, args.messages, args.scrypt_ln)))
        server = Server(env, workdir, args.serve_script)
        try:
            yield Target(server.process.pid, server.ports)
        finally:
            server.stop()
        log_text = server.log.read_text(errors="replace")
        problems = [line for line in log_text.splitlines() if re.search(r"ERROR|Traceback", line)]
        result.errors += problems[:5]


@contextmanager
def dovecot_target(
    args: argparse.Namespace, workdir: Path, pki_dir: Path, result: RunResult
) -> Iterator[Target]:
    """Maildirs written directly (converted by dsync for sdbox and mdbox), Dovecot
    started on them, and every INBOX SELECTed once so that the load finds Dovecot's
    indexes built; its log's Error, Panic and Fatal lines go to ``result.errors``."""
    # The mail owner (not root) must reach the Maildirs under the run's directory.
    workdir.parent.chmod(0o711)
    directory = workdir / "dovecot"
    directory.mkdir(mode=0o755)
    logins = addresses(args.mailboxes)
    began = time.monotonic()
    imap_dovecot.write_maildirs(
        directory / "home",
        logins,
        args.messages,
        bench_message,
        seed_flags(args.messages),
        [internal_date(index).timestamp() for index in range(args.messages)],
    )
    config = imap_dovecot.limits_config(
        args.clients + args.idle_connections, args.mailboxes, args.dovecot_tuned
    )
    if args.dovecot_tuned:
        cores = len(os.sched_getaffinity(0))
        config = imap_dovecot.tuned_config(args.dovecot_mail, cores) + config
    tls = (pki_dir / "server.pem", pki_dir / "server.key")
    with imap_dovecot.running_dovecot(
        args.dovecot, directory, logins, PASSWORD, tls, args.dovecot_mail, config
    ) as server:
        _filled(result, time.monotonic() - began)
        port = server.ports["imap" if args.plain else "imaps"]
        ca_file = None if args.plain else str(pki_dir / "ca-bundle.pem")
        began = time.monotonic()
        asyncio.run(select_every_inbox(port, ca_file, logins, args.messages))
        print(f"run {result.run}: Dovecot indexed the INBOXes in {time.monotonic() - began:.1f} s",
              file=sys.stderr, flush=True)  # fmt: skip
        yield Target(server.process.pid, server.ports)
    result.errors += imap_dovecot.log_problems(server.log)[:5]


async def select_every_inbox(
    port: int, ca_file: str | None, logins: list[str], messages: int
) -> None:
    """LOGIN and SELECT INBOX for each user, checking it holds ``messages`` with the
    seed's \\Seen flags and, for the first and last, its internal dates."""
    tls = _tls_context(ca_file)
    seen = sum("\\Seen" in flags for flags in seed_flags(messages))
    dates = {1: internal_date(0), messages: internal_date(messages - 1)}
    for login in logins:
        imap = await Imap.connect(port, tls)
        await imap.command(b'LOGIN "%s" "%s"' % (login.encode(), PASSWORD.encode()))
        lines = await imap.command(b"SELECT INBOX")
        if b"* %d EXISTS" % messages not in lines:
            raise ImapError(f"{login}: SELECT INBOX did not find {messages} messages: {lines!r}")
        lines = await imap.command(b"UID SEARCH SEEN")
        found = len(lines[0].split()) - 2 if lines[0].startswith(b"* SEARCH") else None
        if found != seen:
            raise ImapError(f"{login}: {found} messages \\Seen, not {seen}")
        for uid, date in dates.items():
            lines = await imap.command(b"UID FETCH %d INTERNALDATE" % uid)
            found = re.search(rb'INTERNALDATE "([^"]+)"', lines[0])
            if found is None or _imap_date(found.group(1)) != date:
                raise ImapError(f"{login}: UID {uid} is not dated {date}: {lines!r}")
        await imap.command(b"LOGOUT")
        imap.close()


def _imap_date(text: bytes) -> dt.datetime:
    """An RFC 9051 date-time (``" 1-Jan-2024 00:00:00 +0000"``)."""
    return dt.datetime.strptime(text.decode().strip(), "%d-%b-%Y %H:%M:%S %z")


def one_run(args: argparse.Namespace, number: int, base: Path, pki_dir: Path) -> RunResult:
    workdir = base / f"run{number}"
    workdir.mkdir()
    logins = addresses(args.mailboxes)
    ca_file = None if args.plain else str(pki_dir / "ca-bundle.pem")
    result = RunResult(
        run=number,
        server=args.server_name,
        backend=args.backend,
        tuned=args.dovecot_tuned,
        mode=args.mode,
        transport="plain" if args.plain else "tls",
        clients=args.clients,
        mailboxes=args.mailboxes,
        messages=args.messages,
    )
    target = dovecot_target if args.server == "dovecot" else mssd_target
    with target(args, workdir, pki_dir, result) as server:
        pid = server.pid
        port = server.ports["imap" if args.plain else "imaps"]
        if args.idle_connections and number == 1:
            result.idle = idle_memory(pid, port, ca_file, logins, args)
            result.errors += result.idle["errors"][:5]
        if args.duration > 0:
            spy_out = None
            if args.py_spy:
                spy_out = Path(args.py_spy).with_stem(f"{Path(args.py_spy).stem}-run{number}")
            postgresql = args.server == "mssd" and args.backend == "postgresql"
            cpu_before = tree_cpu_seconds(pid)
            database_before = postgres_cpu_seconds() if postgresql else None
            with py_spy(pid, spy_out, args.py_spy_gil):
                load = drive_load(port, ca_file, logins, args, number)
            cpu = tree_cpu_seconds(pid) - cpu_before
            database_after = postgres_cpu_seconds() if postgresql else None
            result.errors += load["errors"]
            result.sessions = load["sessions"]
            result.commands = sum(len(v) for v in load["latencies"].values())
            if database_before is not None and database_after is not None and result.commands:
                database = database_after - database_before
                result.database_cpu_ms = database * 1000 / result.commands
            result.seconds = args.duration
            result.rate = result.commands / args.duration
            result.server_cpu_ms = cpu * 1000 / result.commands if result.commands else None
            result.client_cpu_share = load["client_cpu"] / args.duration
            for name, values in load["latencies"].items():
                if values:
                    values.sort()
                    result.per_command[name] = {
                        "count": len(values),
                        "p50_ms": percentile(values, 0.50) * 1000,
                        "p99_ms": percentile(values, 0.99) * 1000,
                    }
    return result


def summarise(results: list[RunResult]) -> dict[str, Any]:
    loaded = [r for r in results if r.commands]
    summary: dict[str, Any] = {}
    if loaded:
        summary["rate"] = statistics.median(r.rate for r in loaded)
        summary["server_cpu_ms"] = statistics.median(r.server_cpu_ms or 0 for r in loaded)
        database = [r.database_cpu_ms for r in loaded if r.database_cpu_ms is not None]
        if database:
            summary["database_cpu_ms"] = statistics.median(database)
        summary["per_command"] = {}
        for name in COMMANDS:
            rows = [r.per_command[name] for r in loaded if name in r.per_command]
            if rows:
                summary["per_command"][name] = {
                    "p50_ms": statistics.median(x["p50_ms"] for x in rows),
                    "p99_ms": statistics.median(x["p99_ms"] for x in rows),
                    "count": statistics.median(x["count"] for x in rows),
                }
    idle = [r.idle for r in results if r.idle]
    if idle:
        summary["idle"] = idle[0]
    summary["ok"] = all(not r.errors for r in results)
    return summary


def database_cpu(milliseconds: float | None) -> str:
    return "" if milliseconds is None else f"postgresql cpu {milliseconds:.2f} ms/command, "


def print_report(
    args: argparse.Namespace, results: list[RunResult], summary: dict[str, Any]
) -> None:
    print(f"{describe_server(args)}, {args.mode}, {'plain' if args.plain else 'TLS'}, "
          f"{args.clients} clients on {args.mailboxes} mailboxes of {args.messages} messages, "
          f"{args.duration:g} s per run")  # fmt: skip
    for r in results:
        if r.commands:
            print(f"run {r.run}: {r.commands} commands = {r.rate:.1f} commands/s, "
                  f"{r.sessions} sessions, server cpu {r.server_cpu_ms:.2f} ms/command, "
                  f"{database_cpu(r.database_cpu_ms)}"
                  f"client cpu {r.client_cpu_share:.2f} cores")  # fmt: skip
        for error in r.errors[:8]:
            print(f"  ! {error}")
    if "rate" in summary:
        print(f"median: {summary['rate']:.1f} commands/s, "
              f"{database_cpu(summary.get('database_cpu_ms'))}"
              f"server cpu {summary['server_cpu_ms']:.2f} ms/command")  # fmt: skip
        print(f"{'command':<15} {'count':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for name, row in summary["per_command"].items():
            print(f"{name:<15} {row['count']:>8.0f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f}")
    if "idle" in summary:
        idle = summary["idle"]
        per = idle["kib_per_connection"]
        pss = idle["pss_kib_per_connection"]
        print(f"idle: {idle['opened']}/{idle['connections']} IDLE connections opened in "
              f"{idle['setup_seconds']:.1f} s; server RSS {idle['rss_before_kib'] / 1024:.1f} -> "
              f"{idle['rss_after_kib'] / 1024:.1f} MiB = "
              f"{'-' if per is None else f'{per:.0f}'} KiB per connection; PSS "
              f"{idle['pss_before_kib'] / 1024:.1f} -> {idle['pss_after_kib'] / 1024:.1f} MiB = "
              f"{'-' if pss is None else f'{pss:.0f}'} KiB per connection")  # fmt: skip


def describe_server(args: argparse.Namespace) -> str:
    if args.server == "dovecot":
        settings = "tuned" if args.dovecot_tuned else "defaults"
        return (f"{args.server_name} ({args.dovecot_mail}, {settings}, "
                f"passwords {imap_dovecot.PASSWORD_SCHEME})")  # fmt: skip
    workers = f", {args.imap_workers} IMAP processes" if args.imap_workers > 1 else ""
    return f"mssd, backend {args.backend}{workers}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--server",
        choices=("mssd", "dovecot"),
        default="mssd",
        help="the server measured: mssd, or a Dovecot started for the run on Maildirs "
        "with the same messages (bench/imap_dovecot.py)",
    )
    p.add_argument(
        "--dovecot-mail",
        choices=imap_dovecot.MAIL_FORMATS,
        help="Dovecot's mail storage (maildir); sdbox and mdbox are converted from the "
        "Maildirs by dsync before the run",
    )
    p.add_argument(
        "--dovecot-tuned",
        action="store_true",
        help="Dovecot with its documented performance settings (high-performance login "
        "processes, imap processes reused, auth cache) instead of its defaults",
    )
    p.add_argument("--backend", choices=("sqlite", "postgresql"), help="mssd's store (sqlite)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument(
        "--mailboxes",
        type=int,
        default=None,
        help="mailboxes the clients share round-robin (default min(clients, 5))",
    )
    p.add_argument("--messages", type=int, default=10000, help="messages per INBOX")
    p.add_argument("--mode", choices=("persistent", "login-per-session"), default="persistent")
    p.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="measurement window per run, seconds (0: idle measurement only)",
    )
    p.add_argument("--runs", type=int, default=1)
    p.add_argument(
        "--subject-every",
        type=int,
        default=0,
        metavar="N",
        help="UID SEARCH SUBJECT in one cycle out of N per client (0: never)",
    )
    p.add_argument(
        "--only",
        choices=ONLY,
        help="one part of the mix instead of all of it (NOOP: what the connection, TLS, "
        "parsing and dispatch cost without any store work)",
    )
    p.add_argument(
        "--idle-connections",
        type=int,
        default=0,
        help="before the load of run 1, open this many IDLE connections and "
        "measure the server's RSS",
    )
    p.add_argument(
        "--scrypt-ln",
        type=int,
        help="log2 of scrypt N in the stored password hashes (mssd default 14)",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="plaintext port, LOGIN allowed from the trusted loopback (default: "
        "implicit TLS, certificate verified against the bench CA)",
    )
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument(
        "--imap-workers",
        type=int,
        help="imap.workers: IMAP processes (1; CPU and memory are summed over them)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="time limit of the idle set-up")
    p.add_argument(
        "--pg-admin-url", default=os.environ.get("MSSD_BENCH_POSTGRES_URL", PG_ADMIN_URL)
    )
    p.add_argument(
        "--py-spy",
        metavar="FILE",
        help="record the server with py-spy during the load (.svg, .json, .txt)",
    )
    p.add_argument("--py-spy-gil", action="store_true")
    p.add_argument(
        "--serve-script",
        metavar="PY",
        help="run `python PY serve` instead of `python -m mssd serve`",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    mssd_only = {
        "--backend": args.backend, "--imap-workers": args.imap_workers,
        "--scrypt-ln": args.scrypt_ln, "--serve-script": args.serve_script,
        "--py-spy": args.py_spy, "--py-spy-gil": args.py_spy_gil or None,
    }  # fmt: skip
    given = [name for name, value in mssd_only.items() if value is not None]
    if args.server == "dovecot" and given:
        p.error(f"{', '.join(given)}: mssd only, not with --server dovecot")
    dovecot_only = {"--dovecot-mail": args.dovecot_mail, "--dovecot-tuned": args.dovecot_tuned}
    given = [name for name, value in dovecot_only.items() if value]
    if args.server == "mssd" and given:
        p.error(f"{', '.join(given)}: only with --server dovecot")
    if args.server == "dovecot":
        args.dovecot = imap_dovecot.dovecot_binary()
        args.server_name = f"dovecot {imap_dovecot.version(args.dovecot)}"
        args.dovecot_mail = args.dovecot_mail or "maildir"
        args.backend = args.dovecot_mail
    else:
        args.server_name = "mssd"
        args.dovecot_tuned = None
        args.backend = args.backend or "sqlite"
        args.imap_workers = args.imap_workers or 1
        args.scrypt_ln = args.scrypt_ln or 14
    if args.mailboxes is None:
        args.mailboxes = min(args.clients, 5)
    if args.clients < 1 or args.messages < 50 or args.runs < 1 or args.mailboxes < 1:
        p.error("--clients, --runs, --mailboxes must be positive, --messages at least 50")
    return args


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed:
        raise SystemExit(f"file descriptor limit {hard} is below the {needed} needed")


def _start(context: Any, target: Any, argument_lists: list[tuple[Any, ...]]) -> list[Any]:
    """One load-generator process per argument tuple, started."""
    workers = [context.Process(target=target, args=args, daemon=True) for args in argument_lists]
    for worker in workers:
        worker.start()
    return workers


def _stop(workers: list[Any], timeout: float) -> None:
    for worker in workers:
        worker.join(timeout=timeout)
        if worker.is_alive():
            worker.kill()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Client and server (which inherits the limit) each hold one fd per connection.
    raise_fd_limit(args.idle_connections + args.clients + 1024)
    sys.path.insert(0, str(ROOT))
    base = Path(tempfile.mkdtemp(prefix="mssd-imap-bench-"))
    results: list[RunResult] = []
    try:
        pki_dir = base / "pki"
        env = mssd_env("sqlite+aiosqlite:///unused.db", base, pki_dir, True)
        run_cli(env, base, "pki", "init", "--dir", str(pki_dir), "--hostname", "localhost")
        for number in range(1, args.runs + 1):
            result = one_run(args, number, base, pki_dir)
            results.append(result)
            if not args.json and result.commands:
                print(f"run {number}: {result.rate:.1f} commands/s", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    summary = summarise(results)
    summary.update(
        server=args.server_name, backend=args.backend, tuned=args.dovecot_tuned,
        mode=args.mode, clients=args.clients,
        mailboxes=args.mailboxes, messages=args.messages,
        transport="plain" if args.plain else "tls", duration=args.duration, runs=len(results),
    )  # fmt: skip
    if args.json:
        print(json.dumps({"summary": summary, "runs": [asdict(r) for r in results]}, indent=2))
    else:
        print_report(args, results, summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
