"""The relay worker: delivers the outbound queue to the other operators of the trust space.

Each round claims due entries (``mssd.store.queue``), groups them by recipient domain and
envelope, and sends each envelope once per domain with all its recipients, a domain's
envelopes spread over up to ``relay.max_connections_per_peer`` connections. A peer is used
only over TLS (STARTTLS is required, RFC 3207), presenting our operator certificate, after
its chain was verified against ``tls.operator_ca_file`` and the CRLs and its subject DN
found in the ANS whitelist for the recipient domain; otherwise the entries are deferred
with the reason, which ``mssd queue show`` displays.

Invariants:
- Replies are judged per recipient (RFC 5321 §4.2.1, §6.1): 2xx delivered, 4xx deferred
  with exponential backoff and jitter, 5xx failed at once; a deferral past
  ``relay.give_up_seconds`` fails. A failure and a delay (once, after
  ``relay.delay_report_seconds``) produce a report to the sender as NOTIFY asks, written
  with the outcome (``mssd.smtp.outcomes``).
- RFC 3461 parameters travel with the message (RET, ENVID on MAIL; NOTIFY, ORCPT on RCPT)
  when the peer offers DSN.
- An 8-bit message goes with BODY=8BITMIME, or converted to 7 bits for a peer that does
  not offer 8BITMIME (RFC 6152 §3, ``mssd.mime.sevenbit``), or fails when it cannot be.
- An outcome is recorded only after the peer's reply, and as soon as it comes
  (:class:`~mssd.smtp.outcomes.Recorder`); a process killed between the peer's 250 and
  that record sends the message again after the lease. Delivery is at least once: SMTP
  cannot do better (the comment on ``Recorder`` says why, and bounds the duplicates).
  When recording fails, sending stops.
- Connections are reused per peer (RSET before reuse) and limited per peer and in total
  (``mssd.smtp.pool``: the limits bound open connections, not handshakes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd import metrics
from mssd.config import Settings, operator_ca_file
from mssd.delivery.dkim import DkimSigner
from mssd.delivery.dsn import Reporter
from mssd.mime import OFFLOAD_BYTES
from mssd.mime.sevenbit import CannotConvert, to_seven_bit
from mssd.smtp.client import ConnectionFailed, Reply, SmtpClient
from mssd.smtp.outcomes import RELAYED, OutcomeWriter, Recorder, Result, all_results
from mssd.smtp.pool import ConnectionPool
from mssd.smtp.routes import Peer, RouteError, Router
from mssd.store import queue
from mssd.store.delivery import StoredMessage
from mssd.store.queue import QueueEntry
from mssd.trust.identity import normalise_dn
from mssd.trust.tls import client_context
from mssd.trust.verify import CertificateRejected, TrustFiles
from mssd.trust.whitelist import Whitelist

log = logging.getLogger(__name__)

HANDSHAKES = metrics.counter(
    "mssd_relay_tls_handshakes_total", "TLS connections opened by the relay to other operators"
)


class PeerRefused(Exception):
    """The peer cannot be used for this domain (no STARTTLS, DN not whitelisted...)."""


def xtext(value: str) -> str:
    """RFC 3461 §4: characters outside ``!``..``~``, ``+`` and ``=`` as ``+HH``."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


class RelayWorker:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        *,
        whitelist: Callable[[], Whitelist | None],
        reporter: Reporter | None = None,
        on_stored: Callable[[Sequence[StoredMessage]], None] | None = None,
        signer: DkimSigner | None = None,
        router: Router | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings.relay
        self._hostname = settings.server.hostname
        self._whitelist = whitelist
        self._outcomes = OutcomeWriter(
            engine, settings.relay, reporter=reporter, on_stored=on_stored
        )
        self._signer = signer
        self._router = router or Router(
            settings.relay.routes, timeout=settings.relay.dns_timeout_seconds
        )
        # The peer's identity is its whitelisted DN, not a host name (MX host names need
        # not match operator certificates; static routes point at addresses).
        # The handshake checks the chain up to a CA of tls.operator_ca_file, the same
        # CAs port 25 checks the peers' client certificates against; revocation is
        # checked on the peer's certificate after it, against the CRL as it is now
        # (TrustFiles re-reads it when it changes): a CRL loaded once into the context
        # would miss new revocations and, past its nextUpdate, fail every handshake.
        ca_file = operator_ca_file(settings)
        self._tls = tls or client_context(
            ca_file=ca_file,
            cert_file=settings.tls.cert_file,
            key_file=settings.tls.key_file,
            check_hostname=False,
            partial_chain=True,
        )
        self._trust = TrustFiles(ca_file, settings.tls.crl_file)
        self._pool = ConnectionPool(
            total=settings.relay.max_connections,
            per_peer=settings.relay.max_connections_per_peer,
            keep_idle_seconds=settings.relay.idle_connection_seconds,
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._in_flight = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="relay")

    def wake(self) -> None:
        """Something was queued: look at the queue now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming; cancel sends in progress (their entries are given back)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        await self._pool.close()
        # There is no metrics endpoint yet: the log keeps the figures (bench/relay_load.py
        # reads the handshake count here to check that connections were reused).
        log.info(
            "relay stopped: %d TLS handshakes; recipients delivered %d, deferred %d, failed %d",
            HANDSHAKES.value(),
            RELAYED.value("delivered"),
            RELAYED.value("deferred"),
            RELAYED.value("failed"),
        )

    async def run_once(self) -> int:
        """Claim one batch of due entries and return, with the number claimed, once every
        outcome is recorded (tests; the worker itself claims again as room frees up)."""
        claimed = await self._claim()
        await asyncio.gather(*self._running, return_exceptions=True)
        return claimed

    async def _run(self) -> None:
        while True:
            try:
                claimed = await self._claim()
            except Exception:
                log.exception("relay: reading the queue failed; trying again")
                claimed = 0
            if claimed:
                continue
            self._pool.close_idle()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_seconds)

    async def _claim(self) -> int:
        room = self._settings.batch_size - self._in_flight
        if room <= 0:
            return 0
        entries = await queue.claim(
            self._engine, limit=room, lease_seconds=self._settings.lease_seconds
        )
        by_domain: dict[str, list[QueueEntry]] = defaultdict(list)
        for entry in entries:
            by_domain[entry.domain].append(entry)
        for domain, group in by_domain.items():
            self._in_flight += len(group)
            task = asyncio.create_task(self._deliver_domain(domain, group))
            self._running.add(task)
            task.add_done_callback(self._finished(len(group)))
        return len(entries)

    def _finished(self, count: int) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            self._in_flight -= count
            if not task.cancelled() and task.exception() is not None:
                log.error("relay task failed", exc_info=task.exception())
            self._wake.set()  # room for more

        return done

    # -- one domain --------------------------------------------------------------------------

    async def _deliver_domain(self, domain: str, entries: list[QueueEntry]) -> None:
        recorder = Recorder(self._outcomes.record)
        try:
            await self._attempt_domain(domain, entries, recorder)
        finally:
            try:
                # Cancelled (shutdown) or failed midway: what the peer already accepted is
                # recorded all the same, so that a clean stop sends nothing twice.
                await asyncio.shield(recorder.close())
            finally:
                # What was not attempted goes back at once rather than wait for the lease.
                rest = [(e.id, e.claim_token or "") for e in entries if e.id not in recorder.handed]
                if rest:
                    await asyncio.shield(queue.release(self._engine, rest))

    async def _attempt_domain(
        self, domain: str, entries: list[QueueEntry], recorder: Recorder
    ) -> None:
        """Send ``entries`` to a peer of ``domain``; hand each envelope's outcomes to
        ``recorder`` as soon as the peer has answered for it, and stop sending as soon as
        recording fails (the rest is left for a later attempt)."""
        record = recorder.add
        listed = self._whitelist()
        operators = listed.operators_for(domain) if listed is not None else frozenset()
        if not operators:
            record(all_results(entries, "deferred", f"domain {domain} is not in the MSSanté "
                             "whitelist in force", "4.7.1"))  # fmt: skip
            return
        try:
            peers = await self._router.peers(domain)
        except RouteError as error:
            kind = "failed" if error.permanent else "deferred"
            record(all_results(entries, kind, str(error), "5.1.2" if error.permanent else "4.4.3"))
            return
        envelopes: dict[str, list[QueueEntry]] = defaultdict(list)
        for entry in entries:
            envelopes[entry.envelope_id].append(entry)
        # The claim holds for lease_seconds and is not renewed: past half of it no
        # new envelope is started (the rest goes back to the queue, see
        # _deliver_domain), so no other worker can claim an entry while it is sent.
        deadline = time.monotonic() + self._settings.lease_seconds / 2
        # The envelopes are spread over up to max_connections_per_peer connections, each
        # taking the next one as it is free (SMTP promises no order between messages).
        pending = deque(envelopes.values())
        lanes = min(self._settings.max_connections_per_peer, len(pending))
        async with asyncio.TaskGroup() as running:
            tasks = [
                running.create_task(
                    self._lane(domain, peers, operators, pending, recorder, deadline)
                )
                for _ in range(lanes)
            ]
        if pending and time.monotonic() <= deadline and not recorder.failed:
            # Every connection broke, or no peer could be used: the rest waits for later.
            stops = [task.result() for task in tasks]
            reason, status = next((stop for stop in stops if stop), ("no peer", "4.4.1"))
            record(all_results([e for group in pending for e in group], "deferred", reason, status))

    async def _lane(
        self,
        domain: str,
        peers: Sequence[Peer],
        operators: frozenset[str],
        pending: deque[list[QueueEntry]],
        recorder: Recorder,
        deadline: float,
    ) -> tuple[str, str] | None:
        """Send envelopes taken from ``pending`` over one connection, to the first of
        ``peers`` that can be used; None, or why it stopped early (reason, status)."""
        stopped = ("no peer", "4.4.1")
        for peer in peers:
            if not pending:
                return None
            try:
                client = await self._connection(peer, domain, operators)
            except (ConnectionFailed, PeerRefused) as error:
                stopped = (str(error), "4.4.1")
                log.warning("relay to %s via %s: %s", domain, peer, error)
                continue
            reusable = True
            try:
                while pending and time.monotonic() <= deadline and not recorder.failed:
                    group = pending.popleft()
                    reusable = False  # until this transaction is known to be over
                    try:
                        sent = await self._send(client, peer, group)
                    except ConnectionFailed as error:
                        recorder.add(all_results(group, "deferred", str(error), "4.4.2"))
                        return (str(error), "4.4.2")
                    recorder.add(sent)
                    reusable = all(r.kind == "delivered" for r in sent) or await client.rset()
                    if not reusable:
                        return (f"{peer} did not answer RSET", "4.4.2")
                return None
            finally:
                await self._pool.give_back(peer, client, reusable=reusable)
        return stopped

    async def _connection(self, peer: Peer, domain: str, operators: frozenset[str]) -> SmtpClient:
        client = await self._pool.take(peer, lambda: self._open(peer))
        try:
            self._check_peer(client, domain, operators)
        except PeerRefused:
            await self._pool.discard(peer, client)
            raise
        return client

    def _check_peer(self, client: SmtpClient, domain: str, operators: frozenset[str]) -> None:
        """PeerRefused unless the peer's certificate is valid now and its DN is listed for
        ``domain`` (the caller closes the connection: a peer's certificates rarely differ
        per domain)."""
        der = client.peer_certificate()
        if der is None:
            raise PeerRefused(f"{client.peer} presented no certificate")
        try:
            cert = self._trust.verify(der)
        except CertificateRejected as rejected:
            raise PeerRefused(
                f"{client.peer} presented a refused certificate: {rejected}"
            ) from None
        dn = normalise_dn(cert.subject)
        if dn not in operators:
            raise PeerRefused(
                f"{client.peer} presented certificate {dn}, which the MSSanté whitelist does "
                f"not list for {domain}"
            )

    async def _open(self, peer: Peer) -> SmtpClient:
        client, greeting = await SmtpClient.connect(
            peer.host,
            peer.port,
            connect_timeout=self._settings.connect_timeout_seconds,
            reply_timeout=self._settings.command_timeout_seconds,
        )
        try:
            if greeting.code != 220:
                raise PeerRefused(f"{peer} greeted with {greeting}")
            reply = await client.ehlo(self._hostname)
            if reply.code != 250:
                raise PeerRefused(f"{peer} answered EHLO with {reply}")
            if "STARTTLS" not in client.extensions:
                # The trust space is mutual TLS only: never fall back to plaintext.
                raise PeerRefused(f"{peer} does not offer STARTTLS")
            reply = await client.starttls(self._tls, None)
            if reply.code != 220:
                raise PeerRefused(f"{peer} refused STARTTLS: {reply}")
            HANDSHAKES.inc()
            reply = await client.ehlo(self._hostname)
            if reply.code != 250:
                raise PeerRefused(f"{peer} answered EHLO after TLS with {reply}")
            return client
        except BaseException:
            await client.quit()
            raise

    # -- one envelope --------------------------------------------------------------------------

    async def _send(
        self, client: SmtpClient, peer: Peer, entries: list[QueueEntry]
    ) -> list[Result]:
        first = entries[0]
        extensions = client.extensions
        if first.smtputf8 and "SMTPUTF8" not in extensions:
            # RFC 6531 §3.2: no downgrade of internationalised addresses.
            return all_results(entries, "failed", f"{peer} does not offer SMTPUTF8", "5.6.7")
        content = await queue.read_content(self._engine, first.blob_sha256)
        # Whatever the submitter declared, the octets decide (a report quoting 8-bit
        # headers is 8-bit too).
        eight_bit = not content.isascii()
        if eight_bit and "8BITMIME" not in extensions:
            # RFC 6152 §3: convert to 7 bits or return the message; converted before
            # signing, so that the signature covers what the peer receives.
            try:
                if len(content) > OFFLOAD_BYTES:
                    content = await asyncio.to_thread(to_seven_bit, content)
                else:
                    content = to_seven_bit(content)
            except CannotConvert as error:
                reason = f"{peer} does not offer 8BITMIME and the message cannot be made 7-bit"
                return all_results(entries, "failed", f"{reason}: {error}", "5.6.3")
            eight_bit = False
        if self._signer is not None and first.mail_from:
            content = await self._signer.sign_async(content, first.mail_from.rpartition("@")[2])
        dsn = "DSN" in extensions
        mail_params: list[str] = []
        if "SIZE" in extensions:
            mail_params.append(f"SIZE={len(content)}")
        if eight_bit:
            mail_params.append("BODY=8BITMIME")  # RFC 6152 §2
        if first.smtputf8:
            mail_params.append("SMTPUTF8")
        if dsn and first.dsn_ret:
            mail_params.append(f"RET={first.dsn_ret}")
        if dsn and first.dsn_envid:
            mail_params.append(f"ENVID={first.dsn_envid}")
        recipients: list[tuple[str, list[str]]] = []
        for entry in entries:
            params: list[str] = []
            if dsn and entry.dsn_notify:
                params.append(f"NOTIFY={entry.dsn_notify}")
            if dsn:
                # RFC 3461 §4.2: keep the original recipient; add it when the client gave none.
                params.append(f"ORCPT={entry.dsn_orcpt or 'rfc822;' + xtext(entry.address)}")
            recipients.append((entry.address, params))
        outcome = await client.transaction(first.mail_from, mail_params, recipients, content)
        remote = peer.host
        results: list[Result] = []
        for entry, reply in zip(entries, outcome.recipients, strict=True):
            if not outcome.mail.positive:
                reply = outcome.mail
            if reply.positive and outcome.data is not None:
                reply = outcome.data
            results.append(self._judge(entry, reply, remote, relayed=not dsn))
        return results

    def _judge(self, entry: QueueEntry, reply: Reply, remote: str, *, relayed: bool) -> Result:
        status = reply.enhanced or f"{str(reply.code)[0]}.0.0"
        if reply.positive and reply.code != 354:
            return Result(entry, "delivered", str(reply), "2.0.0", remote, relayed)
        kind = "failed" if reply.permanent else "deferred"
        return Result(entry, kind, f"{remote} said: {reply}", status, remote)
