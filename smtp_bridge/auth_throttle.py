"""Failed SMTP AUTH attempts per client network: a growing delay, then lockout.

No sockets, no clock (callers pass ``now``). :class:`AuthThrottle` counts the
checks in progress with the failures (:meth:`AuthThrottle.begin`), so parallel
connections from one address get no more guesses than one connection does;
``smtp/handler.py`` applies it around :meth:`smtp_bridge.auth.Authenticator.verify`.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque

__all__ = ["AuthThrottle", "IPAddress"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _throttle_key(ip: IPAddress, ipv6_prefix: int) -> _Network:
    # An IPv6 client usually holds a whole /64: counting single addresses would
    # let it rotate past the limit and flush the table.
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ipaddress.IPv4Network((ip.ipv4_mapped, 32))
        return ipaddress.IPv6Network((ip, ipv6_prefix), strict=False)
    return ipaddress.IPv4Network((ip, 32))


class AuthThrottle:
    """Failed AUTH attempts per client address, with injected time (``now``, seconds).

    After ``free_failures`` failures within ``window`` seconds, each further
    attempt waits ``base_delay * 2**(failures - free_failures)`` (at most
    ``max_delay``); at ``disconnect_after`` failures the client is dropped.
    Failures older than ``window`` are forgotten. At most ``max_tracked``
    addresses are kept; the least recently failed is evicted first. IPv6
    clients count per ``ipv6_prefix`` network, IPv4 per address.

    Checks in progress count as failures until they end (:meth:`begin`,
    :meth:`end`): twenty parallel connections get the ``disconnect_after``
    guesses one connection gets, not twenty more while the first hashes run.
    """

    def __init__(
        self,
        *,
        free_failures: int = 3,
        base_delay: float = 0.5,
        max_delay: float = 5.0,
        disconnect_after: int = 10,
        window: float = 15 * 60,
        max_tracked: int = 10_000,
        ipv6_prefix: int = 64,
    ) -> None:
        if disconnect_after < 1 or max_tracked < 1 or window <= 0:
            raise ValueError("disconnect_after, max_tracked and window must be positive")
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.disconnect_after = disconnect_after
        self.window = window
        self.max_tracked = max_tracked
        self.ipv6_prefix = ipv6_prefix
        # Beyond this many failures neither the delay nor the verdict changes,
        # so no more timestamps are kept: memory per address is bounded.
        self._keep = max(disconnect_after, free_failures + 1 + _doublings(base_delay, max_delay))
        # key -> failure times, oldest first; ordered by most recent failure.
        self._failures: OrderedDict[_Network, deque[float]] = OrderedDict()
        # key -> checks begun and not yet ended (bounded by the connections open).
        self._pending: dict[_Network, int] = {}

    def __len__(self) -> int:
        return len(self._failures)

    def failure(self, ip: IPAddress, now: float) -> None:
        """Record one failed attempt from ``ip``."""
        key = _throttle_key(ip, self.ipv6_prefix)
        times = self._failures.get(key)
        if times is None:
            times = self._failures[key] = deque(maxlen=self._keep)
        else:
            self._failures.move_to_end(key)
        times.append(now)
        self._expire(now)
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)

    def success(self, ip: IPAddress) -> None:
        """Forget the failures of ``ip``: it has logged in."""
        self._failures.pop(_throttle_key(ip, self.ipv6_prefix), None)

    def begin(self, ip: IPAddress, now: float) -> bool:
        """Reserve one password check for ``ip``; False (nothing reserved) when it is
        locked out, counting the checks of ``ip`` still in progress as failures.

        Every True must be followed by one :meth:`end`.
        """
        if self.should_disconnect(ip, now):
            return False
        key = _throttle_key(ip, self.ipv6_prefix)
        self._pending[key] = self._pending.get(key, 0) + 1
        return True

    def end(self, ip: IPAddress, ok: bool, now: float) -> None:
        """Settle a check :meth:`begin` reserved: a success or a failure."""
        key = _throttle_key(ip, self.ipv6_prefix)
        left = self._pending.get(key, 0) - 1
        if left > 0:
            self._pending[key] = left
        else:
            self._pending.pop(key, None)
        if ok:
            self.success(ip)
        else:
            self.failure(ip, now)

    def in_progress(self, ip: IPAddress) -> int:
        """Checks of ``ip`` begun and not yet ended."""
        return self._pending.get(_throttle_key(ip, self.ipv6_prefix), 0)

    def failures(self, ip: IPAddress, now: float) -> int:
        """Failures of ``ip`` within the window plus its checks in progress (capped
        at the count that matters)."""
        key = _throttle_key(ip, self.ipv6_prefix)
        pending = self._pending.get(key, 0)
        times = self._failures.get(key)
        if not times:
            return pending
        cutoff = now - self.window
        return pending + sum(1 for t in times if t > cutoff)

    def delay_for(self, ip: IPAddress, now: float) -> float:
        """Seconds to wait before answering the next attempt from ``ip``."""
        count = self.failures(ip, now)
        if count < self.free_failures:
            return 0.0
        return float(min(self.max_delay, self.base_delay * 2 ** (count - self.free_failures)))

    def should_disconnect(self, ip: IPAddress, now: float) -> bool:
        """True once ``ip`` has failed ``disconnect_after`` times within the window."""
        return self.failures(ip, now) >= self.disconnect_after

    def _expire(self, now: float) -> None:
        # Oldest-failed first, so stop at the first entry still inside the window.
        cutoff = now - self.window
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times[-1] > cutoff:
                break
            del self._failures[key]


def _doublings(base: float, cap: float) -> int:
    """How many doublings take ``base`` to ``cap`` (so more failures change nothing)."""
    steps = 0
    while base > 0 and base < cap and steps < 64:
        base *= 2
        steps += 1
    return steps
