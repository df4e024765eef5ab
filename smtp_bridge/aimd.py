"""Each API key's pace, AIMD: an HTTP 429 slows the key down, successes speed it up.

A rate limit says "slower", not "stop" (docs/guarantees.md). As TCP treats its
congestion window: a 429 halves the key's allowed concurrency (multiplicative
decrease, never below 1), and every ``limit`` calls the API answers without
throttling (a round) add one slot back (additive increase), up to
``api.max_concurrency``. With ``api.rate_limit`` set,
the key's calls per second follow the same factor while it is slowed down.
Calls over the limit wait their turn (first come, first served); none is
refused for it.

The pace drops once per round, not once per 429: each call carries the epoch
it was sent in, and only a 429 to a call of the current epoch drops the pace
(and counts towards the breaker's run, :data:`smtp_bridge.breaker.THROTTLE_RUN`).
A burst of 429s to calls already in flight halves the limit once, not to 1.

:class:`Pace` is the pure policy; :class:`KeyPace` is its asyncio face (the
slots and the rate); :class:`Paces` keeps one per key, by a digest, each with a
label for metrics and logs that never contains the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator

from .ratelimit import TokenBucket

__all__ = ["DEFAULT_LABEL", "DECREASE", "KeyPace", "Pace", "Paces", "key_label"]

#: The factor a fresh 429 multiplies the allowed concurrency by.
DECREASE = 0.5

#: The label of the configured ``api.app_key`` (the one most mail uses).
DEFAULT_LABEL = "default"


def _digest(app_key: str) -> str:
    return hashlib.sha256(app_key.encode("utf-8", "surrogateescape")).hexdigest()


def key_label(app_key: str, default_key: str) -> str:
    """``default`` for ``api.app_key``, else ``sha256:`` and 12 hex digits of the key's digest.

    The digest is the one the sandbox's ``/_sent`` shows, so an operator can
    match them (``printf %s "$KEY" | sha256sum``); it does not reveal the key.
    """
    return _label(_digest(app_key), _digest(default_key))


def _label(digest: str, default_digest: str) -> str:
    return DEFAULT_LABEL if digest == default_digest else f"sha256:{digest[:12]}"


class Pace:
    """The allowed concurrency and rate of one key, bounded by ``[1, ceiling]``."""

    def __init__(self, ceiling: int, rate: float = 0.0) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling!r}")
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate!r}")
        self.ceiling = ceiling
        self.max_rate = float(rate)
        #: Calls allowed at once now.
        self.limit = ceiling
        #: Bumped by every drop; a call's 429 counts only in its own epoch.
        self.epoch = 0
        self._credit = 0  # answers without a 429 since the limit last moved

    def __repr__(self) -> str:
        return f"Pace(limit={self.limit}, ceiling={self.ceiling}, epoch={self.epoch})"

    @property
    def slowed(self) -> bool:
        """True while below the ceiling (a 429 has not been worked off yet)."""
        return self.limit < self.ceiling

    @property
    def rate(self) -> float:
        """Calls a second allowed now; 0 = no rate limit of the key's own."""
        if self.max_rate <= 0:
            return 0.0
        return self.max_rate * self.limit / self.ceiling

    def throttled(self, epoch: int) -> bool:
        """A 429 to a call of ``epoch``: drop the pace if it is this epoch's first.

        True when it dropped (a fresh 429); False for a stale one, which came
        to a call sent at the old pace and changes nothing.
        """
        if epoch != self.epoch:
            return False
        self.limit = max(1, int(self.limit * DECREASE))
        self.epoch += 1
        self._credit = 0
        return True

    def succeeded(self) -> None:
        """The API answered without throttling: one slot more per round of ``limit`` such."""
        if self.limit >= self.ceiling:
            return
        self._credit += 1
        if self._credit >= self.limit:
            self._credit = 0
            self.limit += 1

    def configure(self, ceiling: int, rate: float) -> None:
        """New ``api.max_concurrency`` / ``api.rate_limit`` (a reload).

        A key at full pace follows the new ceiling; a slowed key keeps its
        limit, at most the new ceiling.
        """
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling!r}")
        full = not self.slowed
        self.ceiling = ceiling
        self.max_rate = max(0.0, float(rate))
        self.limit = ceiling if full else min(self.limit, ceiling)


class KeyPace:
    """Waits for a slot under the key's :class:`Pace` (and its rate while slowed).

    ``async with``-free on purpose: :meth:`acquire` returns the epoch the call
    is sent in, which :meth:`throttled` needs back. Every successful
    :meth:`acquire` must be paired with one :meth:`release`.
    """

    def __init__(
        self,
        pace: Pace,
        label: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.pace = pace
        self.label = label
        self.in_flight = 0
        self._clock = clock
        self._sleep = sleep
        self._bucket = TokenBucket(pace.rate)
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        return f"KeyPace({self.label}, {self.pace!r}, in_flight={self.in_flight})"

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot now."""
        return sum(not f.done() for f in self._waiters)

    def try_acquire(self) -> int | None:
        """A slot at once, and its epoch; None when the caller must :meth:`acquire` (wait)."""
        if self._waiters or self.in_flight >= self.pace.limit:
            return None
        if self.pace.slowed and self.pace.rate > 0:
            return None  # the key's own rate may ask for a wait
        self.in_flight += 1
        return self.pace.epoch

    async def acquire(self) -> int:
        """Wait for a slot (first come, first served), then for the key's rate; the epoch.

        Cancellation (a timeout around it, say) leaves nothing held.
        """
        if self.in_flight < self.pace.limit and not self._waiters:
            self.in_flight += 1
        else:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    self.release()  # handed a slot as we were cancelled: pass it on
                else:
                    future.cancel()
                    self._waiters.remove(future)
                raise
        try:
            if self.pace.slowed and self.pace.rate > 0:
                delay = self._bucket.reserve(self._clock())
                if delay > 0:
                    await self._sleep(delay)
        except BaseException:
            self.release()
            raise
        return self.pace.epoch

    def release(self) -> None:
        """The call is over: its slot to the longest waiter."""
        self.in_flight -= 1
        self._hand_out()

    def throttled(self, epoch: int) -> bool:
        """:meth:`Pace.throttled`, keeping the rate in step."""
        dropped = self.pace.throttled(epoch)
        if dropped:
            self._bucket.retune(self.pace.rate)
        return dropped

    def succeeded(self) -> None:
        """:meth:`Pace.succeeded`, keeping the rate in step and waking waiters."""
        before = self.pace.limit
        self.pace.succeeded()
        self._bucket.retune(self.pace.rate)
        if self.pace.limit > before:
            self._hand_out()

    def configure(self, ceiling: int, rate: float) -> None:
        self.pace.configure(ceiling, rate)
        self._bucket.retune(self.pace.rate)
        self._hand_out()

    def _hand_out(self) -> None:
        while self._waiters and self.in_flight < self.pace.limit:
            future = self._waiters.popleft()
            if future.done():
                continue
            self.in_flight += 1
            future.set_result(None)


class Paces:
    """One :class:`KeyPace` per API key, keyed by a digest so no key is kept twice."""

    def __init__(
        self,
        ceiling: int = 64,
        rate: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ceiling = ceiling
        self.rate = rate
        self.clock = clock
        self._default = _digest("")
        self._by_key: dict[str, KeyPace] = {}

    def configure(self, *, ceiling: int, rate: float, default_key: str) -> None:
        """New settings (a reload) for every key, current ones included; labels follow
        a new ``api.app_key``."""
        self.ceiling, self.rate = ceiling, rate
        self._default = _digest(default_key)
        for digest, pace in self._by_key.items():
            pace.configure(ceiling, rate)
            pace.label = _label(digest, self._default)

    def get(self, app_key: str) -> KeyPace:
        digest = _digest(app_key)
        pace = self._by_key.get(digest)
        if pace is None:
            label = _label(digest, self._default)
            pace = KeyPace(Pace(self.ceiling, self.rate), label, clock=self.clock)
            self._by_key[digest] = pace
        return pace

    def __iter__(self) -> Iterator[KeyPace]:
        return iter(list(self._by_key.values()))
