"""The gate every API call passes, a session's or a worker's: per API key the circuit
breaker (:mod:`smtp_bridge.breaker`) and the pace (:mod:`smtp_bridge.aimd`), the
process-wide rate limit (:mod:`smtp_bridge.ratelimit`), the 40006 resend, the
Retry-After cap, metrics and the reply table."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import replies
from .aimd import KeyPace, Paces
from .api import ApiClient
from .breaker import MAX_RETRY_AFTER, Breaker, Breakers, BreakerState, Transition, cap_retry_after
from .config import ApiConfig
from .logs import log_event
from .metrics import Metrics, api_code_label
from .outcomes import ApiRequest, ApiResult, ResultKind
from .ratelimit import RateLimiter
from .replies import Reply

__all__ = ["ApiGate", "Attempt"]

log = logging.getLogger("smtp_bridge.delivery")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One recipient's call through the gate: the API's result and its reply.

    ``result`` None: the breaker held the call back and ``reply`` is the one
    that opened it; nothing was sent.
    """

    result: ApiResult | None
    reply: Reply
    calls: int = 0


class ApiGate:
    """The breaker and the pace per API key, the rate limit, the 40006 resend and the reply table.

    Per key: the breaker (:mod:`smtp_bridge.breaker`) pauses it; the pace
    (:mod:`smtp_bridge.aimd`) slows it down after an HTTP 429 and lets it speed
    up again as calls succeed; calls over its allowed concurrency wait for a
    slot (at most ``api.timeout``), they are not refused. A Retry-After is cut
    to ``api.max_retry_after``, for the breaker and the spool's backoff alike.

    ``clock`` (monotonic seconds) drives the breakers; tests may replace it.
    ``api`` may be swapped (a reload builds a new client).
    """

    def __init__(
        self,
        api: ApiClient,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.breakers = Breakers()
        self.paces = Paces()
        self.limiter = RateLimiter()
        #: Called when a breaker closes (the queue workers resume at once).
        self.on_closed: list[Callable[[], None]] = []
        self._settings: ApiConfig | None = None

    def configure(self, settings: ApiConfig) -> None:
        """Take ``api.breaker_*``, ``max_retry_after``, ``max_concurrency`` and ``rate_limit``
        (cheap when unchanged)."""
        if settings is self._settings:
            return
        self._settings = settings
        self.breakers.configure(
            failures=settings.breaker_failures,
            interval=settings.breaker_interval,
            max_retry_after=settings.max_retry_after,
        )
        default_key = settings.app_key.get_secret_value() if settings.app_key else ""
        self.paces.configure(
            ceiling=settings.max_concurrency, rate=settings.rate_limit, default_key=default_key
        )
        self.limiter.set_rate(settings.rate_limit)
        self.metrics.api_concurrency.clear()  # labels follow a new api.app_key
        self.paces.get(default_key)  # the default key shows from the start
        for pace in self.paces:
            self.metrics.api_concurrency.labels(key=pace.label).set(pace.pace.limit)

    def blocked(self, app_key: str) -> Reply | None:
        """The reply the breaker of ``app_key`` gives instead of a call now, or None."""
        return self.breakers.get(app_key).blocked(self.clock())

    def retry_in(self, app_key: str) -> float:
        """Seconds until the breaker of ``app_key`` lets a call (the probe) through."""
        return self.breakers.get(app_key).retry_in(self.clock())

    def closed(self, app_key: str) -> bool:
        return self.breakers.get(app_key).state is BreakerState.CLOSED

    def is_open(self) -> bool:
        """True while the breaker of any API key is open or probing."""
        return self.breakers.any_open()

    async def call(
        self,
        request: ApiRequest,
        app_key: str,
        overrides: dict[str, Reply] | None = None,
        **log_fields: Any,
    ) -> Attempt:
        """One recipient's API call, unless the breaker holds it back.

        Waits for a slot under the key's pace; when none frees within
        ``api.timeout`` the call is not made and the recipient gets
        ``451 4.4.5`` (``result`` None, as when the breaker holds it back).
        """
        breaker = self.breakers.get(app_key)
        ticket = breaker.admit(self.clock())
        if ticket is None:
            return Attempt(None, breaker.reply or replies.NEVER_SENT)
        pace = self.paces.get(app_key)
        wait = self._settings.timeout if self._settings is not None else None
        try:
            epoch = pace.try_acquire()
            if epoch is None:
                async with asyncio.timeout(wait):
                    epoch = await pace.acquire()
        except TimeoutError:
            breaker.release(ticket)
            log_event(
                log, "api_pace_wait_expired", level=logging.WARNING, key=pace.label, **log_fields
            )
            return Attempt(None, replies.THROTTLED)
        except BaseException:
            breaker.release(ticket)
            raise
        if not ticket.probe and breaker.blocked(self.clock()) is not None:
            pace.release()  # the breaker opened while this call waited for its slot
            return Attempt(None, breaker.reply or replies.NEVER_SENT)
        try:
            await self.limiter.acquire()
            result = await self._send(request, app_key, pace.label)
            calls = 1
            if result.kind is ResultKind.API and result.code == 40006 and request.reply_to:
                # An optional header must not lose the mail: resend without it (docs/replies.md).
                log_event(log, "reply_to_rejected", level=logging.WARNING, **log_fields)
                await self.limiter.acquire()
                result = await self._send(request.without_reply_to(), app_key, pace.label)
                calls = 2
        except BaseException:
            breaker.release(ticket)
            pace.release()
            raise
        fresh = self._pace(pace, epoch, result)  # before the slot goes to a waiter
        pace.release()
        reply = replies.reply_for(result, overrides)
        transition = breaker.record(ticket, result, reply, self.clock(), fresh=fresh)
        self._log_transition(transition, breaker, result, reply, pace.label)
        self.metrics.breaker_open.set(1 if self.is_open() else 0)
        return Attempt(result, reply, calls)

    async def _send(self, request: ApiRequest, app_key: str, label: str) -> ApiResult:
        """One POST; a Retry-After over ``api.max_retry_after`` is cut, with a warning."""
        result = await self.api.send(request, app_key)
        self.metrics.observe_api(result)
        limit = self._settings.max_retry_after if self._settings is not None else MAX_RETRY_AFTER
        capped = cap_retry_after(result, limit)
        if capped is not result:
            log_event(
                log,
                "retry_after_capped",
                level=logging.WARNING,
                key=label,
                retry_after=result.retry_after,
                used=capped.retry_after,
            )
        return capped

    def _pace(self, pace: KeyPace, epoch: int, result: ApiResult) -> bool:
        """Feed the answer to the key's pace; True for a fresh 429 (see Breaker.record)."""
        before = pace.pace.limit
        fresh = False
        if replies.is_throttled(result):
            fresh = pace.throttled(epoch)
            if fresh:
                log_event(
                    log,
                    "api_throttled",
                    level=logging.WARNING,
                    key=pace.label,
                    limit=pace.pace.limit,
                    was=before,
                )
        elif result.kind is ResultKind.API:
            pace.succeeded()
        if pace.pace.limit != before:
            self.metrics.api_concurrency.labels(key=pace.label).set(pace.pace.limit)
        return fresh

    def _log_transition(
        self,
        transition: Transition,
        breaker: Breaker,
        result: ApiResult,
        reply: Reply,
        label: str,
    ) -> None:
        """One line per change of a breaker's pause (docs/replies.md): opened, reopened, closed."""
        if transition in (Transition.OPENED, Transition.REOPENED):
            log_event(
                log,
                f"breaker_{transition.value}",
                level=logging.ERROR,
                key=label,
                cause=api_code_label(result),
                reply=str(reply),
                pause=round(breaker.pause, 3),
                retry_in=round(breaker.retry_in(self.clock()), 3),
            )
        elif transition is Transition.CLOSED:
            log_event(log, "breaker_closed", key=label)
            for callback in self.on_closed:
                callback()
