"""Queue workers: claim due spooled recipients, deliver, retry with backoff, dead-letter.

Retries are data (STYLE 9): :meth:`Spool.claim_due` counts the attempt and
leases the recipient (``delivery.claim_lease``) in one commit before the call is
made; the lease is renewed while the attempt runs, and the final state of the
attempt is written under ``asyncio.shield`` only while the claim is still ours,
so cancelling a worker never loses what the API answered and a worker whose
lease ran out never overwrites the one that took over. A recipient whose attempt
never finished (``kill -9``, power loss) is picked up again: when its lease
expires, or at once by the next daemon that recovers the spool's claims
(:meth:`Spool.recover_claims`).

Each attempt plans the recipient with the routes of the *current* config (a
reload that fixes a template helps mail already spooled), sends through the
same :class:`~smtp_bridge.gate.ApiGate` as SMTP sessions (breaker, the
key's pace after HTTP 429s, rate limit, reply table) and then either records
the delivery, schedules the next try (``delivery.backoff`` with jitter, never
before Retry-After, which the gate cuts to ``api.max_retry_after``, never after
``max_age``) or makes a dead letter, spooling a failure notice to the sender
in the same transaction when ``delivery.bounce_template_id`` is set.

While the breaker of the default API key is open the workers claim nothing;
when its pause is over they claim one recipient, the probe, and resume
once it is delivered. New work wakes them at once (:meth:`QueueWorker.wake`);
they also look at the spool every ``idle_poll`` seconds for changes made by
another process (``smtp-bridge queue retry``).

Each finished attempt, whatever its end, gives a token back to the
``in_flow_delay`` gate (:mod:`smtp_bridge.flow`) that queue-mode sessions take
one from per message; while the workers pause or stop, nobody waits for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import replies
from .auth import Authenticator
from .calls import Call
from .config import Config
from .errors import StoreError
from .flow import InFlow
from .gate import ApiGate
from .logs import log_event
from .message import parse_message
from .metrics import Metrics
from .outcomes import ApiRequest, RecipientState
from .policy import (
    NOTICE_MODE,
    NOTICE_ROUTE,
    Origin,
    RecipientOutcome,
    next_delay,
    plan_recipient,
    session_lease,
)
from .rules import Router
from .settle import bury, write_until_recorded
from .store import MessageRecord, Notice, RecipientRecord, StateStore
from .templating import ClientInfo

__all__ = ["QueueWorker", "WorkerRuntime"]

log = logging.getLogger("smtp_bridge.worker")

#: Parse spooled content in a thread above this size (as sessions do).
PARSE_IN_THREAD_BYTES = 256 * 1024
#: Seconds between refreshes of the spool gauges.
STATS_INTERVAL = 2.0
#: Seconds between looks for what sessions that died left in flight.
RESOLVE_INTERVAL = 30.0
#: Seconds between purges of records older than ``delivery.dedup_ttl``.
PURGE_INTERVAL = 600.0


class WorkerRuntime(Protocol):
    """What a worker needs of the daemon's current runtime (``server.Runtime``)."""

    @property
    def config(self) -> Config: ...

    @property
    def router(self) -> Router: ...

    @property
    def authenticator(self) -> Authenticator: ...


@dataclass(slots=True)
class _Progress:
    sent: bool = False  # the API call may have left: an interruption makes it UNKNOWN
    settled: bool = False  # the attempt's final write is on its way: nothing more to do


class QueueWorker:
    """Delivers the spool. ``start()`` once; ``stop(grace)`` at shutdown.

    ``runtime`` returns the current runtime (it changes on reload); ``clock`` is
    wall time, as stored in the spool.
    """

    def __init__(
        self,
        gate: ApiGate,
        store: StateStore,
        runtime: Callable[[], WorkerRuntime],
        *,
        mode: str,
        flow: InFlow,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        idle_poll: float = 1.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.mode = mode
        self.store = store
        self.gate = gate
        self.metrics = metrics
        self.clock = clock
        self.idle_poll = idle_poll
        self.rand = rand
        self._runtime = runtime
        self._wake = asyncio.Event()
        self.gate.on_closed.append(self.wake)  # a session's probe may close the breaker
        self.flow = flow
        self._tasks: dict[asyncio.Task[None], tuple[str, str]] = {}
        self._probe: asyncio.Task[None] | None = None
        self._stopping = False
        self._main: asyncio.Task[None] | None = None
        self._stats_at = float("-inf")
        self._purged_at = float("-inf")
        self._resolved_at = float("-inf")
        #: Attempts finished (recorded, handed back or failed) since start.
        self.attempts_done = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        if self._main is None:
            # The store was just opened and its stale rows settled (service.py):
            # the next look is one interval from now.
            self._resolved_at = self.clock()
            self._main = asyncio.get_running_loop().create_task(self._loop())
            self.flow.attach(self._delivering, self._capacity(self._runtime().config))

    def _delivering(self) -> bool:
        """Attempts are running or about to: not stopping, the default key's breaker closed."""
        return not self._stopping and self.gate.closed(self._runtime().config.app_key())

    def wake(self) -> None:
        """New work in the spool (or a slot free): look now, not at the next poll."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Attempts running now."""
        return len(self._tasks)

    async def wait_attempts(self, count: int) -> None:
        """Wait until ``count`` attempts in all have finished since start.

        For tests and tools that must know a spooled recipient's attempt is
        recorded, without sleeping.
        """
        if self.attempts_done >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove((count, future))

    async def stop(self, grace: float) -> None:
        """Claim nothing more; let attempts in flight finish within ``grace`` seconds.

        Attempts still running then are cancelled: one that had sent its call is
        recorded UNKNOWN (sent again after restart, logged as a possible
        duplicate), one that had not is handed back untouched. Everything not
        delivered stays in the spool.
        """
        self._stopping = True
        self.flow.detach()  # no attempt will give a token back: no session waits for one
        self._wake.set()
        if self._main is not None:
            await self._main
        tasks = list(self._tasks)
        if tasks:
            log_event(log, "worker_draining", in_flight=len(tasks), grace=grace)
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log_event(log, "worker_interrupted", level=logging.WARNING, attempts=len(pending))
                await asyncio.wait(pending)

    # -- the loop -------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                timeout = await self._step()
            except StoreError as exc:
                log_event(log, "worker_store_error", level=logging.ERROR, error=str(exc))
                timeout = self.idle_poll
            except Exception:
                log.exception("worker step failed")
                timeout = self.idle_poll
            if self._stopping:
                break
            if timeout is None:
                await asyncio.sleep(0)  # let the attempts just started run
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _step(self) -> float | None:
        """Claim what is due; return how long to wait before the next look (None: now)."""
        runtime = self._runtime()
        config = runtime.config
        self.gate.configure(config.api)
        now = self.clock()
        # Mail admitted but not in the spool by ``now`` may be work this step's
        # claim misses (not yet committed, or due after ``now``): see top_up.
        finished = self.flow.finished
        await self._housekeeping(now)
        capacity = self._capacity(config)
        self.flow.resize(capacity)
        free = capacity - len(self._tasks)
        if free <= 0:
            return self.idle_poll  # a finishing attempt wakes the loop
        default_key = config.app_key()
        if not self.gate.closed(default_key):
            self.flow.release_all()  # paused: the spool takes the mail at full speed
        paused_for = self.gate.retry_in(default_key)
        if paused_for > 0:
            return max(paused_for, 0.01)  # breaker open: the workers pause (docs/replies.md)
        if not self.gate.closed(default_key):
            if self._probe is not None and not self._probe.done():
                return self.idle_poll  # the probe's end wakes the loop
            limit = 1  # half-open: one recipient is the probe
        else:
            limit = free
        claimed = await self.store.claim_due(now=now, limit=limit, lease=self._lease(config))
        running = set(self._tasks.values())
        for message, record in claimed:
            if (record.queue_id, record.rcpt.lower()) in running:
                continue  # its lease ran out under a live attempt, which decides
            task = self._spawn(message, record)
            if limit == 1 and not self.gate.closed(default_key):
                self._probe = task
        if claimed and len(claimed) == limit:
            return None  # there may be more due
        if self.gate.closed(default_key):
            # Nothing more is due and slots are idle: that much can be accepted
            # at once (tokens lost to mail another process delivered come back).
            self.flow.top_up(capacity - len(self._tasks), finished)
        due = await self.store.next_due()
        if due is None:
            return self.idle_poll
        return min(max(due - self.clock(), 0.01), self.idle_poll)

    def _capacity(self, config: Config) -> int:
        # In queue mode the workers make every call; otherwise leave half of
        # the API slots to SMTP sessions, which have a client waiting.
        slots = config.api.max_concurrency
        return slots if self.mode == "queue" else max(1, slots // 2)

    def _lease(self, config: Config) -> float:
        # Renewed every third of itself while the attempt runs (_keep_claim).
        return config.delivery.claim_lease

    async def _housekeeping(self, now: float) -> None:
        if now - self._stats_at >= STATS_INTERVAL:
            self._stats_at = now
            await self.refresh_gauges()
        if now - self._resolved_at >= RESOLVE_INTERVAL:
            self._resolved_at = now
            config = self._runtime().config
            settled = await self.store.resolve_stale(older_than=2 * session_lease(config))
            if settled:
                log_event(log, "stale_settled", level=logging.WARNING, rows=settled)
        if now - self._purged_at >= PURGE_INTERVAL:
            self._purged_at = now
            removed = await self.store.purge_expired()
            if removed:
                log_event(log, "purged", rows=removed)

    async def refresh_gauges(self) -> None:
        """queue_depth, queue_oldest_age, dead_letters and breaker_open, from the store."""
        depth, oldest = await self.store.spool_stats()
        dead = await self.store.dead_letters()
        age = max(0.0, self.clock() - oldest) if oldest is not None else 0.0
        self.metrics.queue_depth.set(depth)
        self.metrics.queue_oldest_age.set(age)
        self.metrics.dead_letters.set(dead)
        self.metrics.breaker_open.set(1 if self.gate.is_open() else 0)

    def _spawn(self, message: MessageRecord, record: RecipientRecord) -> asyncio.Task[None]:
        key = (record.queue_id, record.rcpt.lower())
        task = asyncio.get_running_loop().create_task(self._attempt(message, record))
        self._tasks[task] = key
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self.flow.give()  # any end: recorded, handed back, failed to write, cancelled
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery attempt failed", exc_info=task.exception())
        self.attempts_done += 1
        for count, future in self._waiters:
            if self.attempts_done >= count and not future.done():
                future.set_result(None)

    # -- one attempt ----------------------------------------------------------

    async def _attempt(self, message: MessageRecord, record: RecipientRecord) -> None:
        progress = _Progress()
        keeper = asyncio.get_running_loop().create_task(self._keep_claim(record))
        try:
            await self._deliver(message, record, progress)
        except asyncio.CancelledError:
            with contextlib.suppress(StoreError):
                await asyncio.shield(self._interrupted(record, message, progress))
            raise
        except StoreError as exc:
            # The claim stays; its lease expiry brings the recipient back.
            log_event(
                log,
                "store_error",
                level=logging.ERROR,
                queue_id=record.queue_id,
                rcpt=record.rcpt,
                error=str(exc),
            )
        except Exception:
            # A bug must not lose the mail: log it and try again later.
            log.exception(
                "delivery attempt failed",
                extra={"bridge_fields": {"queue_id": record.queue_id, "rcpt": record.rcpt}},
            )
            if progress.settled:
                return
            outcome = RecipientOutcome(record.rcpt, record.state, replies.INTERNAL, record.route)
            with contextlib.suppress(StoreError):
                await self._settle(message, record, outcome, self._runtime().config, progress)
        finally:
            keeper.cancel()

    async def _keep_claim(self, record: RecipientRecord) -> None:
        """Renew the claim every third of its lease while the attempt runs."""
        while True:
            lease = self._lease(self._runtime().config)
            await asyncio.sleep(lease / 3)
            try:
                kept = await self.store.renew_claim(record.queue_id, record.rcpt, lease=lease)
            except StoreError as exc:
                log_event(
                    log,
                    "claim_renew_failed",
                    level=logging.WARNING,
                    error=str(exc),
                    queue_id=record.queue_id,
                    rcpt=record.rcpt,
                )
                continue
            if not kept:
                log_event(
                    log,
                    "claim_lost",
                    level=logging.WARNING,
                    queue_id=record.queue_id,
                    rcpt=record.rcpt,
                )
                return

    async def _deliver(
        self, message: MessageRecord, record: RecipientRecord, progress: _Progress
    ) -> None:
        runtime = self._runtime()
        config = runtime.config
        user_key = runtime.authenticator.credentials.app_key(message.user) if message.user else ""
        app_key = user_key or config.app_key()
        if message.mode == NOTICE_MODE:
            request = _notice_request(message, record)
            if request is None:
                bad = RecipientOutcome(
                    record.rcpt, RecipientState.FAILED, replies.INTERNAL, NOTICE_ROUTE
                )
                await self._settle(message, record, bad, config, progress)
                return
            call = Call(message.queue_id, record.rcpt, NOTICE_ROUTE, request)
        else:
            assert message.content is not None  # claim_due only claims spooled messages
            content = message.content
            if len(content) > PARSE_IN_THREAD_BYTES:
                parsed = await asyncio.to_thread(parse_message, content)
            else:
                parsed = parse_message(content)
            previous = await self.store.previous_outcomes(message.message_key, [record.rcpt])
            before = previous.get(record.rcpt.lower())
            if before is None and record.state is RecipientState.UNKNOWN:
                before = RecipientState.UNKNOWN  # an interrupted attempt may have sent it
            plan = plan_recipient(
                parsed,
                record.rcpt,
                config=config,
                router=runtime.router,
                mail_from=message.mail_from,
                user=message.user,
                client=ClientInfo(message.client),
                previous=before,
                queue_id=message.queue_id,
            )
            if plan.outcome is not None:
                await self._settle(message, record, plan.outcome, config, progress)
                return
            assert plan.request is not None and plan.route is not None
            call = Call(message.queue_id, record.rcpt, plan.route.name, plan.request)
        progress.sent = True
        attempt = await self.gate.call(call.request, app_key, config.replies, **call.fields)
        if attempt.result is None:
            # Held back by the breaker: nothing was sent, hand the recipient back.
            progress.sent = False
            progress.settled = True
            retry_at = self.clock() + max(self.gate.retry_in(app_key), 0.05)
            await asyncio.shield(
                self.store.release_claim(record.queue_id, record.rcpt, next_attempt=retry_at)
            )
            log_event(log, "breaker_held", reply=str(attempt.reply), **call.fields)
            return
        outcome, error = call.answered(attempt, attempt=record.attempts)
        await self._settle(message, record, outcome, config, progress, error)

    async def _settle(
        self,
        message: MessageRecord,
        record: RecipientRecord,
        outcome: RecipientOutcome,
        config: Config,
        progress: _Progress,
        error: str = "",
    ) -> None:
        """Write what became of the attempt (under shield): done, next try, or dead.

        The write is committed even if the attempt is cancelled meanwhile.
        """
        progress.settled = True
        now = self.clock()
        attempts = record.attempts + max(outcome.attempts - 1, 0)
        fields: dict[str, Any] = {
            "queue_id": message.queue_id,
            "rcpt": record.rcpt,
            "route": outcome.route,
            "attempt": attempts,
        }
        final = outcome.record(record.queue_id, now=now, attempts=attempts, error=error)
        if outcome.state in (
            RecipientState.DELIVERED,
            RecipientState.DROPPED,
            RecipientState.DUPLICATE,
        ):
            await asyncio.shield(self._recorded(final, message.message_key))
            log_event(log, outcome.state.value, age=round(now - message.received_at, 3), **fields)
            self._count(outcome.route, outcome.state)
            return
        spooled_at = record.spooled_at if record.spooled_at is not None else message.received_at
        deadline = spooled_at + config.delivery.max_age
        if outcome.reply.is_permanent:
            reason = str(outcome.reply)
        elif now >= deadline:
            reason = f"gave up after {_duration(config.delivery.max_age)}: {outcome.reply}"
        else:
            delay = next_delay(
                attempts,
                config.delivery.backoff,
                retry_after=outcome.retry_after,
                rand=self.rand,
            )
            retry_at = min(now + delay, deadline)  # one last try at max_age
            state = outcome.state
            if state not in (RecipientState.RETRYING, RecipientState.UNKNOWN):
                state = RecipientState.RETRYING
            waiting = dataclasses.replace(final, state=state, next_attempt=retry_at)
            await asyncio.shield(self._recorded(waiting, message.message_key))
            log_event(
                log,
                "retry_scheduled",
                level=logging.WARNING,
                reply=str(outcome.reply),
                retry_in=round(retry_at - now, 3),
                **fields,
            )
            self._count(outcome.route, state)
            return
        origin = Origin(
            message.queue_id, message.mail_from, message.subject, message.user, message.client
        )
        await bury(
            dataclasses.replace(outcome, rcpt=record.rcpt),
            origin,
            lambda dead, notice: asyncio.shield(self._recorded(dead, message.message_key, notice)),
            config=config,
            reason=reason,
            now=now,
            wake=self.wake,
            columns={"attempts": attempts, "error": (error or reason)[:200]},
            attempt=attempts,
        )
        self._count(outcome.route, RecipientState.DEAD)

    async def _recorded(
        self, record: RecipientRecord, message_key: str, notice: Notice | None = None
    ) -> None:
        """Write an attempt's end, retrying until the store takes it.

        The call was made: its outcome must reach the ledger, or the next attempt
        could not know to skip it. Meanwhile the claim (renewed by _keep_claim)
        keeps other claimers off. Stopping, it gets one last try; if that fails
        too the line ``outcome_unrecorded`` says so, and the lease's expiry makes
        the next attempt a logged possible duplicate.
        """
        where = {"queue_id": record.queue_id, "rcpt": record.rcpt}
        state = RecipientState(record.state).value
        kept, _ = await write_until_recorded(
            lambda: self.store.update_recipient(
                record, message_key=message_key, notice=notice, claim=True
            ),
            about={**where, "state": state},
            stopping=lambda: self._stopping,
            retry_fields=where,
        )
        if not kept:
            log_event(log, "claim_lost", level=logging.WARNING, **where, state=state)

    async def _interrupted(
        self, record: RecipientRecord, message: MessageRecord, progress: _Progress
    ) -> None:
        """Shutdown cancelled the attempt: leave the recipient due for the next run."""
        if progress.settled:
            return
        now = self.clock()
        if not progress.sent:
            due = record.next_attempt if record.next_attempt is not None else now
            await self.store.release_claim(record.queue_id, record.rcpt, next_attempt=due)
            return
        unknown = RecipientRecord(
            queue_id=record.queue_id,
            rcpt=record.rcpt,
            state=RecipientState.UNKNOWN,
            route=record.route,
            template_id=record.template_id,
            reply=str(replies.OUTCOME_UNKNOWN),
            attempts=record.attempts,
            next_attempt=now,
            updated_at=now,
            error="interrupted at shutdown: the call may have been sent",
        )
        await self.store.update_recipient(unknown, message_key=message.message_key, claim=True)

    def _count(self, route: str, state: RecipientState) -> None:
        self.metrics.messages.labels(route=route or "-", outcome=state.value).inc()


def _notice_request(message: MessageRecord, record: RecipientRecord) -> ApiRequest | None:
    """The API request a spooled failure notice carries, or None if it is unreadable."""
    try:
        doc = json.loads(message.content or b"")
        template_id, data = doc["template_id"], doc["data"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(template_id, str) or not isinstance(data, dict):
        return None
    return ApiRequest(template_id=template_id, to=record.rcpt, data=data)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
