"""One message delivered in the modes of docs/guarantees.md.

``direct``: the recipients' API calls run while the client waits, and the reply
says what happened. ``queue``: the message is committed to the spool before the
``250`` and a worker (:mod:`smtp_bridge.worker`) sends it; acceptance keeps to
the workers' pace (``delivery.in_flow_delay``, :mod:`smtp_bridge.flow`).
``hybrid``: as direct, but recipients with a transient or unknown outcome are
committed to the spool, and the client gets ``250``.

The policy (plans, outcomes, replies, retries, dead letters) is the pure
:mod:`smtp_bridge.policy`, shared with the queue workers, as are the report of a
call (:mod:`smtp_bridge.calls`) and the writes that put a recipient's end on
record (:mod:`smtp_bridge.settle`); copies of a message delivered at once wait
for each other (:mod:`smtp_bridge.copies`). This module does the IO around them,
behind the ApiClient and store seams. The per-recipient outcome is recorded in
the store before the reply is chosen, so a client retry after a 4xx sends only
what was not delivered. :meth:`Delivery.deliver` returns one outcome per
recipient, each with its own reply (LMTP answers those);
:func:`~smtp_bridge.policy.aggregate` makes the one SMTP reply of a message.

Every API call, a session's or a worker's, goes through
:class:`~smtp_bridge.gate.ApiGate` (breaker, pace, rate limit, 40006 resend).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import replies
from .api import ApiClient
from .calls import Call
from .config import Config
from .copies import InFlight, as_copy, held_elsewhere, note_reuse, wait_for_copies
from .errors import StoreError
from .flow import InFlow
from .gate import ApiGate
from .identity import message_key
from .logs import log_event
from .message import ParsedMessage
from .metrics import Metrics
from .outcomes import RecipientState
from .policy import Origin, Plan, RecipientOutcome, next_delay, plan_recipient, session_lease
from .replies import Reply
from .rules import Router
from .settle import LateWrites, bury
from .store import Guard, Ledger, MessageRecord, RecipientRecord
from .templating import ClientInfo

__all__ = ["Delivery", "IncomingMessage"]

log = logging.getLogger("smtp_bridge.delivery")


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A message as received, with what the session knew about its sender."""

    queue_id: str
    raw: bytes
    parsed: ParsedMessage
    mail_from: str
    rcpts: Sequence[str]
    user: str = ""
    client: ClientInfo = field(default_factory=lambda: ClientInfo(""))
    app_key: str = ""

    @property
    def origin(self) -> Origin:
        """Whom a failure notice about this message goes back to."""
        return Origin(self.queue_id, self.mail_from, self.parsed.subject, self.user, self.client.ip)


# --- delivery of one received message -------------------------------------------------------


class Delivery:
    """Delivers a received message in the mode fixed at startup (docs/guarantees.md)."""

    def __init__(
        self,
        api: ApiClient | ApiGate,
        store: Ledger,
        metrics: Metrics | None = None,
        *,
        mode: str = "direct",
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.gate = api if isinstance(api, ApiGate) else ApiGate(api, metrics=metrics)
        self.store = store
        self.metrics = metrics or self.gate.metrics
        self.mode = mode
        self.rand = rand
        #: Called after a commit that put work in the spool (wakes the workers).
        self.on_spooled: Callable[[], None] | None = None
        #: Queue mode's ``in_flow_delay`` tokens; the queue worker attaches to it.
        self.flow = InFlow()
        #: Copies of a message in flight in this process wait for each other.
        self._in_flight = InFlight()
        #: Outcome writes that failed after the calls, retried until on record.
        self._late = LateWrites()

    @property
    def api(self) -> ApiClient:
        return self.gate.api

    @api.setter
    def api(self, client: ApiClient) -> None:
        self.gate.api = client  # a reload's new client, for sessions and workers alike

    def blocked(self, config: Config, app_key: str) -> Reply | None:
        """MAIL FROM in direct mode: the open breaker's 4xx for this key, or None."""
        self.gate.configure(config.api)
        if self.mode != "direct":
            return None  # hybrid spools and queue always spools: the mail is taken
        return self.gate.blocked(app_key or config.app_key())

    async def deliver(
        self,
        message: IncomingMessage,
        config: Config,
        router: Router,
        *,
        per_recipient: bool = False,
    ) -> list[RecipientOutcome]:
        """Deliver ``message``; each recipient once, however often it is listed or retried.

        A recipient listed twice (in any letter case) gets one API call. A client
        that gave up and retries while the first attempt's calls are still in
        flight waits for their recorded outcome instead of sending again (docs/guarantees.md).

        ``per_recipient``: each recipient gets its own reply (LMTP), so permanent
        failures beside deliveries are told to the client, not dead-lettered.
        """
        rcpts: list[str] = []
        for rcpt in message.rcpts:
            if all(rcpt.lower() != seen.lower() for seen in rcpts):
                rcpts.append(rcpt)
        if len(rcpts) != len(message.rcpts):
            message = dataclasses.replace(message, rcpts=rcpts)
        key = message_key(message.parsed, message.raw)
        pairs = [(key, rcpt.lower()) for rcpt in message.rcpts]
        while busy := self._in_flight.busy(pairs):
            await asyncio.wait(busy)
        done = self._in_flight.hold(pairs)
        try:
            if self.mode != "queue":
                return await self._deliver(message, config, router, key, per_recipient)
            # Queue mode: every message is the workers' to deliver. Accept it no
            # faster than they deliver (Postfix's in_flow_delay): with no token,
            # the client waits for a finished attempt, at most in_flow_delay. The
            # wait comes before the dedup read, so that read is fresh at the commit.
            async with self.flow.admit(config.delivery.in_flow_delay) as admission:
                outcomes = await self._deliver(message, config, router, key, per_recipient)
                if any(o.spooled for o in outcomes):
                    admission.keep()  # the worker's attempt gives the token back
            return outcomes
        finally:
            self._in_flight.release(pairs, done)

    async def _deliver(
        self,
        message: IncomingMessage,
        config: Config,
        router: Router,
        key: str,
        per_recipient: bool,
    ) -> list[RecipientOutcome]:
        self.gate.configure(config.api)
        app_key = message.app_key or config.app_key()
        now = time.time()
        spool_all = self.mode == "queue" or (
            self.mode == "hybrid" and self.gate.blocked(app_key) is not None
        )
        guards: dict[str, Guard] = {}
        try:
            if spool_all:
                previous = await self.store.previous_outcomes(key, message.rcpts)
            else:
                # The message and the guards of its recipients are on record before
                # anything is sent: a store that takes no writes keeps the mail with
                # the client (451) and nothing goes out.
                lease = session_lease(config)
                record = self._message_record(message, key, now, content=None)
                admission = await self.store.open_message(record, message.rcpts, lease=lease)
                self._note_reuse(message, admission.message_id_reused_by)
                guards = await wait_for_copies(
                    self.store, key, admission.guards, queue_id=message.queue_id, lease=lease
                )
                previous = {}
        except StoreError:
            return self._store_failed(message, message.rcpts)
        plans = [
            self._plan(message, rcpt, config, router, previous, guards) for rcpt in message.rcpts
        ]
        if spool_all:
            # Queue mode, or hybrid while the breaker is open: no call now, the
            # whole message goes to the spool before the 250 (docs/guarantees.md).
            outcomes = await self._spool_all(message, plans, key, now)
            if outcomes is None:
                return self._store_failed(message, [p.rcpt for p in plans])
        else:
            if len(plans) == 1:  # most mail: no task of its own for the one call
                ran = [await self._run(message, plans[0], config, app_key)]
            else:
                ran = await asyncio.gather(*(self._run(message, p, config, app_key) for p in plans))
            outcomes = await self._record_outcomes(message, plans, ran, key, config)
        if not per_recipient and any(o.reply.is_success for o in outcomes):
            # Permanent failures beside deliveries: the reply will be 250, so
            # these are dead letters the operator must see (docs/guarantees.md).
            outcomes = [
                await self._bury(message, o, key, config) if o.state is RecipientState.FAILED else o
                for o in outcomes
            ]
        for outcome in outcomes:
            self.metrics.messages.labels(
                route=outcome.route or "-", outcome=outcome.state.value
            ).inc()
        return outcomes

    def _plan(
        self,
        message: IncomingMessage,
        rcpt: str,
        config: Config,
        router: Router,
        previous: dict[str, RecipientState],
        guards: dict[str, Guard],
    ) -> Plan:
        """One recipient's plan, given what the ledger said of it."""
        guard = guards.get(rcpt.lower())
        before = previous.get(rcpt.lower())
        holder = ""
        if guard is not None:
            elsewhere = held_elsewhere(message.queue_id, rcpt, guard)
            if elsewhere is not None:
                return Plan(rcpt, outcome=elsewhere)
            if guard.possibly_sent:
                before, holder = RecipientState.UNKNOWN, guard.holder
        return plan_recipient(
            message.parsed,
            rcpt,
            config=config,
            router=router,
            mail_from=message.mail_from,
            user=message.user,
            client=message.client,
            previous=before,
            queue_id=message.queue_id,
            previous_holder=holder,
        )

    def _note_reuse(self, message: IncomingMessage, earlier: str) -> None:
        note_reuse(message.queue_id, message.parsed.message_id, earlier)

    def _store_failed(
        self, message: IncomingMessage, rcpts: Sequence[str]
    ) -> list[RecipientOutcome]:
        # Never a 250 without its commit: 451 4.3.0, the client keeps the mail.
        log_event(log, "store_error", level=logging.ERROR, queue_id=message.queue_id)
        return [RecipientOutcome(r, RecipientState.RETRYING, replies.INTERNAL) for r in rcpts]

    def _message_record(
        self, message: IncomingMessage, key: str, now: float, *, content: bytes | None
    ) -> MessageRecord:
        return MessageRecord(
            queue_id=message.queue_id,
            message_key=key,
            mail_from=message.mail_from,
            client=message.client.ip,
            user=message.user,
            subject=message.parsed.subject[:200],
            size=len(message.raw),
            received_at=now,
            mode=self.mode,
            content=content,
            message_id=message.parsed.message_id[:998],
        )

    async def _spool_all(
        self, message: IncomingMessage, plans: Sequence[Plan], key: str, now: float
    ) -> list[RecipientOutcome] | None:
        """Commit the message and its deliverable recipients to the spool; None on failure."""
        records: list[RecipientRecord] = []
        outcomes: list[RecipientOutcome] = []
        for plan in plans:
            if plan.spoolable:
                outcome = RecipientOutcome(
                    plan.rcpt,
                    RecipientState.RETRYING,
                    replies.QUEUED,
                    plan.route.name if plan.route else "",
                    plan.request.template_id if plan.request else "",
                    spooled=True,
                )
                record = outcome.record(message.queue_id, now=now, next_attempt=now, spooled_at=now)
            else:
                assert plan.outcome is not None
                outcome = plan.outcome
                record = outcome.record(message.queue_id, now=now)
            outcomes.append(outcome)
            records.append(record)
        spooled = any(o.spooled for o in outcomes)
        content = message.raw if spooled else None
        try:
            admission = await self.store.add_message(
                self._message_record(message, key, now, content=content), records
            )
        except StoreError:
            return None
        self._note_reuse(message, admission.message_id_reused_by)
        outcomes = [as_copy(message.queue_id, o, admission.guards) for o in outcomes]
        if any(o.spooled for o in outcomes):
            self._wake()  # the message line says how many were spooled (handler.py)
        return outcomes

    async def _record_outcomes(
        self,
        message: IncomingMessage,
        plans: Sequence[Plan],
        ran: Sequence[tuple[RecipientOutcome, str]],
        key: str,
        config: Config,
    ) -> list[RecipientOutcome]:
        """Commit every recipient's outcome in one transaction, before the reply.

        Hybrid mode: transient and unknown outcomes go to the spool in the same
        commit and become ``250``; if it fails their 4xx stands (the client keeps
        the mail). ``ran``: each plan's outcome and the error text to record.
        """
        now = time.time()
        backoff = config.delivery.backoff
        outcomes: list[RecipientOutcome] = []
        records: list[RecipientRecord] = []
        for plan, (outcome, error) in zip(plans, ran, strict=True):
            if self.mode == "hybrid" and outcome.reply.is_transient and plan.spoolable:
                if outcome.attempts:
                    delay = next_delay(
                        outcome.attempts, backoff, retry_after=outcome.retry_after, rand=self.rand
                    )
                else:
                    delay = 0.0  # never sent (breaker, template): the worker decides when
                records.append(
                    outcome.record(
                        message.queue_id,
                        now=now,
                        error=error,
                        next_attempt=now + delay,
                        spooled_at=now,
                    )
                )
                outcomes.append(dataclasses.replace(outcome, reply=replies.QUEUED, spooled=True))
            else:
                records.append(outcome.record(message.queue_id, now=now, error=error))
                outcomes.append(outcome)
        spooled = sum(o.spooled for o in outcomes)
        try:
            await self.store.record_outcomes(
                message.queue_id,
                records,
                message_key=key,
                spool=message.raw if spooled else None,
                mode=self.mode,
            )
        except StoreError:
            log_event(log, "store_error", level=logging.ERROR, queue_id=message.queue_id)
            # Nothing spooled: every 4xx stands. What was sent must still reach the
            # ledger (its guards say SENDING meanwhile, so no copy sends it again).
            kept = [o.record(message.queue_id, now=now, error=e) for o, e in ran]
            self._late.keep(
                message.queue_id,
                kept,
                lambda: self.store.record_outcomes(message.queue_id, kept, message_key=key),
            )
            return [original for original, _ in ran]
        if spooled:
            self._wake()  # the message line says how many were spooled (handler.py)
        return outcomes

    async def close(self) -> None:
        """Stop retrying outcome writes (each gets a last try, or is logged unrecorded)."""
        await self._late.close()

    def _wake(self) -> None:
        if self.on_spooled is not None:
            self.on_spooled()

    async def _run(
        self, message: IncomingMessage, plan: Plan, config: Config, app_key: str
    ) -> tuple[RecipientOutcome, str]:
        """One recipient's call: its outcome, and the error text its record keeps."""
        if plan.outcome is not None:
            return plan.outcome, ""
        assert plan.request is not None and plan.route is not None
        call = Call(message.queue_id, plan.rcpt, plan.route.name, plan.request)
        attempt = await self.gate.call(call.request, app_key, config.replies, **call.fields)
        if attempt.result is not None:
            return call.answered(attempt)
        # Not sent: the breaker held it back, or no slot of the key's pace freed
        # in time (the gate logged api_pace_wait_expired).
        paced = attempt.reply == replies.THROTTLED
        if not paced:
            log_event(
                log, "breaker_held", level=logging.WARNING, reply=str(attempt.reply), **call.fields
            )
        outcome = RecipientOutcome(
            plan.rcpt, RecipientState.RETRYING, attempt.reply, call.route, call.request.template_id
        )
        why = "no API slot of the key's pace in time" if paced else "circuit breaker open"
        return outcome, f"not sent: {why}"

    async def _bury(
        self, message: IncomingMessage, outcome: RecipientOutcome, key: str, config: Config
    ) -> RecipientOutcome:
        try:
            return await bury(
                outcome,
                message.origin,
                lambda record, notice: self.store.update_recipient(
                    record, message_key=key, notice=notice
                ),
                config=config,
                reason=str(outcome.reply),
                now=time.time(),
                wake=self._wake,
            )
        except StoreError:
            log_event(log, "store_error", level=logging.ERROR, queue_id=message.queue_id)
            return dataclasses.replace(outcome, state=RecipientState.DEAD)
