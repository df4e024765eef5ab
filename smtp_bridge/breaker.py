"""The API circuit breaker (DESIGN 5, end): pure policy, the time is always passed in.

One :class:`Breaker` per API key. It opens on an answer that says every call
would fail the same way (40001, 40002, 40007), for an HTTP 429's Retry-After,
or after ``failures`` consecutive transport failures (never sent, unknown,
HTTP 5xx). While it is open no call goes out: direct mode answers the reply
that opened it, hybrid mode spools, queue workers pause. After ``interval``
exactly one call is let through as the probe; a delivery closes the breaker, a
failure of the same kind opens it again, and any other answer (a bad recipient,
say) proves nothing and frees the probe slot for the next call.

Every admitted call holds a :class:`Ticket`; only the results of tickets from
the breaker's current period count, so a late answer to a call made before the
breaker opened cannot close it, and only the probe's answer ends a half-open
period.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from . import replies
from .outcomes import ApiResult
from .replies import Reply

__all__ = ["Breaker", "BreakerState", "Breakers", "Ticket", "Transition"]


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
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Ticket:
    """Permission for one call; hand it back to :meth:`Breaker.record` or ``release``."""

    period: int
    probe: bool = False


class Breaker:
    """The breaker of one API key. Methods take ``now`` (monotonic seconds)."""

    def __init__(self, *, failures: int = 5, interval: float = 30.0) -> None:
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures!r}")
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval!r}")
        self.failures = failures
        self.interval = interval
        self.state = BreakerState.CLOSED
        #: The reply that opened the breaker: what callers answer meanwhile.
        self.reply: Reply | None = None
        #: When the next probe may go (OPEN), or when a lost probe is given up.
        self.retry_at = 0.0
        self.consecutive = 0
        self._period = 0
        self._probe_since: float | None = None

    def __repr__(self) -> str:
        return f"Breaker(state={self.state.value}, consecutive={self.consecutive})"

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

    def record(self, ticket: Ticket, result: ApiResult, reply: Reply, now: float) -> Transition:
        """Count the answer to ``ticket``'s call; ``reply`` is what it maps to."""
        if ticket.period != self._period:
            return Transition.NONE  # a call from before the last change of state
        opens = replies.opens_breaker(result)
        transport = replies.is_transport_failure(result)
        if self.state is BreakerState.CLOSED:
            if opens:
                return self._open(result, reply, now)
            if transport:
                self.consecutive += 1
                if self.consecutive >= self.failures:
                    return self._open(result, reply, now)
                return Transition.NONE
            self.consecutive = 0
            return Transition.NONE
        # Half-open, and this is the probe (only the probe holds this period's ticket).
        if result.delivered:
            self.state = BreakerState.CLOSED
            self.reply = None
            self.consecutive = 0
            self._probe_since = None
            self._period += 1
            return Transition.CLOSED
        if opens or transport:
            return self._open(result, reply, now)
        self._probe_since = None  # inconclusive: the next call is the probe
        return Transition.NONE

    def _open(self, result: ApiResult, reply: Reply, now: float) -> Transition:
        was_open = self.state is not BreakerState.CLOSED
        wait = self.interval
        if result.http_status == 429 and result.retry_after is not None:
            wait = result.retry_after  # "opens it for its Retry-After" (DESIGN 5)
        self.state = BreakerState.OPEN
        self.reply = reply
        self.retry_at = now + wait
        self._probe_since = None
        self._period += 1
        return Transition.NONE if was_open else Transition.OPENED

    def _probe_timeout(self) -> float:
        # A probe whose answer never comes (its task died) must not hold the
        # breaker half-open for ever: after an interval, another call probes.
        return max(self.interval, 1.0)


class Breakers:
    """One :class:`Breaker` per API key, keyed by a digest so no key is kept twice."""

    def __init__(self, *, failures: int = 5, interval: float = 30.0) -> None:
        self.failures = failures
        self.interval = interval
        self._by_key: dict[str, Breaker] = {}

    def configure(self, *, failures: int, interval: float) -> None:
        """New settings (a reload) for every breaker, current ones included."""
        self.failures, self.interval = failures, interval
        for breaker in self._by_key.values():
            breaker.failures, breaker.interval = failures, interval

    def get(self, app_key: str) -> Breaker:
        digest = hashlib.sha256(app_key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        breaker = self._by_key.get(digest)
        if breaker is None:
            breaker = self._by_key[digest] = Breaker(failures=self.failures, interval=self.interval)
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
