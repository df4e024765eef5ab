"""``api.rate_limit``: a token bucket capping API calls per second across the process.

:class:`TokenBucket` is the pure policy (time passed in); :class:`RateLimiter`
is its asyncio face, shared by SMTP sessions and queue workers. A call reserves
its slot before it waits, so waiters leave in the order they came and the cap
holds however many wait at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["RateLimiter", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; ``rate`` 0 = unlimited.

    Kept as the theoretical arrival time of the next call (GCRA): the same as a
    bucket refilled continuously, but with no timer. The default burst of 1
    spaces calls ``1/rate`` apart, so no second ever sees more than the rate.
    """

    def __init__(self, rate: float, *, burst: float = 1.0) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tat: float | None = None  # theoretical arrival time of the next call

    def reserve(self, now: float) -> float:
        """Take one token; return how long to wait before using it (0: at once)."""
        if self.rate <= 0:
            return 0.0
        interval = 1.0 / self.rate
        tolerance = (self.burst - 1.0) * interval
        arrival = now if self._tat is None else max(self._tat, now)
        self._tat = arrival + interval
        return max(0.0, arrival - tolerance - now)

    def set_rate(self, rate: float) -> None:
        """A new rate (a reload); reservations already handed out stand."""
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate!r}")
        if rate != self.rate:
            self.rate = float(rate)
            self._tat = None

    def retune(self, rate: float) -> None:
        """A new rate that takes effect from the next reservation on, keeping the
        schedule: unlike :meth:`set_rate`, a change does not free a call at once
        (a key slowed down by a 429 must not get a burst for it)."""
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate!r}")
        self.rate = float(rate)


class RateLimiter:
    """Waits for the bucket; ``clock`` is injectable for tests."""

    def __init__(self, rate: float = 0.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.bucket = TokenBucket(rate)
        self._clock = clock

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def set_rate(self, rate: float) -> None:
        self.bucket.set_rate(rate)

    async def acquire(self) -> None:
        """Return when one more call fits under the rate (at once when unlimited)."""
        delay = self.bucket.reserve(self._clock())
        if delay > 0:
            await asyncio.sleep(delay)
