"""Operators of a test trust space: each a real ``mssd serve`` with its own domain, store
and server certificate from the development PKI, reaching the others by static routes."""

from __future__ import annotations

import secrets
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import PASSWORD, TEST_AUTH, MssdProcess, PkiBundle, inbox, run, write_whitelist
from server_processes import free_port

from mssd.auth.passwords import hash_password
from mssd.store import admin, queue
from mssd.store.engine import create_engine, upgrade
from mssd.trust import pki


@dataclass
class Operator:
    name: str
    domain: str
    structure: str
    cert: pki.IssuedCertificate
    mta_port: int = field(default_factory=free_port)

    @property
    def host(self) -> str:
        return f"mx.{self.domain}"

    @property
    def dn(self) -> str:
        return self.cert.subject_dn

    def user(self, local: str = "docteur") -> str:
        return f"{local}@{self.domain}"

    def route(self) -> str:
        return f"{self.domain}=127.0.0.1:{self.mta_port}"


def make_operator(
    dev: pki.DevPki, name: str, domain: str, structure: str, tag: str = ""
) -> Operator:
    cert = pki.issue_server_certificate(
        dev,
        common_name=f"mx.{domain}",
        idnat_struct=structure,
        organisation=f"Operateur {name}",
        name=f"relay-{name}-{domain}-{tag}-{secrets.token_hex(3)}",
    )
    return Operator(name, domain, structure, cert)


async def seed_operator(url: str, operator: Operator, users: tuple[str, ...]) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine)
        await admin.add_domain(engine, operator.domain, actor="test")
        hashed = hash_password(PASSWORD, TEST_AUTH)
        for index, local in enumerate(users):
            idnat = f"8100{abs(hash((operator.domain, local))) % 10**8:08d}"
            await admin.create_mailbox(
                engine,
                address=operator.user(local),
                bal_type="PER",
                owner_idnat=idnat,
                idnat_ps=idnat,
                password_hash=hashed,
                actor="test",
                display_name=f"user {index}",
            )
    finally:
        await engine.dispose()


def start_operator(
    operator: Operator,
    url: str,
    test_pki: PkiBundle,
    workdir: Path,
    *,
    whitelisted: list[Operator],
    routes: list[Operator],
    **extra: str,
) -> MssdProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    whitelist = write_whitelist(
        workdir / "listeblanchemssante.xml", {o.domain: [o.dn] for o in whitelisted}
    )
    env = {
        "MSSD_SERVER_HOSTNAME": operator.host,
        "MSSD_SMTP_MTA_LISTEN": f"127.0.0.1:{operator.mta_port}",
        "MSSD_TLS_CERT_FILE": str(operator.cert.cert),
        "MSSD_TLS_KEY_FILE": str(operator.cert.key),
        "MSSD_TLS_OPERATOR_CA_FILE": str(test_pki.dev.org_ca),
        "MSSD_WHITELIST_SOURCE": str(whitelist),
        "MSSD_RELAY_ROUTES": ",".join(o.route() for o in routes),
        "MSSD_RELAY_POLL_SECONDS": "0.3",
        "MSSD_RELAY_RETRY_BASE_SECONDS": "0.5",
        "MSSD_RELAY_RETRY_MAX_SECONDS": "1",
        "MSSD_RELAY_CONNECT_TIMEOUT_SECONDS": "5",
        "MSSD_RELAY_COMMAND_TIMEOUT_SECONDS": "20",
        "MSSD_DKIM_VERIFY_INBOUND": "false",
    }
    env.update(extra)
    return MssdProcess(url, test_pki, workdir, extra_env=env).start()


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.2)


def messages(server: MssdProcess, address: str) -> list[bytes]:
    return [data for _, data in inbox(server, address)]


def wait_messages(
    server: MssdProcess, address: str, count: int, timeout: float = 30.0
) -> list[bytes]:
    return list(
        wait_for(
            lambda: (found := messages(server, address)) and len(found) >= count and found,
            timeout,
            f"{count} message(s) in {address}",
        )
    )


def queue_entries(
    server: MssdProcess, states: tuple[str, ...] = queue.PENDING, limit: int = 100
) -> list[Any]:
    async def read() -> list[Any]:
        engine = create_engine(server.url)
        try:
            return await queue.list_entries(engine, states=states, limit=limit)
        finally:
            await engine.dispose()

    return list(run(read()))


def queue_contents(
    server: MssdProcess, states: tuple[str, ...], limit: int = 10_000
) -> list[bytes]:
    """The messages of the queue entries in ``states`` (one per entry)."""

    async def read() -> list[bytes]:
        engine = create_engine(server.url)
        try:
            entries = await queue.list_entries(engine, states=states, limit=limit)
            return [await queue.read_content(engine, e.blob_sha256) for e in entries]
        finally:
            await engine.dispose()

    return list(run(read()))


def queue_counts(server: MssdProcess) -> dict[str, int]:
    """Queue entries by state (queued, sending, delivered, failed)."""

    async def read() -> dict[str, int]:
        engine = create_engine(server.url)
        try:
            return await queue.count_by_state(engine)
        finally:
            await engine.dispose()

    return dict(run(read()))


def inbox_count(server: MssdProcess, address: str) -> int:
    """How many messages a mailbox's INBOX holds (placements only, no blob read)."""
    from mssd.store.messages import list_messages

    async def read() -> int:
        engine = create_engine(server.url)
        try:
            return len(await list_messages(engine, address, folder="INBOX"))
        finally:
            await engine.dispose()

    return int(run(read()))


def submission(server: MssdProcess, login: str) -> smtplib.SMTP:
    """A submission session as ``login``; the server presents its operator certificate,
    whose name is its host name, not 127.0.0.1."""
    context = ssl.create_default_context(cafile=str(server.pki.dev.ca_bundle))
    context.check_hostname = False
    client = smtplib.SMTP("127.0.0.1", server.submission, timeout=30)
    client.starttls(context=context)
    client.ehlo("client.mssd.test")
    client.login(login, PASSWORD)
    return client


def submit(
    server: MssdProcess,
    sender: str,
    recipients: list[tuple[str, str]],
    body: bytes,
    mail_params: str = "",
) -> tuple[int, bytes]:
    """Submit on 587: ``recipients`` as (address, RCPT parameters); the final reply."""
    with submission(server, sender) as client:
        code, text = client.docmd("MAIL", f"FROM:<{sender}> {mail_params}".strip())
        assert code == 250, text
        for address, params in recipients:
            code, text = client.docmd("RCPT", f"TO:<{address}> {params}".strip())
            assert code == 250, (address, code, text)
        assert client.docmd("DATA")[0] == 354
        data = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        client.send(data.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")  # RFC 5321 §4.5.2
        return client.getreply()


def submit_many(
    server: MssdProcess, sender: str, recipient: str, bodies: list[bytes], sessions: int = 4
) -> None:
    """Submit every body on 587 as its own message, ``sessions`` sessions in parallel, each
    sending its share back to back; every one must be accepted."""

    def share(part: list[bytes]) -> None:
        with submission(server, sender) as client:
            for body in part:
                refused = client.sendmail(sender, [recipient], body)
                assert not refused, refused

    with ThreadPoolExecutor(sessions) as pool:
        for done in [pool.submit(share, bodies[n::sessions]) for n in range(sessions)]:
            done.result()


def stop_all(servers: list[MssdProcess]) -> Iterator[None]:
    try:
        yield
    finally:
        for server in servers:
            server.stop()
