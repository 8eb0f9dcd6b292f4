"""Wiring: builds the services from the settings and runs the listeners.

One asyncio loop per process. Nothing here holds state that correctness
depends on: a second mssd process on the same PostgreSQL serves the same data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.auth import Authenticator, PscTokenVerifier
from mssd.config import Settings, dkim_key_dir, operator_ca_file, whitelist_cache_file
from mssd.delivery import DeliveryPipeline
from mssd.delivery.dkim import DkimSigner, DkimVerifier, make_dns_function, read_txt_records
from mssd.delivery.dsn import Reporter
from mssd.delivery.whitelist import WhitelistKeeper
from mssd.imap.heads import HeadCache
from mssd.imap.server import ImapListener, start_imap
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

    def after_commit(self, stored: Sequence[StoredMessage]) -> None:
        """Change notifications for IMAP; a wake-up for the relay when mail was queued."""
        self.bus.notify_stored(stored)
        if self.relay is not None and any(message.queued for message in stored):
            self.relay.wake()

    async def close(self) -> None:
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


async def build_services(settings: Settings) -> Services:
    engine = create_engine(settings.store.url, echo=settings.store.echo_sql)
    try:
        await check_schema(engine)
        tls = tls_context(settings)
    except Exception:
        await engine.dispose()
        raise
    accounts = StoreAccounts(engine)
    # One writer per process: concurrent writers would queue on the same INBOX row
    # locks and pay one commit each; one writer batches them (bench/README.md:
    # PostgreSQL 855 -> 1170 msg/s). Several processes still write concurrently.
    bus = ChangeBus(engine)
    await bus.start()
    services_holder: list[Services] = []
    committer = GroupCommitter(
        engine,
        max_batch=settings.store.group_commit_max_batch,
        on_commit=lambda stored: services_holder[0].after_commit(stored),
    )
    committer.start()
    mailstore = MailStore(engine, on_change=bus.notify)
    psc = PscTokenVerifier(settings.auth) if settings.auth.psc_issuer else None
    # Authentication outcomes are audited through the committer (group commit).
    authenticator = Authenticator(settings.auth, accounts, committer, psc=psc)
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


async def serve(settings: Settings, *, announce: Callable[[str], None] = print) -> None:
    """Run until SIGTERM or SIGINT, then stop accepting, finish commits, exit."""
    services = await build_services(settings)
    listeners: list[Listener] = []
    imap_listeners: list[ImapListener] = []
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
        imap_services = ImapServices(
            authenticator=services.authenticator,
            mailstore=services.mailstore,
            bus=services.bus,
            audit=services.committer,
            append_limit=settings.imap.append_limit,
            heads=HeadCache(settings.imap.header_cache_bytes),
        )
        imap_listeners = await start_imap(settings, imap_services, services.tls)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
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
        await services.close()
