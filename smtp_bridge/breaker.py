"""The API circuit breaker (docs/guarantees.md): pure policy, the time is always passed in.

One :class:`Breaker` per API key. It opens on an answer that says every call
would fail the same way (40001, 40002, 40007), for an HTTP 429's Retry-After
(at most ``max_retry_after``), after ``throttles`` (3) 429s in a row, each to
a call sent after the one before had lowered the key's pace (the API kept
refusing while the bridge slowed down), or after ``failures`` consecutive
transport failures (never sent, unknown, HTTP 5xx). One 429 without
Retry-After does not open it: the key's pace (:mod:`smtp_bridge.aimd`) drops
instead, and mail keeps flowing, slower. While it is open no call goes out:
direct mode answers the reply that opened it, hybrid mode spools, queue workers
pause. After the pause exactly one call is let through as the probe; a
delivery closes the breaker, a failure of the same kind opens it again (a new
pause: :attr:`Transition.REOPENED`), and any other answer (a bad recipient,
say) proves nothing and frees the probe slot for the next call.

Every admitted call holds a :class:`Ticket`; only the results of tickets from
the breaker's current period count, so a late answer to a call made before the
breaker opened cannot close it, and only the probe's answer ends a half-open
period.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from . import replies
from .outcomes import ApiResult
from .replies import Reply

__all__ = [
    "MAX_RETRY_AFTER",
    "THROTTLE_RUN",
    "Breaker",
    "BreakerState",
    "Breakers",
    "Ticket",
    "Transition",
    "cap_retry_after",
]

#: 429s in a row (each after the key's pace had dropped for the one before)
#: that pause the key: the API keeps refusing although the bridge slowed down.
THROTTLE_RUN = 3

#: The longest pause a Retry-After may ask for (``api.max_retry_after``'s default).
MAX_RETRY_AFTER = 300.0


def cap_retry_after(result: ApiResult, limit: float) -> ApiResult:
    """``result`` with its Retry-After cut to ``limit`` seconds (the same object if within).

    A proxy or WAF in front of the API may send any number; a pause of hours
    (or 1e20 seconds) would hold the mail until a restart.
    """
    if result.retry_after is None or result.retry_after <= limit:
        return result
    return dataclasses.replace(result, retry_after=limit)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    #: No call goes out until ``retry_at``.
    OPEN = "open"
    #: ``retry_at`` has passed: one probe may go (or is on its way).
    HALF_OPEN = "half_open"


class Transition(enum.StrEnum):
    """What :meth:`Breaker.record` did, for the one log line per change."""

    NONE = "none"
    OPENED = "opened"
    #: A failed probe: open again, for a new pause (:attr:`Breaker.pause`).
    REOPENED = "reopened"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Ticket:
    """Permission for one call; hand it back to :meth:`Breaker.record` or ``release``."""

    period: int
    probe: bool = False


class Breaker:
    """The breaker of one API key. Methods take ``now`` (monotonic seconds)."""

    def __init__(
        self,
        *,
        failures: int = 5,
        interval: float = 30.0,
        throttles: int = THROTTLE_RUN,
        max_retry_after: float = MAX_RETRY_AFTER,
    ) -> None:
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures!r}")
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval!r}")
        if throttles < 1:
            raise ValueError(f"throttles must be >= 1, got {throttles!r}")
        if max_retry_after < 0:
            raise ValueError(f"max_retry_after must be >= 0, got {max_retry_after!r}")
        self.failures = failures
        self.interval = interval
        self.throttles = throttles
        self.max_retry_after = max_retry_after
        self.state = BreakerState.CLOSED
        #: The reply that opened the breaker: what callers answer meanwhile.
        self.reply: Reply | None = None
        #: When the next probe may go (OPEN), or when a lost probe is given up.
        self.retry_at = 0.0
        #: The length of the current (or last) pause, seconds: what the log says.
        self.pause = 0.0
        self.consecutive = 0
        #: 429s in a row, each counted only if it was "fresh" (see :meth:`record`).
        self.throttled = 0
        self._period = 0
        self._probe_since: float | None = None

    def __repr__(self) -> str:
        return (
            f"Breaker(state={self.state.value}, consecutive={self.consecutive}, "
            f"throttled={self.throttled})"
        )

    # -- asking ---------------------------------------------------------------

    def blocked(self, now: float) -> Reply | None:
        """The reply to give instead of calling now, or None when a call may go.

        Changes nothing: for MAIL FROM, which must not use up the probe.
        """
        if self.state is BreakerState.CLOSED:
            return None
        if self.state is BreakerState.OPEN and now < self.retry_at:
            return self.reply
        if self._probe_since is not None and now < self._probe_since + self._probe_timeout():
            return self.reply  # the probe is on its way; its answer decides
        return None

    def retry_in(self, now: float) -> float:
        """Seconds until :meth:`admit` may say yes again (0 when it would now)."""
        if self.blocked(now) is None:
            return 0.0
        if self.state is BreakerState.OPEN:
            return max(0.0, self.retry_at - now)
        assert self._probe_since is not None
        return max(0.0, self._probe_since + self._probe_timeout() - now)

    def admit(self, now: float) -> Ticket | None:
        """A ticket for one call now, or None while the breaker holds calls back.

        Once the open period is over, the first caller gets the probe ticket.
        """
        if self.state is BreakerState.CLOSED:
            return Ticket(self._period)
        if self.blocked(now) is not None:
            return None
        if self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
            self._period += 1
        self._probe_since = now
        return Ticket(self._period, probe=True)

    # -- telling --------------------------------------------------------------

    def release(self, ticket: Ticket) -> None:
        """The call was not made after all (cancelled): free the probe slot."""
        if ticket.probe and ticket.period == self._period:
            self._probe_since = None

    def record(
        self, ticket: Ticket, result: ApiResult, reply: Reply, now: float, *, fresh: bool = True
    ) -> Transition:
        """Count the answer to ``ticket``'s call; ``reply`` is what it maps to.

        ``fresh`` (HTTP 429 only): the call was sent at the key's current pace.
        A 429 to a call sent before the pace last dropped says nothing the drop
        did not already hear, so it does not lengthen the run of 429s.
        """
        if ticket.period != self._period:
            return Transition.NONE  # a call from before the last change of state
        throttled = replies.is_throttled(result)
        opens = replies.opens_breaker(result)
        transport = replies.is_transport_failure(result)
        if self.state is BreakerState.CLOSED:
            if throttled:
                if result.retry_after is not None:
                    return self._open(result, reply, now)
                if fresh:
                    self.throttled += 1
                    if self.throttled >= self.throttles:
                        return self._open(result, reply, now)
                return Transition.NONE
            if opens:
                return self._open(result, reply, now)
            if transport:
                self.consecutive += 1
                if self.consecutive >= self.failures:
                    return self._open(result, reply, now)
                return Transition.NONE
            self.consecutive = 0
            self.throttled = 0  # the API answered at this pace
            return Transition.NONE
        # Half-open, and this is the probe (only the probe holds this period's ticket).
        if result.delivered:
            self.state = BreakerState.CLOSED
            self.reply = None
            self.consecutive = 0
            self.throttled = 0
            self._probe_since = None
            self._period += 1
            return Transition.CLOSED
        if opens or transport or throttled:
            return self._open(result, reply, now)
        self._probe_since = None  # inconclusive: the next call is the probe
        return Transition.NONE

    def _open(self, result: ApiResult, reply: Reply, now: float) -> Transition:
        was_open = self.state is not BreakerState.CLOSED
        wait = self.interval
        if replies.is_throttled(result) and result.retry_after is not None:
            # "a Retry-After pauses the key", capped: a proxy may ask for a day.
            wait = min(result.retry_after, self.max_retry_after)
        self.state = BreakerState.OPEN
        self.reply = reply
        self.pause = wait
        self.retry_at = now + wait
        self.throttled = 0
        self._probe_since = None
        self._period += 1
        return Transition.REOPENED if was_open else Transition.OPENED

    def _probe_timeout(self) -> float:
        # A probe whose answer never comes (its task died) must not hold the
        # breaker half-open for ever: after an interval, another call probes.
        return max(self.interval, 1.0)


class Breakers:
    """One :class:`Breaker` per API key, keyed by a digest so no key is kept twice."""

    def __init__(
        self,
        *,
        failures: int = 5,
        interval: float = 30.0,
        max_retry_after: float = MAX_RETRY_AFTER,
    ) -> None:
        self.failures = failures
        self.interval = interval
        self.max_retry_after = max_retry_after
        self._by_key: dict[str, Breaker] = {}

    def configure(
        self, *, failures: int, interval: float, max_retry_after: float = MAX_RETRY_AFTER
    ) -> None:
        """New settings (a reload) for every breaker, current ones included."""
        self.failures, self.interval = failures, interval
        self.max_retry_after = max_retry_after
        for breaker in self._by_key.values():
            breaker.failures, breaker.interval = failures, interval
            breaker.max_retry_after = max_retry_after

    def get(self, app_key: str) -> Breaker:
        digest = hashlib.sha256(app_key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        breaker = self._by_key.get(digest)
        if breaker is None:
            breaker = self._by_key[digest] = Breaker(
                failures=self.failures,
                interval=self.interval,
                max_retry_after=self.max_retry_after,
            )
        return breaker

    def __iter__(self) -> Iterator[Breaker]:
        return iter(list(self._by_key.values()))

    def by_key(self) -> list[tuple[str, Breaker]]:
        """(the first 12 hex digits of the key's digest, its breaker): the console's
        name for a key, never the key itself."""
        return [(digest[:12], breaker) for digest, breaker in self._by_key.items()]

    def any_open(self) -> bool:
        """True while any key's breaker is not closed (open or probing)."""
        return any(b.state is not BreakerState.CLOSED for b in self._by_key.values())
