"""Queue mode's ``in_flow_delay``: accept mail no faster than the workers deliver it.

Postfix's rule, as its cleanup server and queue manager play it: accepting a
message takes a token, each finished delivery attempt gives one back, and with
no token left acceptance waits until one comes back or ``delay`` passes, then
goes on anyway. The input is slowed, never refused, and every wait is bounded,
so a surge fills the spool at the pace the workers empty it instead of without
bound. Acceptance never waits while nobody delivers (no worker attached, or the
worker paused by the circuit breaker): then the spool absorbs the outage at
full speed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

__all__ = ["Admission", "InFlow"]


class Admission:
    """One message's pass through the gate: ``async with flow.admit(delay) as admission``.

    ``held``: it took a token. :meth:`keep` once the message is in the spool,
    where the worker's attempt gives the token back; otherwise (nothing
    spooled, store error, cancelled) the admission returns it on exit.
    """

    __slots__ = ("_delay", "_flow", "held", "kept")

    def __init__(self, flow: InFlow, delay: float) -> None:
        self._flow = flow
        self._delay = delay
        self.held = False
        self.kept = False

    def keep(self) -> None:
        self.kept = True

    async def __aenter__(self) -> Admission:
        self.held = await self._flow._take(self._delay)
        self._flow.admitted += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        flow = self._flow
        flow.finished += 1
        if self.held and not self.kept:
            flow.give()


class InFlow:
    """The token gate between acceptance (SMTP sessions) and delivery (the workers).

    ``capacity`` tokens to start, the workers' concurrent attempts; never more.
    """

    def __init__(self, capacity: int = 1) -> None:
        self._capacity = max(1, capacity)
        self._tokens = self._capacity
        #: Admissions past the gate, and those of them finished (committed or
        #: not), since start: the difference is on its way to the spool.
        self.admitted = 0
        self.finished = 0
        #: Admissions that found no token and had to wait, since start.
        self.delayed = 0
        self._queue: deque[asyncio.Future[bool]] = deque()
        self._delivering: Callable[[], bool] | None = None
        self._watchers: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def pending(self) -> int:
        """Admissions past the gate, not yet finished: work the spool may not show yet."""
        return self.admitted - self.finished

    @property
    def waiting(self) -> int:
        """Admissions waiting for a token now."""
        return sum(not f.done() for f in self._queue)

    # -- the delivering side ----------------------------------------------------

    def attach(self, delivering: Callable[[], bool], capacity: int) -> None:
        """A worker gives tokens back from now on; ``delivering()`` says if it does now."""
        self._delivering = delivering
        self.resize(capacity)

    def detach(self) -> None:
        """The worker stops: nobody gives tokens back, so nobody waits for one."""
        self._delivering = None
        self.release_all()

    def resize(self, capacity: int) -> None:
        """A new capacity (``api.max_concurrency`` reloaded); tokens move by the difference."""
        capacity = max(1, capacity)
        if capacity == self._capacity:
            return
        self._tokens = min(max(self._tokens + capacity - self._capacity, 0), capacity)
        self._capacity = capacity
        self._hand_out()

    def give(self) -> None:
        """An attempt finished (whatever its end): a token back, to the longest waiter first."""
        self._tokens = min(self._tokens + 1, self._capacity)
        self._hand_out()

    def top_up(self, idle: int, finished: int) -> None:
        """The workers have ``idle`` free slots and nothing due: that many tokens at least.

        ``finished``: :attr:`finished` read before the workers looked at the
        spool; admissions that had not finished by then may be work they did
        not see, so each counts against ``idle``. Tokens taken by mail another
        process delivered (``--workers`` share the spool), or by a message
        purged before its attempt, come back this way.
        """
        target = min(idle - (self.admitted - finished), self._capacity)
        if target > self._tokens:
            self._tokens = target
            self._hand_out()

    def release_all(self) -> None:
        """The workers stopped delivering (breaker open, stopping): waiters go on now."""
        while self._queue:
            future = self._queue.popleft()
            if not future.done():
                future.set_result(False)

    def _hand_out(self) -> None:
        while self._tokens > 0 and self._queue:
            future = self._queue.popleft()
            if not future.done():
                self._tokens -= 1
                future.set_result(True)

    # -- the accepting side -----------------------------------------------------

    def admit(self, delay: float) -> Admission:
        """Take a token for one message, waiting at most ``delay`` seconds for one."""
        return Admission(self, delay)

    async def _take(self, delay: float) -> bool:
        if delay <= 0 or self._delivering is None or not self._delivering():
            return False
        if self._tokens > 0:
            self._tokens -= 1
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.append(future)
        self.delayed += 1
        self._notify()
        timer = loop.call_later(delay, _resolve, future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result():
                self.give()  # handed a token just as the wait was cancelled
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(future)

    async def wait_delayed(self, count: int) -> None:
        """Wait until ``count`` admissions in all have had to wait for a token.

        For tests and tools that must know an admission is waiting, without sleeping.
        """
        if self.delayed >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watchers.append((count, future))
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._watchers.remove((count, future))

    def _notify(self) -> None:
        for count, future in self._watchers:
            if self.delayed >= count and not future.done():
                future.set_result(None)


def _resolve(future: asyncio.Future[bool]) -> None:
    # in_flow_delay is over: go on without a token.
    if not future.done():
        future.set_result(False)
