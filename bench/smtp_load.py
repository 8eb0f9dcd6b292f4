#!/usr/bin/env python3
"""SMTP load benchmark: committed messages per second and latency of ``mssd serve``.

Run on demand, never in the test suite (see bench/README.md)::

    .venv/bin/python bench/smtp_load.py --backend sqlite --plain --client smtp-source \\
        --messages 2000 --size 4096 --connections 20 --runs 3

For every run it builds a fresh store (an SQLite file in a temporary directory, or a
fresh PostgreSQL database created and dropped with asyncpg), runs ``mssd db upgrade``,
creates a domain and a few mailboxes, starts ``mssd serve`` on ephemeral loopback ports,
drives load at the MTA listener, stops the server and counts the placements really
committed in the store. Everything it created is removed at the end.

Load generators:

- ``smtp-source`` (Postfix): plaintext only, one session per connection with ``-d``;
  throughput only (wall time of the whole run, connection set-up included).
- ``python``: ``--client-procs`` processes of asyncio sessions over raw sockets, plaintext
  or STARTTLS; each session sends its share of the messages (MAIL, RCPT, DATA repeated,
  no pipelining). Latency is measured per message from MAIL FROM sent to the 250 after
  the data; throughput from the first MAIL to the last 250 (session set-up excluded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DOMAIN = "bench.mssd.test"
SENDER = f"expediteur@{DOMAIN}"
ROOT = Path(__file__).resolve().parent.parent
READY = "mssd ready "
PG_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


# -- results -----------------------------------------------------------------------


@dataclass
class RunResult:
    run: int
    client: str
    backend: str
    mode: str
    messages: int
    accepted: int
    committed: int
    seconds: float
    rate: float
    """Committed messages per second."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    server_cpu_ms: float | None = None
    """Server CPU time (user + system, all threads) per committed message."""
    errors: list[str] = field(default_factory=list)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


# -- the message ---------------------------------------------------------------------


def message_body(size: int) -> bytes:
    """``size`` octets of 7-bit body text in 78-octet lines (no line starts with '.')."""
    line = b"Compte rendu de biologie, donnees de test sans personne reelle. 0123456789\r\n"
    repeated = (line * (size // len(line) + 1))[:size]
    if not repeated.endswith(b"\r\n"):
        repeated = repeated[:-2] + b"\r\n" if size >= 2 else b"\r\n"
    return repeated


def message(index: int, recipient: str, body: bytes) -> bytes:
    headers = (
        f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: bench {index}\r\n"
        f"Message-ID: <bench.{index}.{secrets.token_hex(4)}@{DOMAIN}>\r\n"
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    return headers.encode() + body + b".\r\n"


# -- the Python client ---------------------------------------------------------------


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        lines.append(line)
        if line[3:4] != b"-":
            break
    return int(line[:3]), b"".join(lines).decode(errors="replace").strip()


async def _expect(reader: asyncio.StreamReader, code: int, what: str) -> None:
    got, text = await _reply(reader)
    if got != code:
        raise RuntimeError(f"{what}: expected {code}, got {text!r}")


async def _session(
    port: int,
    tls: ssl.SSLContext | None,
    jobs: list[tuple[int, str]],
    body: bytes,
    start: asyncio.Event,
    ready: list[int],
    latencies: list[float],
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        await _expect(reader, 220, "greeting")
        writer.write(b"EHLO client.bench.mssd.test\r\n")
        await _expect(reader, 250, "EHLO")
        if tls is not None:
            writer.write(b"STARTTLS\r\n")
            await _expect(reader, 220, "STARTTLS")
            await writer.start_tls(tls, server_hostname="localhost")
            writer.write(b"EHLO client.bench.mssd.test\r\n")
            await _expect(reader, 250, "EHLO after STARTTLS")
        prepared = [
            (
                f"MAIL FROM:<{SENDER}>\r\n".encode(),
                f"RCPT TO:<{rcpt}>\r\n".encode(),
                message(index, rcpt, body),
            )
            for index, rcpt in jobs
        ]
        ready[0] += 1
        await start.wait()
        accepted = 0
        clock = time.monotonic
        for mail, rcpt, data in prepared:
            began = clock()
            writer.write(mail)
            await _expect(reader, 250, "MAIL")
            writer.write(rcpt)
            await _expect(reader, 250, "RCPT")
            writer.write(b"DATA\r\n")
            await _expect(reader, 354, "DATA")
            writer.write(data)
            await _expect(reader, 250, "end of data")
            latencies.append(clock() - began)
            accepted += 1
        writer.write(b"QUIT\r\n")
        with suppress(Exception):
            await asyncio.wait_for(_reply(reader), 5)
        return accepted
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()


def _client_process(
    port: int,
    ca_file: str | None,
    sessions: list[list[tuple[int, str]]],
    size: int,
    barrier: Any,
    queue: Any,
    timeout: float,
) -> None:
    """One client process: its sessions connect, wait for the barrier, then send."""

    async def main() -> dict[str, Any]:
        tls = None
        if ca_file is not None:
            tls = ssl.create_default_context(cafile=ca_file)
        body = message_body(size)
        start = asyncio.Event()
        latencies: list[float] = []
        ready = [0]
        tasks = [
            asyncio.create_task(_session(port, tls, jobs, body, start, ready, latencies))
            for jobs in sessions
        ]
        # Wait until every session is past EHLO (and STARTTLS), then start together.
        deadline = time.monotonic() + 60
        while ready[0] + sum(t.done() for t in tasks) < len(tasks):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.005)
        await asyncio.to_thread(barrier.wait)
        began = time.monotonic()
        start.set()
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        ended = time.monotonic()
        errors = [repr(t.exception()) for t in done if t.exception() is not None]
        if pending:
            errors.append(f"{len(pending)} session(s) timed out")
        accepted = sum(t.result() for t in done if t.exception() is None)
        return {
            "began": began,
            "ended": ended,
            "accepted": accepted,
            "latencies": latencies,
            "errors": errors,
        }

    try:
        queue.put(asyncio.run(main()))
    except BaseException as error:  # report, never hang the parent
        queue.put({"errors": [repr(error)], "accepted": 0, "latencies": []})


def python_client(
    port: int,
    *,
    tls_ca: Path | None,
    messages: int,
    connections: int,
    size: int,
    recipients: list[str],
    procs: int,
    timeout: float,
) -> tuple[int, float, list[float], list[str]]:
    """Returns (accepted, seconds from first MAIL to last 250, latencies, errors)."""
    sessions: list[list[tuple[int, str]]] = [[] for _ in range(connections)]
    for index in range(messages):
        sessions[index % connections].append((index, recipients[index % len(recipients)]))
    procs = max(1, min(procs, connections))
    shares: list[list[list[tuple[int, str]]]] = [sessions[p::procs] for p in range(procs)]
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(procs)
    queue = context.Queue()
    workers = [
        context.Process(
            target=_client_process,
            args=(port, str(tls_ca) if tls_ca else None, share, size, barrier, queue, timeout),
            daemon=True,
        )
        for share in shares
    ]
    for worker in workers:
        worker.start()
    reports = []
    try:
        for _ in workers:
            reports.append(queue.get(timeout=timeout + 60))
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    errors = [e for r in reports for e in r.get("errors", [])]
    accepted = sum(r["accepted"] for r in reports)
    latencies = sorted(x for r in reports for x in r["latencies"])
    began = [r["began"] for r in reports if "began" in r]
    ended = [r["ended"] for r in reports if "ended" in r]
    seconds = (max(ended) - min(began)) if began and ended else float("nan")
    return accepted, seconds, latencies, errors


# -- smtp-source -----------------------------------------------------------------------


def smtp_source_client(
    port: int, *, messages: int, connections: int, size: int, recipient: str, timeout: float
) -> tuple[int, float, list[str]]:
    program = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not Path(program).exists():
        raise SystemExit("smtp-source is not installed (Debian package postfix)")
    command = [
        program,
        "-d",  # one session per connection, messages sent back to back
        "-s", str(connections),
        "-m", str(messages),
        "-l", str(size),
        "-M", "client.bench.mssd.test",
        "-f", SENDER,
        "-t", recipient,
        f"127.0.0.1:{port}",
    ]  # fmt: skip
    began = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - began
    errors = []
    if done.returncode != 0:
        errors.append(f"smtp-source exit {done.returncode}: {(done.stderr or done.stdout)[-500:]}")
    # smtp-source aborts on the first non-2xx reply unless -A: success means all were accepted.
    return (messages if done.returncode == 0 else 0), seconds, errors


# -- store, server ------------------------------------------------------------------------


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@contextmanager
def fresh_store(backend: str, directory: Path, admin_url: str) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory / 'mssd.db'}"
        return
    import asyncpg

    name = f"mssd_bench_{secrets.token_hex(5)}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        base, _, _ = admin_url.rpartition("/")
        yield f"{base}/{name}"
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def mssd_env(url: str, workdir: Path, pki_dir: Path, plain: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSD_")}
    env.update(
        {
            "MSSD_STORE_URL": url,
            "MSSD_SERVER_VAR_DIR": str(workdir),
            "MSSD_SERVER_HOSTNAME": "mx.bench.mssd.test",
            "MSSD_PKI_DIRECTORY": str(pki_dir),
            "MSSD_SMTP_MTA_LISTEN": "127.0.0.1:0",
            "MSSD_SMTP_SUBMISSION_LISTEN": "127.0.0.1:0",
            "MSSD_SMTP_SUBMISSIONS_LISTEN": "127.0.0.1:0",
            "MSSD_SMTP_MTA_REQUIRE_TLS": "false" if plain else "true",
            # The load clients present no operator certificate: measure delivery, not the
            # trust-space check (tests/test_smtp_inbound.py covers it).
            "MSSD_SMTP_MTA_REQUIRE_CLIENT_CERT": "false",
            "MSSD_TLS_CERT_FILE": str(pki_dir / "server.pem"),
            "MSSD_TLS_KEY_FILE": str(pki_dir / "server.key"),
            "MSSD_TLS_CLIENT_CA_FILE": str(pki_dir / "ca-bundle.pem"),
            "MSSD_TLS_CRL_FILE": str(pki_dir / "crl.pem"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def mssd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mssd", *args]


def run_cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run(
        mssd_command(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"mssd {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


async def seed(url: str, recipients: list[str]) -> None:
    from mssd.store import admin
    from mssd.store.engine import create_engine

    engine = create_engine(url)
    try:
        await admin.add_domain(engine, DOMAIN, actor="bench")
        for number, address in enumerate([SENDER, *recipients]):
            idnat = f"8100000{number:04d}"
            idnat += str(number % 10)  # 12 characters: '8' + 11 digits
            await admin.create_mailbox(
                engine,
                address=address,
                bal_type="PER",
                owner_idnat=idnat,
                idnat_ps=idnat,
                actor="bench",
            )
    finally:
        await engine.dispose()


async def count_placements(url: str, recipients: list[str]) -> int:
    from sqlalchemy import func, select

    from mssd.store.engine import create_engine
    from mssd.store.schema import folders, mailboxes, placements

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            query = (
                select(func.count())
                .select_from(placements)
                .join(folders, folders.c.id == placements.c.folder_id)
                .join(mailboxes, mailboxes.c.id == folders.c.mailbox_id)
                .where(mailboxes.c.address.in_(recipients))
            )
            return int((await conn.execute(query)).scalar_one())
    finally:
        await engine.dispose()


class Server:
    def __init__(self, env: dict[str, str], workdir: Path, script: str | None = None) -> None:
        self.log = workdir / "mssd-serve.log"
        self._stderr = self.log.open("w")
        command = [sys.executable, script, "serve"] if script else mssd_command("serve")
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 60
        self.ports: dict[str, int] = {}
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if line.startswith(READY):
                listeners: dict[str, str] = json.loads(line[len(READY) :])
                self.ports = {k: int(v.rpartition(":")[2]) for k, v in listeners.items()}
                return
        self.stop()
        raise RuntimeError(f"mssd serve did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


def cpu_seconds(pid: int, ended_children: bool = False) -> float:
    """User + system CPU time of a process (Linux /proc), 0.0 where unavailable; with
    ``ended_children``, plus that of its children that ended and were waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    ticks = sum(int(value) for value in fields[11 : 15 if ended_children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def py_spy(pid: int, output: Path | None, gil: bool = False) -> Iterator[None]:
    """Sample the server with py-spy during the load (``--py-spy``)."""
    if output is None:
        yield
        return
    program = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    fmt = "speedscope" if output.suffix == ".json" else "flamegraph"
    if output.suffix == ".txt":
        fmt = "raw"
    spy = subprocess.Popen(
        [program, "record", "--pid", str(pid), "--rate", "200", "--format", fmt,
         "--threads", "-o", str(output), *(["--gil"] if gil else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)  # let it attach
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


# -- what a bench script does around its runs (relay_load.py shares it) ---------------------

Result = TypeVar("Result")


@contextmanager
def bench_directory(
    args: argparse.Namespace, prefix: str
) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """A temporary directory holding a development PKI (``mssd pki init``):
    ``(directory, PKI directory, environment of the mssd commands)``. Removed at the
    end, or kept and named on stderr with ``--keep``."""
    sys.path.insert(0, str(ROOT))
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        pki_dir = base / "pki"
        env = mssd_env("sqlite+aiosqlite:///unused.db", base, pki_dir, True)
        run_cli(env, base, "pki", "init", "--dir", str(pki_dir), "--hostname", "localhost")
        yield base, pki_dir, env
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def run_each(
    args: argparse.Namespace,
    one: Callable[[int], Result],
    progress: Callable[[Result], str | None],
) -> list[Result]:
    """Runs 1 to ``--runs``, each result's progress line on stderr as it ends
    (none with ``--json``, or when ``progress`` gives None)."""
    results: list[Result] = []
    for number in range(1, args.runs + 1):
        result = one(number)
        results.append(result)
        line = None if args.json else progress(result)
        if line is not None:
            print(line, file=sys.stderr, flush=True)
    return results


def print_rows(head: str, rows: list[tuple[str, list[str]]]) -> None:
    """A results table: the head, a rule, then each run's row followed by its errors."""
    print(head)
    print("-" * len(head))
    for row, errors in rows:
        print(row)
        for error in errors:
            print(f"       ! {error}")


def report(
    args: argparse.Namespace,
    results: list[Result],
    summary: dict[str, Any],
    print_table: Callable[[list[Result], dict[str, Any]], None],
) -> int:
    """The results as JSON (``--json``) or as the script's table; the exit status:
    0 when every run was good."""
    if args.json:
        print(json.dumps({"summary": summary, "runs": [asdict(r) for r in results]}, indent=2))
    elif results:
        print_table(results, summary)
    return 0 if summary["ok"] else 1


def add_pg_admin_url(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--pg-admin-url",
        default=os.environ.get("MSSD_BENCH_POSTGRES_URL", PG_ADMIN_URL),
        help=f"PostgreSQL database used to create and drop {what}",
    )


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--serve-script``, ``--json``, ``--keep``: what :func:`bench_directory`,
    :func:`run_each`, :func:`report` and :class:`Server` read."""
    p.add_argument("--serve-script", metavar="PY",
                   help="run `python PY serve` instead of `python -m mssd serve` "
                   "(to measure a patched server)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")


def check_counts(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.messages < 1 or args.connections < 1 or args.runs < 1 or args.size < 2:
        p.error("--messages, --connections, --runs must be positive, --size at least 2")


# -- one run ------------------------------------------------------------------------------


def one_run(args: argparse.Namespace, number: int, base: Path, pki_dir: Path) -> RunResult:
    workdir = base / f"run{number}"
    workdir.mkdir()
    recipients = [f"destinataire{i}@{DOMAIN}" for i in range(args.mailboxes)]
    mode = "plain" if args.plain else "tls"
    with fresh_store(args.backend, workdir, args.pg_admin_url) as url:
        env = mssd_env(url, workdir, pki_dir, args.plain)
        run_cli(env, workdir, "db", "upgrade")
        asyncio.run(seed(url, recipients))
        server = Server(env, workdir, args.serve_script)
        errors: list[str] = []
        latencies: list[float] = []
        try:
            port = server.ports["smtp_mta"]
            spy_out = None
            if args.py_spy:
                spy_out = Path(args.py_spy).with_stem(f"{Path(args.py_spy).stem}-run{number}")
            cpu_before = cpu_seconds(server.process.pid)
            with py_spy(server.process.pid, spy_out, args.py_spy_gil):
                if args.client == "smtp-source":
                    accepted, seconds, errors = smtp_source_client(
                        port,
                        messages=args.messages,
                        connections=args.connections,
                        size=args.size,
                        recipient=recipients[0],
                        timeout=args.timeout,
                    )
                else:
                    accepted, seconds, latencies, errors = python_client(
                        port,
                        tls_ca=None if args.plain else pki_dir / "ca-bundle.pem",
                        messages=args.messages,
                        connections=args.connections,
                        size=args.size,
                        recipients=recipients,
                        procs=args.client_procs,
                        timeout=args.timeout,
                    )
            cpu = cpu_seconds(server.process.pid) - cpu_before
            committed = asyncio.run(count_placements(url, recipients))
        finally:
            server.stop()
        log_text = server.log.read_text(errors="replace")
        problems = [line for line in log_text.splitlines() if re.search(r"ERROR|Traceback", line)]
        errors += problems[:5]
    result = RunResult(
        run=number,
        client=args.client,
        backend=args.backend,
        mode=mode,
        messages=args.messages,
        accepted=accepted,
        committed=committed,
        seconds=seconds,
        rate=committed / seconds if seconds > 0 else 0.0,
        server_cpu_ms=cpu * 1000 / committed if committed else None,
        errors=errors,
    )
    if latencies:
        result.p50_ms = percentile(latencies, 0.50) * 1000
        result.p99_ms = percentile(latencies, 0.99) * 1000
        result.max_ms = latencies[-1] * 1000
    if committed != args.messages:
        result.errors.append(f"store holds {committed} placements, expected {args.messages}")
    return result


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: list[RunResult], summary: dict[str, Any]) -> None:
    head = f"{'run':>6} {'backend':<10} {'mode':<5} {'client':<11} {'committed':>9} "
    head += f"{'seconds':>8} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'cpu ms':>7}"
    rows = [
        (
            f"{r.run:>6} {r.backend:<10} {r.mode:<5} {r.client:<11} "
            f"{r.committed:>4}/{r.messages:<4} {r.seconds:>8.2f} {r.rate:>8.1f} "
            f"{fmt(r.p50_ms):>8} {fmt(r.p99_ms):>8} {fmt(r.max_ms):>8} "
            f"{fmt(r.server_cpu_ms, 2):>7}",
            r.errors,
        )
        for r in results
    ]
    print_rows(head, rows)
    print(
        f"{'median':>6} {results[0].backend:<10} {results[0].mode:<5} {results[0].client:<11} "
        f"{'':>9} {'':>8} {summary['rate']:>8.1f} {fmt(summary['p50_ms']):>8} "
        f"{fmt(summary['p99_ms']):>8}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plain", action="store_true", help="plaintext MTA port (default)")
    mode.add_argument("--tls", action="store_true", help="STARTTLS on the MTA port")
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--size", type=int, default=4096, help="body octets per message")
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--client", choices=("smtp-source", "python"), default=None,
                   help="default: smtp-source for --plain, python for --tls")  # fmt: skip
    p.add_argument("--client-procs", type=int, default=2,
                   help="processes of the python client (default 2)")  # fmt: skip
    p.add_argument("--mailboxes", type=int, default=4, help="recipient mailboxes")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="per-run load time limit")
    add_pg_admin_url(p, "the bench database")
    p.add_argument("--py-spy", metavar="FILE",
                   help="record the server with py-spy (.svg flamegraph, .json speedscope, "
                   ".txt collapsed stacks); one file per run")  # fmt: skip
    p.add_argument("--py-spy-gil", action="store_true",
                   help="with --py-spy: only samples holding the GIL")  # fmt: skip
    add_run_options(p)
    args = p.parse_args(argv)
    args.plain = not args.tls
    if args.client is None:
        args.client = "smtp-source" if args.plain else "python"
    if args.client == "smtp-source" and not args.plain:
        p.error("smtp-source cannot do STARTTLS: use --client python with --tls")
    check_counts(p, args)
    return args


def progress_line(result: RunResult) -> str:
    return (
        f"run {result.run}: {result.committed}/{result.messages} committed in "
        f"{result.seconds:.2f} s = {result.rate:.1f} msg/s"
        + (f", p50 {result.p50_ms:.1f} ms p99 {result.p99_ms:.1f} ms"
           if result.p50_ms is not None and result.p99_ms is not None else "")
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with bench_directory(args, "mssd-bench-") as (base, pki_dir, _):
        results = run_each(args, lambda n: one_run(args, n, base, pki_dir), progress_line)
    p50s = [r.p50_ms for r in results if r.p50_ms is not None]
    p99s = [r.p99_ms for r in results if r.p99_ms is not None]
    summary = {
        "backend": args.backend,
        "mode": "plain" if args.plain else "tls",
        "client": args.client,
        "messages": args.messages,
        "size": args.size,
        "connections": args.connections,
        "runs": len(results),
        "rate": statistics.median(r.rate for r in results),
        "p50_ms": statistics.median(p50s) if p50s else None,
        "p99_ms": statistics.median(p99s) if p99s else None,
        "ok": all(not r.errors for r in results),
    }
    return report(args, results, summary, print_table)


if __name__ == "__main__":
    sys.exit(main())
