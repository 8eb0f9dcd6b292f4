"""Wiring: builds the services from the settings and runs the listeners.

One asyncio loop per process. Nothing here holds state that correctness
depends on: a second mssd process on the same PostgreSQL serves the same data.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.annuaire.cache import CachePurger
from mssd.auth import Authenticator, PscTokenVerifier
from mssd.auth.ratelimit import CHANNEL as FAILURE_CHANNEL
from mssd.config import Settings, dkim_key_dir, operator_ca_file, whitelist_cache_file
from mssd.delivery import DeliveryPipeline
from mssd.delivery.dkim import DkimSigner, DkimVerifier, make_dns_function, read_txt_records
from mssd.delivery.dsn import Reporter
from mssd.delivery.local_reports import OwedReports
from mssd.delivery.whitelist import WhitelistKeeper
from mssd.imap.facts import FactCache
from mssd.imap.heads import HeadCache
from mssd.imap.server import ImapListener, imap_addresses, start_imap
from mssd.imap.session import Services as ImapServices
from mssd.smtp.inbound import InboundTrustCheck, own_certificate_dn
from mssd.smtp.listeners import Listener, start_smtp
from mssd.smtp.relay import RelayWorker
from mssd.store.accounts import StoreAccounts
from mssd.store.changes import ChangeBus
from mssd.store.delivery import GroupCommitter, StoredMessage
from mssd.store.engine import check_schema, create_engine, dispose
from mssd.store.mailstore import MailStore
from mssd.trust.tls import TlsConfigError, server_context
from mssd.trust.verify import TrustFiles
from mssd.workers import (
    READY_LINE,
    Workers,
    bind_listening_socket,
    watch_parent,
    worker_sockets,
)

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    accounts: StoreAccounts
    authenticator: Authenticator
    committer: GroupCommitter
    pipeline: DeliveryPipeline
    tls: ssl.SSLContext
    mailstore: MailStore
    bus: ChangeBus
    whitelist: WhitelistKeeper | None = None
    mta_tls: ssl.SSLContext | None = None
    relay: RelayWorker | None = None
    reporter: Reporter | None = None
    cache_purger: CachePurger | None = None
    owed_reports: OwedReports | None = None

    def after_commit(self, stored: Sequence[StoredMessage]) -> None:
        """Change notifications for IMAP; a wake-up for the relay when mail was queued."""
        self.bus.notify_stored(stored)
        if self.relay is not None and any(message.queued for message in stored):
            self.relay.wake()

    async def close(self) -> None:
        if self.cache_purger is not None:
            await self.cache_purger.stop()
        if self.owed_reports is not None:
            await self.owed_reports.stop()
        if self.relay is not None:
            await self.relay.stop()
        if self.whitelist is not None:
            await self.whitelist.stop()
        await self.authenticator.close()  # its last audit events go through the committer
        await self.committer.stop()
        await self.bus.stop()
        await dispose(self.engine)


def event_loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop ``mssd serve`` runs on: uvloop roughly doubles what one process
    delivers per second (bench/README.md); the standard loop stays available."""
    if settings.server.event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if settings.server.event_loop == "uvloop":
            raise RuntimeError("server.event_loop is uvloop but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def tls_context(settings: Settings) -> ssl.SSLContext:
    return server_context(
        settings.tls.cert_file,
        settings.tls.key_file,
        client_ca_file=settings.tls.client_ca_file,
        crl_file=settings.tls.crl_file,
    )


def mta_tls_context(settings: Settings) -> ssl.SSLContext:
    """Port 25: the handshake checks the chain only; revocation and the issuing CA are
    checked at MAIL (``mssd.smtp.inbound``), where the refusal can say why. Nothing but
    EHLO, NOOP, RSET and a non-disclosing VRFY is possible before MAIL on this port."""
    return server_context(
        settings.tls.cert_file, settings.tls.key_file, client_ca_file=settings.tls.client_ca_file
    )


async def add_trust_space(
    settings: Settings, engine: AsyncEngine, pipeline: DeliveryPipeline
) -> WhitelistKeeper:
    """Load the whitelist and put the port 25 trust-space policy in the pipeline."""
    keeper = WhitelistKeeper(engine, settings.whitelist, whitelist_cache_file(settings))
    await keeper.load()
    # Submission relays to the domains of the list in force (and refuses the others).
    pipeline.set_trust_space(lambda: keeper.current)
    if keeper.current is None and settings.whitelist.source:
        # No list was ever kept: fetch one before accepting operators, not an hour later.
        await keeper.refresh()
    trust = await asyncio.to_thread(TrustFiles, operator_ca_file(settings), settings.tls.crl_file)
    try:
        own_dn = own_certificate_dn(settings.tls.cert_file)
    except (OSError, ValueError) as error:
        raise TlsConfigError(
            f"cannot read the server certificate {settings.tls.cert_file}: {error}"
        ) from None
    pipeline.add_check(
        InboundTrustCheck(
            whitelist=lambda: keeper.current,
            trust=trust,
            local_domains=pipeline.local_domains,
            own_dn=own_dn,
            require_certificate=settings.smtp.mta_require_client_cert,
        )
    )
    return keeper


def add_relay(settings: Settings, services: Services) -> None:
    """Delivery reports, and the relay worker (started by :func:`serve`)."""
    keeper = services.whitelist
    assert keeper is not None
    services.reporter = Reporter(
        services.accounts,
        hostname=settings.server.hostname,
        trust_space=lambda: keeper.current,
    )
    services.pipeline.set_reporter(services.reporter)
    if settings.dkim.verify_inbound:
        records = read_txt_records(settings.dkim.txt_records_file)
        timeout = settings.dkim.dns_timeout_seconds
        verifier = DkimVerifier(
            settings.server.hostname,
            make_dns_function(records, use_dns=True, timeout=timeout),
            timeout=timeout,
        )
        services.pipeline.set_inbound_authentication(verifier.header_async)
    if not settings.relay.enabled:
        return
    signer = DkimSigner(dkim_key_dir(settings), settings.dkim.selector)
    services.relay = RelayWorker(
        services.engine,
        settings,
        whitelist=lambda: keeper.current,
        reporter=services.reporter,
        on_stored=services.after_commit,
        signer=signer if settings.dkim.sign else None,
    )


async def open_store(settings: Settings) -> tuple[AsyncEngine, ssl.SSLContext]:
    """The store (schema checked) and the server TLS context."""
    engine = create_engine(settings.store.url, echo=settings.store.echo_sql)
    try:
        await check_schema(engine)
        return engine, tls_context(settings)
    except Exception:
        await engine.dispose()
        raise


async def authenticator_for(
    settings: Settings, accounts: StoreAccounts, committer: GroupCommitter, bus: ChangeBus
) -> Authenticator:
    psc = PscTokenVerifier(settings.auth) if settings.auth.psc_issuer else None
    # Authentication outcomes are audited through the committer (group commit).
    authenticator = Authenticator(settings.auth, accounts, committer, psc=psc)
    if bus.crosses_processes:
        # Failure limits count every process's failures (mssd.auth.ratelimit).
        limiter = authenticator.limiter
        limiter.share(functools.partial(bus.post, FAILURE_CHANNEL))
        await bus.listen(FAILURE_CHANNEL, limiter.receive)
    return authenticator


def imap_services_for(
    settings: Settings,
    authenticator: Authenticator,
    mailstore: MailStore,
    bus: ChangeBus,
    committer: GroupCommitter,
) -> ImapServices:
    return ImapServices(
        authenticator=authenticator,
        mailstore=mailstore,
        bus=bus,
        audit=committer,
        append_limit=settings.imap.append_limit,
        heads=HeadCache(settings.imap.header_cache_bytes),
        facts=FactCache(settings.imap.fact_cache_entries),
    )


async def build_services(settings: Settings) -> Services:
    engine, tls = await open_store(settings)
    accounts = StoreAccounts(engine)
    # One writer per process: concurrent writers would queue on the same INBOX row
    # locks and pay one commit each; one writer batches them (bench/README.md:
    # PostgreSQL 855 -> 1170 msg/s). Several processes still write concurrently.
    # With IMAP workers on SQLite, this process links them (mssd.workers).
    bus = ChangeBus(engine, hub=settings.imap.workers > 1)
    await bus.start()
    services_holder: list[Services] = []
    committer = GroupCommitter(
        engine,
        max_batch=settings.store.group_commit_max_batch,
        on_commit=lambda stored: services_holder[0].after_commit(stored),
    )
    committer.start()
    mailstore = MailStore(engine, on_change=bus.notify)
    authenticator = await authenticator_for(settings, accounts, committer, bus)
    pipeline = DeliveryPipeline(accounts, committer, hostname=settings.server.hostname)
    services = Services(
        settings, engine, accounts, authenticator, committer, pipeline, tls, mailstore, bus
    )
    services_holder.append(services)
    try:
        services.mta_tls = mta_tls_context(settings)
        services.whitelist = await add_trust_space(settings, engine, pipeline)
        add_relay(settings, services)
    except BaseException:
        await services.close()
        raise
    return services


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(
    settings: Settings,
    *,
    announce: Callable[[str], None] = print,
    worker_command: Sequence[str] = (),
) -> None:
    """Run until SIGTERM or SIGINT, then stop accepting, finish commits, exit.
    With ``imap.workers`` > 1, ``worker_command`` (how to run ``mssd`` with the
    same configuration) starts the other IMAP processes (``mssd.workers``)."""
    services = await build_services(settings)
    listeners: list[Listener] = []
    imap_listeners: list[ImapListener] = []
    workers: Workers | None = None
    try:
        listeners = await start_smtp(
            settings,
            services.pipeline,
            services.authenticator,
            services.tls,
            mta_tls=services.mta_tls,
        )
        if services.whitelist is not None:
            services.whitelist.start()
        if services.relay is not None:
            services.relay.start()
        services.cache_purger = CachePurger(services.engine, settings.annuaire.cache_purge_seconds)
        services.cache_purger.start()
        if services.reporter is not None:
            # Reports a crash left owed (mssd.delivery.local_reports): now, then every minute.
            services.owed_reports = OwedReports(
                services.engine,
                services.committer,
                services.reporter,
                hostname=settings.server.hostname,
            )
            services.owed_reports.start()
        imap_services = imap_services_for(
            settings, services.authenticator, services.mailstore, services.bus, services.committer
        )
        sockets = None
        if settings.imap.workers > 1:
            sockets = {
                name: bind_listening_socket(name, address)
                for name, address in imap_addresses(settings)
            }
        imap_listeners = await start_imap(settings, imap_services, services.tls, sockets=sockets)
        if sockets:
            hub = services.bus if services.bus.hub else None
            workers = Workers(worker_command, sockets, settings.imap.workers - 1, hub=hub)
            await workers.start()
        stop = asyncio.Event()
        _stop_on_signals(stop)
        announce(
            "mssd ready "
            + json.dumps(
                {f"smtp_{lst.name}": f"{lst.host}:{lst.port}" for lst in listeners}
                | {lst.name: f"{lst.host}:{lst.port}" for lst in imap_listeners}
            )
        )
        await stop.wait()
        log.info("stopping: no new connections; finishing queued commits")
    finally:
        for server in [lst.server for lst in listeners] + [lst.server for lst in imap_listeners]:
            server.close()
        if workers is not None:
            await workers.stop()
        await services.close()


async def serve_imap_worker(
    settings: Settings, sockets: str, parent_fd: int, changes_fd: int | None = None
) -> None:
    """One of the other IMAP processes (``mssd.workers``): IMAP only, on the
    addresses the parent bound (``imap=host:port,imaps=host:port``), until
    SIGTERM or the parent's exit. On SQLite, ``changes_fd`` is its end of the
    socket pair linking its change bus to the parent's."""
    engine, tls = await open_store(settings)
    uplink = None if changes_fd is None else socket.socket(fileno=changes_fd)
    bus = ChangeBus(engine, uplink=uplink)
    await bus.start()
    committer = GroupCommitter(
        engine, max_batch=settings.store.group_commit_max_batch, on_commit=bus.notify_stored
    )
    committer.start()
    mailstore = MailStore(engine, on_change=bus.notify)
    authenticator = await authenticator_for(settings, StoreAccounts(engine), committer, bus)
    imap_services = imap_services_for(settings, authenticator, mailstore, bus, committer)
    listeners: list[ImapListener] = []
    try:
        listeners = await start_imap(settings, imap_services, tls, sockets=worker_sockets(sockets))
        stop = asyncio.Event()
        _stop_on_signals(stop)
        watch_parent(parent_fd, stop)
        sys.stdout.buffer.write(READY_LINE)
        sys.stdout.flush()
        await stop.wait()
    finally:
        for listener in listeners:
            listener.server.close()
        await authenticator.close()
        await committer.stop()
        await bus.stop()
        await dispose(engine)
