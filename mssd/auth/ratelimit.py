"""Sliding-window limits on authentication failures, per account and per address.

This module owns the counting of recent failures and the decision "too many,
refuse before checking anything". It must never look at credentials, and its
memory is bounded: entries older than the window are pruned, and past
``max_keys`` tracked keys the least recently failed ones are dropped.

The state is per process. With several mssd processes behind a load balancer
each enforces its own limit, so an attacker gets at most ``processes × limit``
tries per window; correctness never depends on this state (DESIGN.md, Scale-out).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable

from mssd.config import AuthSettings

DEFAULT_MAX_KEYS = 100_000


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


class AuthRateLimiter:
    """The two limits of DESIGN.md "Security rules": per account login and per address."""

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

    def limited(self, login: str | None, remote_ip: str) -> str | None:
        """``"address"`` or ``"account"`` when an attempt must be refused now, else None."""
        if self.addresses.exceeded(address_key(remote_ip)):
            return "address"
        if login and self.accounts.exceeded(login.lower()):
            return "account"
        return None

    def failure(self, login: str | None, remote_ip: str) -> None:
        self.addresses.record(address_key(remote_ip))
        if login:
            self.accounts.record(login.lower())

    def success(self, *logins: str) -> None:
        """Forget the account's failures; the address keeps its count, so one good
        login cannot be used to launder guesses against other accounts."""
        for login in logins:
            if login:
                self.accounts.reset(login.lower())
