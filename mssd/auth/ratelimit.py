"""Sliding-window limits on authentication failures, per account and per address.

This module owns the counting of recent failures, the decision "too many,
refuse before checking anything", and how failures are shared between
processes. It must never look at credentials, never wait on I/O (sharing hands
payloads to a callback that only queues them), and its memory is bounded:
entries older than the window are pruned, and past ``max_keys`` tracked keys
the least recently failed ones are dropped.

Several processes on one PostgreSQL (``imap.workers``, several hosts: DESIGN.md
"Scale-out"), or the processes of one ``mssd serve`` on a SQLite file
(``imap.workers``), count together: every failure a process records, and every
reset that forgot an account's failures (a success), is published on the
channel :data:`CHANNEL` through the change bus (``mssd.store.changes``: its
LISTEN connection and reconnects and a batched NOTIFY sender, or its links
through ``mssd serve`` on SQLite), and every other process adds it to its own
windows. So the configured limits hold across processes, within what is in
flight:

- a failure heard from another process is stamped with the receiver's clock
  when it arrives (hosts' clocks are never compared), so it expires there
  later by the transit delay, milliseconds;
- attempts sent to several processes at the same instant each pass the check
  before they hear of one another: the limit can be overshot by the failures
  still in transit, a few milliseconds' worth;
- sharing is best effort and nothing waits on it: an authentication is never
  delayed or failed by it. A NOTIFY that cannot be sent is dropped with a
  warning (as is a frame a link had to drop), and a process hears nothing
  while its LISTEN connection (or its link) is down or before it starts;
  limits are then looser (a lost failure) or an account stays counted where a
  success was not heard (a lost reset), for one window at most.
  Correctness never depends on this state (DESIGN.md, Scale-out).

A process alone on its SQLite store publishes nothing.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import logging
import re
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable

from mssd.config import AuthSettings

log = logging.getLogger(__name__)

DEFAULT_MAX_KEYS = 100_000
CHANNEL = "mssd_auth_failures"
"""The NOTIFY channel failures travel on. Payloads:
``origin:seq:failure:ADDRESS:ACCOUNT`` (ACCOUNT empty when no login was given)
and ``origin:seq:reset:ACCOUNT``, where ADDRESS and ACCOUNT are key digests
(:func:`key_digest`), ``origin`` names the sending process (it counted its own
failures already) and ``seq`` numbers its payloads: PostgreSQL delivers
identical payloads sent in one transaction only once, and two failures of one
account from one address in one batch must count twice."""
_DIGEST = re.compile("[0-9a-f]{64}")


class FailureWindow:
    """Failure timestamps per key over the last ``window`` seconds."""

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        clock: Callable[[], float],
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self._max_keys = max_keys
        # Ordered by last failure, oldest first: both pruning and eviction pop
        # from the front, so each costs O(1) amortised.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def _prune(self, now: float) -> None:
        horizon = now - self._window
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times[-1] > horizon:
                break
            del self._failures[key]

    def count(self, key: str) -> int:
        """Failures recorded for ``key`` within the window."""
        now = self._clock()
        self._prune(now)
        times = self._failures.get(key)
        if times is None:
            return 0
        horizon = now - self._window
        while times and times[0] <= horizon:
            times.popleft()
        return len(times)

    def exceeded(self, key: str) -> bool:
        """True once ``key`` has reached the limit: further attempts are refused."""
        return self.count(key) >= self._limit

    def record(self, key: str) -> None:
        now = self._clock()
        self._prune(now)
        times = self._failures.pop(key, None)
        if times is None:
            # Never more than `limit` timestamps per key: older ones cannot matter.
            times = deque(maxlen=self._limit)
        times.append(now)
        self._failures[key] = times
        while len(self._failures) > self._max_keys:
            self._failures.popitem(last=False)

    def reset(self, key: str) -> None:
        self._failures.pop(key, None)


def address_key(remote_ip: str) -> str:
    """The key an address is counted under: IPv6 per /64, since one customer
    usually holds a whole /64; IPv4-mapped IPv6 as the IPv4 address."""
    try:
        address = ipaddress.ip_address(remote_ip)
    except ValueError:
        return remote_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def key_digest(key: str) -> str:
    """What a key is counted and published under: its SHA-256, in hex.

    Login names and client addresses are personal data, and NOTIFY payloads
    reach every session that LISTENs on the database and, with statement
    logging, the PostgreSQL server log: a digest keeps them out of both, while
    every process derives the same key from the same login. It is a pseudonym,
    not a secret (whoever can LISTEN can confirm a guessed login), and a keyed
    digest would protect nothing more: its key would have to be shared by every
    process, hence stored where such a party reads the accounts table and the
    audit trail, which hold logins and addresses in clear anyway. The fixed
    length also bounds a payload whatever the login's length (PostgreSQL
    refuses payloads of 8000 bytes or more).
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _account_digest(login: str) -> str:
    return key_digest(login.lower())


def _address_digest(remote_ip: str) -> str:
    return key_digest(address_key(remote_ip))


def _is_digest(value: str) -> bool:
    return _DIGEST.fullmatch(value) is not None


class AuthRateLimiter:
    """The two limits of DESIGN.md "Security rules": per account login and per address.

    Windows are keyed by :func:`key_digest`, the form other processes publish.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        clock: Callable[[], float],
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        window = float(settings.failure_window_seconds)
        self.accounts = FailureWindow(
            settings.failure_limit_per_account, window, clock=clock, max_keys=max_keys
        )
        self.addresses = FailureWindow(
            settings.failure_limit_per_address, window, clock=clock, max_keys=max_keys
        )
        self._publish: Callable[[str], None] | None = None
        self._origin = secrets.token_hex(8)
        self._sequence = itertools.count()

    def limited(self, login: str | None, remote_ip: str) -> str | None:
        """``"address"`` or ``"account"`` when an attempt must be refused now, else None."""
        if self.addresses.exceeded(_address_digest(remote_ip)):
            return "address"
        if login and self.accounts.exceeded(_account_digest(login)):
            return "account"
        return None

    def failure(self, login: str | None, remote_ip: str) -> None:
        address = _address_digest(remote_ip)
        account = _account_digest(login) if login else ""
        self.addresses.record(address)
        if account:
            self.accounts.record(account)
        if self._publish is not None:
            self._send(f"failure:{address}:{account}")

    def success(self, *logins: str) -> None:
        """Forget the account's failures; the address keeps its count, so one good
        login cannot be used to launder guesses against other accounts."""
        for login in {login.lower() for login in logins if login}:
            account = key_digest(login)
            # Only a reset that forgets something is published: every process
            # hears every failure, so an account with none here has none
            # elsewhere (in-flight ones aside), and the common success costs
            # no NOTIFY.
            if self.accounts.count(account):
                self.accounts.reset(account)
                if self._publish is not None:
                    self._send(f"reset:{account}")

    def account_failures(self, login: str) -> int:
        """Failures counted against ``login`` within the window, from every process."""
        return self.accounts.count(_account_digest(login))

    def address_failures(self, remote_ip: str) -> int:
        """Failures counted against the client address within the window, from every process."""
        return self.addresses.count(_address_digest(remote_ip))

    # -- sharing between processes (PostgreSQL) ------------------------------------------------

    def share(self, publish: Callable[[str], None]) -> None:
        """From now on, hand every failure and reset to ``publish``, which must
        queue the payload for :data:`CHANNEL` and return at once without raising
        (``ChangeBus.post``); :meth:`receive` takes the other processes' ones."""
        self._publish = publish

    def _send(self, event: str) -> None:
        assert self._publish is not None
        self._publish(f"{self._origin}:{next(self._sequence)}:{event}")

    def receive(self, payload: str) -> None:
        """Count a failure, or forget an account's failures, as another process
        published it; the failure is stamped with this process's clock now."""
        origin, _, rest = payload.partition(":")
        if origin == self._origin:
            return  # counted when it happened
        fields = rest.split(":")
        kind = fields[1] if len(fields) > 1 and fields[0].isdigit() else ""
        if kind == "failure" and len(fields) == 4 and _is_digest(fields[2]):
            address, account = fields[2], fields[3]
            if account == "" or _is_digest(account):
                self.addresses.record(address)
                if account:
                    self.accounts.record(account)
                return
        elif kind == "reset" and len(fields) == 3 and _is_digest(fields[2]):
            self.accounts.reset(fields[2])
            return
        log.warning("ignoring malformed authentication failure notification %r", payload[:200])
