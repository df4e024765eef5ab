"""One attempt at one spooled recipient: plan it, call the API, settle what became of it.

The queue worker (:mod:`smtp_bridge.worker`) claims the recipient, counting the
attempt, and runs a :class:`SpoolAttempt` for it. The claim is renewed while the
attempt runs, and its end is written under ``asyncio.shield`` only while the
claim is still ours, so cancelling a worker never loses what the API answered
and a worker whose lease ran out never overwrites the one that took over.

Each attempt plans the recipient with the routes of the *current* config (a
reload that fixes a template helps mail already spooled), sends through the
same :class:`~smtp_bridge.gate.ApiGate` as SMTP sessions and then either records
the delivery, schedules the next try (``delivery.backoff`` with jitter, never
before Retry-After, which the gate cuts to ``api.max_retry_after``, never after
``max_age``) or makes a dead letter, spooling a failure notice to the sender
in the same transaction when ``delivery.bounce_template_id`` is set
(:func:`~smtp_bridge.settle.bury`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import replies
from .auth import Authenticator
from .calls import Call
from .config import Config
from .errors import StoreError
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
)
from .rules import Router
from .settle import bury, write_until_recorded
from .store import MessageRecord, Notice, RecipientRecord, StateStore
from .templating import ClientInfo

__all__ = ["PARSE_IN_THREAD_BYTES", "AttemptDeps", "SpoolAttempt", "WorkerRuntime"]

log = logging.getLogger("smtp_bridge.worker")

#: Parse spooled content in a thread above this size (as sessions do).
PARSE_IN_THREAD_BYTES = 256 * 1024
#: States whose attempt is over for good, with nothing more to decide.
_DONE = (RecipientState.DELIVERED, RecipientState.DROPPED, RecipientState.DUPLICATE)


class WorkerRuntime(Protocol):
    """What a worker needs of the daemon's current runtime (``server.Runtime``)."""

    @property
    def config(self) -> Config: ...

    @property
    def router(self) -> Router: ...

    @property
    def authenticator(self) -> Authenticator: ...


@dataclass(frozen=True, slots=True)
class AttemptDeps:
    """What every attempt works with, passed in by the queue worker."""

    gate: ApiGate
    store: StateStore
    #: The current runtime (it changes on reload).
    runtime: Callable[[], WorkerRuntime]
    metrics: Metrics
    #: Wall time, as stored in the spool.
    clock: Callable[[], float]
    #: The backoff's jitter.
    rand: Callable[[], float]
    #: The worker is stopping: a final write still failing gets one last try.
    stopping: Callable[[], bool]
    #: New work in the spool (a failure notice): the worker looks at once.
    wake: Callable[[], None]


class SpoolAttempt:
    """One attempt at one claimed recipient; :meth:`run` it once."""

    def __init__(self, deps: AttemptDeps, message: MessageRecord, record: RecipientRecord) -> None:
        self.deps = deps
        self.message = message
        self.record = record
        #: The API call may have left: an interruption makes it UNKNOWN.
        self.sent = False
        #: The attempt's final write is on its way: nothing more to do.
        self.settled = False
        #: What every line about this attempt names it by.
        self.where: dict[str, Any] = {"queue_id": record.queue_id, "rcpt": record.rcpt}

    async def run(self) -> None:
        """Deliver, retry later or dead-letter; whatever happens, the mail is not lost."""
        keeper = asyncio.get_running_loop().create_task(self._keep_claim())
        try:
            await self._deliver()
        except asyncio.CancelledError:
            with contextlib.suppress(StoreError):
                await asyncio.shield(self._interrupted())
            raise
        except StoreError as exc:
            # The claim stays; its lease expiry brings the recipient back.
            log_event(log, "store_error", level=logging.ERROR, **self.where, error=str(exc))
        except Exception:
            # A bug must not lose the mail: log it and try again later.
            log.exception("delivery attempt failed", extra={"bridge_fields": self.where})
            if self.settled:
                return
            record = self.record
            outcome = RecipientOutcome(record.rcpt, record.state, replies.INTERNAL, record.route)
            with contextlib.suppress(StoreError):
                await self._settle(outcome, self.deps.runtime().config)
        finally:
            keeper.cancel()

    async def _keep_claim(self) -> None:
        """Renew the claim every third of its lease while the attempt runs."""
        record = self.record
        while True:
            lease = self.deps.runtime().config.delivery.claim_lease
            await asyncio.sleep(lease / 3)
            try:
                kept = await self.deps.store.renew_claim(record.queue_id, record.rcpt, lease=lease)
            except StoreError as exc:
                log_event(
                    log, "claim_renew_failed", level=logging.WARNING, error=str(exc), **self.where
                )
                continue
            if not kept:
                self._claim_lost()
                return

    def _claim_lost(self, **fields: Any) -> None:
        # Another claimer took the recipient over after our lease ran out.
        log_event(log, "claim_lost", level=logging.WARNING, **self.where, **fields)

    async def _deliver(self) -> None:
        message, record, deps = self.message, self.record, self.deps
        runtime = deps.runtime()
        config = runtime.config
        user_key = runtime.authenticator.credentials.app_key(message.user) if message.user else ""
        app_key = user_key or config.app_key()
        if message.mode == NOTICE_MODE:
            request = _notice_request(message, record)
            if request is None:
                bad = RecipientOutcome(
                    record.rcpt, RecipientState.FAILED, replies.INTERNAL, NOTICE_ROUTE
                )
                await self._settle(bad, config)
                return
            call = Call(message.queue_id, record.rcpt, NOTICE_ROUTE, request)
        else:
            assert message.content is not None  # claim_due only claims spooled messages
            content = message.content
            if len(content) > PARSE_IN_THREAD_BYTES:
                parsed = await asyncio.to_thread(parse_message, content)
            else:
                parsed = parse_message(content)
            previous = await deps.store.previous_outcomes(message.message_key, [record.rcpt])
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
                await self._settle(plan.outcome, config)
                return
            assert plan.request is not None and plan.route is not None
            call = Call(message.queue_id, record.rcpt, plan.route.name, plan.request)
        self.sent = True
        attempt = await deps.gate.call(call.request, app_key, config.replies, **call.fields)
        if attempt.result is None:
            # Held back by the breaker: nothing was sent, hand the recipient back.
            self.sent = False
            self.settled = True
            retry_at = deps.clock() + max(deps.gate.retry_in(app_key), 0.05)
            await asyncio.shield(
                deps.store.release_claim(record.queue_id, record.rcpt, next_attempt=retry_at)
            )
            log_event(log, "breaker_held", reply=str(attempt.reply), **call.fields)
            return
        outcome, error = call.answered(attempt, attempt=record.attempts)
        await self._settle(outcome, config, error)

    async def _settle(self, outcome: RecipientOutcome, config: Config, error: str = "") -> None:
        """Write what became of the attempt (under shield): done, next try, or dead.

        The write is committed even if the attempt is cancelled meanwhile.
        """
        self.settled = True
        message, record = self.message, self.record
        now = self.deps.clock()
        attempts = record.attempts + max(outcome.attempts - 1, 0)
        fields: dict[str, Any] = {**self.where, "route": outcome.route, "attempt": attempts}
        final = outcome.record(record.queue_id, now=now, attempts=attempts, error=error)
        if outcome.state in _DONE:
            await asyncio.shield(self._recorded(final))
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
                rand=self.deps.rand,
            )
            retry_at = min(now + delay, deadline)  # one last try at max_age
            state = outcome.state
            if state not in (RecipientState.RETRYING, RecipientState.UNKNOWN):
                state = RecipientState.RETRYING
            waiting = dataclasses.replace(final, state=state, next_attempt=retry_at)
            await asyncio.shield(self._recorded(waiting))
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
            lambda dead, notice: asyncio.shield(self._recorded(dead, notice)),
            config=config,
            reason=reason,
            now=now,
            wake=self.deps.wake,
            columns={"attempts": attempts, "error": (error or reason)[:200]},
            attempt=attempts,
        )
        self._count(outcome.route, RecipientState.DEAD)

    async def _recorded(self, record: RecipientRecord, notice: Notice | None = None) -> None:
        """Write an attempt's end, retrying until the store takes it.

        The call was made: its outcome must reach the ledger, or the next attempt
        could not know to skip it. Meanwhile the claim (renewed by _keep_claim)
        keeps other claimers off. Stopping, it gets one last try; if that fails
        too the line ``outcome_unrecorded`` says so, and the lease's expiry makes
        the next attempt a logged possible duplicate.
        """
        state = RecipientState(record.state).value
        kept, _ = await write_until_recorded(
            lambda: self.deps.store.update_recipient(
                record, message_key=self.message.message_key, notice=notice, claim=True
            ),
            about={**self.where, "state": state},
            stopping=self.deps.stopping,
            retry_fields=self.where,
        )
        if not kept:
            self._claim_lost(state=state)

    async def _interrupted(self) -> None:
        """Shutdown cancelled the attempt: leave the recipient due for the next run."""
        if self.settled:
            return
        record, store = self.record, self.deps.store
        now = self.deps.clock()
        if not self.sent:
            due = record.next_attempt if record.next_attempt is not None else now
            await store.release_claim(record.queue_id, record.rcpt, next_attempt=due)
            return
        unknown = RecipientOutcome(
            record.rcpt,
            RecipientState.UNKNOWN,
            replies.OUTCOME_UNKNOWN,
            record.route,
            record.template_id,
        ).record(
            record.queue_id,
            now=now,
            attempts=record.attempts,
            next_attempt=now,
            error="interrupted at shutdown: the call may have been sent",
        )
        await store.update_recipient(unknown, message_key=self.message.message_key, claim=True)

    def _count(self, route: str, state: RecipientState) -> None:
        self.deps.metrics.messages.labels(route=route or "-", outcome=state.value).inc()


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
