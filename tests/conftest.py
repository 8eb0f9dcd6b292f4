"""Shared test fixtures: a development PKI, a store on each backend, and mssd
started for real as a subprocess on ephemeral loopback ports.

Tests that need something absent (PostgreSQL, swaks, smtp-source...) skip with
the reason; with ``MSSD_REQUIRE_ALL=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import secrets
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from server_processes import find_program

from mssd.auth.passwords import hash_password
from mssd.config import AuthSettings
from mssd.store import admin
from mssd.store.delivery import NewMessage, RecipientRecord, new_envelope_id
from mssd.store.engine import create_engine, upgrade
from mssd.trust import pki
from mssd.trust.identity import normalise_dn

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
REQUIRE_ALL = os.environ.get("MSSD_REQUIRE_ALL") == "1"
TEST_AUTH = AuthSettings(scrypt_n=1024)
PASSWORD = "correct horse battery staple"


@asynccontextmanager
async def loop_ticks(interval: float) -> AsyncIterator[list[int]]:
    """``[n]``: how many times a task sleeping ``interval`` in a loop woke up while
    the body ran, to show that something the body awaits leaves the event loop
    free (a body that blocks the loop gives it no turn)."""
    ticks = [0]

    async def tick() -> None:
        while True:
            await asyncio.sleep(interval)
            ticks[0] += 1

    task = asyncio.create_task(tick())
    try:
        yield ticks
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def unavailable(reason: str) -> None:
    """Skip, or fail when CI requires every test to run."""
    if REQUIRE_ALL:
        pytest.fail(f"required but unavailable (MSSD_REQUIRE_ALL=1): {reason}")
    pytest.skip(reason)


def require_program(name: str) -> str:
    path = find_program(name)
    if path is None:
        unavailable(f"{name} is not installed")
    assert path is not None
    return path


# -- PostgreSQL ----------------------------------------------------------------


def _postgres_admin_url() -> str | None:
    url = os.environ.get("MSSD_TEST_POSTGRES_URL")
    if url:
        return url
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    except OSError:
        return None


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def create_postgres_database() -> tuple[str, str]:
    """A fresh, empty database: returns (its URL, its name)."""
    admin_url = _postgres_admin_url()
    if admin_url is None:
        unavailable("no PostgreSQL: set MSSD_TEST_POSTGRES_URL or run one on 127.0.0.1:5432")
    assert admin_url is not None
    import asyncpg

    name = f"mssd_test_{secrets.token_hex(6)}"

    async def create() -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    try:
        asyncio.run(create())
    except (OSError, asyncpg.PostgresError) as error:
        unavailable(f"PostgreSQL at {admin_url} refused to create a database: {error}")
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}", name


def drop_postgres_database(name: str) -> None:
    admin_url = _postgres_admin_url()
    assert admin_url is not None
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store on each backend (function scope)."""
    yield from store_url_for(request.param, tmp_path)


def store_url_for(backend: str, directory: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory / 'mssd.db'}"
        return
    url, name = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(name)


# -- PKI -----------------------------------------------------------------------


@dataclass(frozen=True)
class PkiBundle:
    dev: pki.DevPki
    personal: pki.IssuedCertificate
    app: pki.IssuedCertificate
    stranger: pki.IssuedCertificate
    """A personal certificate whose idNat_PS has no account."""

    def client_context(self, cert: pki.IssuedCertificate | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.dev.ca_bundle))
        if cert is not None:
            context.load_cert_chain(str(cert.cert), str(cert.key))
        return context


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiBundle:
    dev = pki.init_dev_pki(tmp_path_factory.mktemp("pki"), hostnames=["localhost"])
    personal = pki.issue_personal_certificate(
        dev,
        idnat_ps=PER_IDNAT,
        surname="DUPONT",
        given_name="Jeanne",
        profession="Médecin",
        name="jeanne",
    )
    app = pki.issue_app_certificate(
        dev,
        common_name="labo.hopital.mssd.test",
        idnat_struct=STRUCTURE,
        organisation="Laboratoire de test",
        name="labo",
    )
    stranger = pki.issue_personal_certificate(
        dev,
        idnat_ps="810009999999",
        surname="INCONNU",
        given_name="Pierre",
        profession="Infirmier",
        name="stranger",
    )
    return PkiBundle(dev, personal, app, stranger)


# -- the standard test population ----------------------------------------------

DOMAIN = "hopital.mssd.test"
PER = f"jeanne.dupont@{DOMAIN}"
PER_IDNAT = "810000000011"
PER2 = f"paul.durand@{DOMAIN}"
PER2_IDNAT = "810000000029"
ORG = f"accueil@{DOMAIN}"
APP = f"labo@{DOMAIN}"
SUSPENDED = f"suspendu@{DOMAIN}"
CLOSED = f"ferme@{DOMAIN}"
STRUCTURE = "1750000000"


def new_message(
    content: bytes, recipients: Iterable[RecipientRecord], *, mail_from: str = PER, **fields: Any
) -> NewMessage:
    """A submitted message as the group committer takes it (``fields``: the envelope's
    other attributes, e.g. ``dsn_ret``)."""
    return NewMessage(
        envelope_id=new_envelope_id(),
        content=content,
        sha256=hashlib.sha256(content).hexdigest(),
        mail_from=mail_from,
        recipients=tuple(recipients),
        source="submission",
        remote="127.0.0.1",
        received_at=dt.datetime.now(dt.UTC),
        **fields,
    )


@pytest.fixture(scope="session")
def peer_identity(test_pki: PkiBundle) -> Any:
    """The operator certificate of the scripted SMTP peers (``scripted_peer.py``)."""
    from scripted_peer import make_peer_identity

    return make_peer_identity(test_pki)


async def seed(url: str, test_pki: PkiBundle) -> None:
    """Create the schema and the standard population through the admin API."""
    engine = create_engine(url)
    try:
        await upgrade(engine)
        hashed = hash_password(PASSWORD, TEST_AUTH)
        await admin.add_domain(engine, DOMAIN, actor="test")
        await admin.create_mailbox(
            engine,
            address=PER,
            bal_type="PER",
            owner_idnat=PER_IDNAT,
            idnat_ps=PER_IDNAT,
            password_hash=hashed,
            actor="test",
        )
        await admin.create_mailbox(
            engine,
            address=PER2,
            bal_type="PER",
            owner_idnat=PER2_IDNAT,
            idnat_ps=PER2_IDNAT,
            password_hash=hashed,
            actor="test",
        )
        await admin.create_mailbox(
            engine, address=ORG, bal_type="ORG", owner_idnat=STRUCTURE, actor="test"
        )
        await admin.create_mailbox(
            engine,
            address=APP,
            bal_type="APP",
            owner_idnat=STRUCTURE,
            cert_dn=normalise_dn(test_pki.app.subject_dn),
            actor="test",
        )
        for address, idnat, status in (
            (SUSPENDED, "810000000037", "suspended"),
            (CLOSED, "810000000045", "closed"),
        ):
            await admin.create_mailbox(
                engine,
                address=address,
                bal_type="PER",
                owner_idnat=idnat,
                idnat_ps=idnat,
                password_hash=hashed,
                actor="test",
            )
            await admin.set_mailbox_status(engine, address, status, actor="test")  # type: ignore[arg-type]
        await admin.grant(engine, ORG, PER, rights="lrswipte", may_send=True, actor="test")
        await admin.grant(engine, ORG, PER2, rights="lr", may_send=False, actor="test")
    finally:
        await engine.dispose()


# -- the MSSanté whitelist -------------------------------------------------------

OTHER_OPERATOR_DOMAIN = "autre-operateur.mssd.test"
"""A domain of another operator, whitelisted for ``test_pki.app`` in mssd test servers."""


def write_whitelist(path: Path, domains: dict[str, list[str]], *, close_root: bool = True) -> Path:
    """A whitelist in the ANS format (``listeblanchemssante.xml``) for the given domains."""
    from xml.sax.saxutils import escape

    entries = "".join(
        f"<Domaine><Nom>{escape(name)}</Nom><Description>test</Description>"
        + "".join(f"<DNCertificatOperateur>{escape(dn)}</DNCertificatOperateur>" for dn in dns)
        + "</Domaine>"
        for name, dns in domains.items()
    )
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListeBlancheMSSante xmlns="https://listeblanche.mssante.fr/schema">'
        f"<DateDeGeneration>2026-01-01T00:00:00Z</DateDeGeneration><ListeDomaines>{entries}"
        "</ListeDomaines>" + ("</ListeBlancheMSSante>" if close_root else ""),
        encoding="utf-8",
    )
    return path


# -- mssd as a real process ------------------------------------------------------


@dataclass
class MssdProcess:
    """``mssd serve`` in a subprocess; ``ports`` comes from its ready line."""

    url: str
    pki: PkiBundle
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None
    ports: dict[str, int] = field(default_factory=dict)
    log: Path | None = None
    _stderr: Any = None

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("MSSD_") or k.startswith("MSSD_TEST_") or k == "MSSD_REQUIRE_ALL"
        }
        env.update(
            {
                "MSSD_STORE_URL": self.url,
                "MSSD_SERVER_VAR_DIR": str(self.workdir),
                "MSSD_SMTP_MTA_LISTEN": "127.0.0.1:0",
                "MSSD_SMTP_SUBMISSION_LISTEN": "127.0.0.1:0",
                "MSSD_SMTP_SUBMISSIONS_LISTEN": "127.0.0.1:0",
                "MSSD_IMAP_IMAP_LISTEN": "127.0.0.1:0",
                "MSSD_IMAP_IMAPS_LISTEN": "127.0.0.1:0",
                "MSSD_TLS_CERT_FILE": str(self.pki.dev.server_cert),
                "MSSD_TLS_KEY_FILE": str(self.pki.dev.server_key),
                "MSSD_TLS_CLIENT_CA_FILE": str(self.pki.dev.ca_bundle),
                "MSSD_TLS_CRL_FILE": str(self.pki.dev.crl),
                "MSSD_AUTH_SCRYPT_N": "1024",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> MssdProcess:
        if "MSSD_WHITELIST_SOURCE" not in self.extra_env:
            # Port 25 accepts only whitelisted operators: the test PKI's organisation
            # certificate stands for another operator.
            source = write_whitelist(
                self.workdir / "test-whitelist.xml",
                {OTHER_OPERATOR_DOMAIN: [self.pki.app.subject_dn]},
            )
            self.extra_env["MSSD_WHITELIST_SOURCE"] = str(source)
        self.log = self.workdir / f"mssd-{time.monotonic_ns()}.log"
        self._stderr = stderr = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mssd", "serve"],
            cwd=self.workdir,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if line.startswith("mssd ready "):
                addresses: dict[str, str] = json.loads(line[len("mssd ready ") :])
                self.ports = {k: int(v.rpartition(":")[2]) for k, v in addresses.items()}
                return self
        self.stop()
        raise RuntimeError(f"mssd did not start:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self.process = None
        return code

    @property
    def submission(self) -> int:
        return self.ports["smtp_submission"]

    @property
    def submissions(self) -> int:
        return self.ports["smtp_submissions"]

    @property
    def mta(self) -> int:
        return self.ports["smtp_mta"]

    @property
    def imap(self) -> int:
        return self.ports["imap"]

    @property
    def imaps(self) -> int:
        return self.ports["imaps"]

    def smtp(
        self,
        *,
        login: str | None = PER,
        password: str = PASSWORD,
        cert: pki.IssuedCertificate | None = None,
    ) -> smtplib.SMTP:
        """A submission session on 587 after STARTTLS (and AUTH PLAIN if login)."""
        client = smtplib.SMTP("127.0.0.1", self.submission, timeout=30)
        client.starttls(context=self.pki.client_context(cert))
        client.ehlo("client.mssd.test")
        if login is not None:
            client.login(login, password)
        return client


def start_mssd(url: str, test_pki: PkiBundle, workdir: Path, **extra_env: str) -> MssdProcess:
    return MssdProcess(url, test_pki, workdir, extra_env=dict(extra_env)).start()


def serve_seeded(
    url: str, test_pki: PkiBundle, workdir: Path, **extra_env: str
) -> Iterator[MssdProcess]:
    """For fixtures: the standard population, mssd started with extra settings."""
    run(seed(url, test_pki))
    server = start_mssd(url, test_pki, workdir, **extra_env)
    try:
        yield server
    finally:
        server.stop()


async def _inbox(url: str, address: str) -> list[tuple[int, bytes]]:
    from mssd.store.messages import list_messages, read_blob

    engine = create_engine(url)
    try:
        messages = await list_messages(engine, address, folder="INBOX")
        return [(m.uid, await read_blob(engine, m.sha256)) for m in messages]
    finally:
        await engine.dispose()


def inbox(server: MssdProcess, address: str) -> list[tuple[int, bytes]]:
    """(UID, stored bytes) of every message in a mailbox's INBOX."""
    return list(run(_inbox(server.url, address)))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mssd(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[MssdProcess]:
    """mssd serving the standard population, once per module and backend."""
    workdir = tmp_path_factory.mktemp(f"mssd-{request.param}")
    for url in store_url_for(request.param, workdir):
        asyncio.run(seed(url, test_pki))
        server = start_mssd(url, test_pki, workdir)
        try:
            yield server
        finally:
            server.stop()


def run(coro: Any) -> Any:
    """Run a coroutine from a synchronous test."""
    return asyncio.run(coro)
