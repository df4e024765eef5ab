"""Direct-mode delivery: one message's recipients -> API calls -> one reply.

Policy lives here, IO behind the ApiClient and Store seams. The per-recipient
outcome is recorded in the store before the reply is chosen, so a client retry
after a 4xx sends only what was not delivered (DESIGN 2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import replies
from .api import ApiClient
from .config import Config, RouteConfig
from .logs import log_event
from .message import ParsedMessage, content_hash
from .metrics import Metrics
from .outcomes import ApiRequest, ApiResult, RecipientState, ResultKind
from .replies import Reply
from .rules import Envelope, Router
from .store import MessageRecord, RecipientRecord, Store, StoreError
from .templating import (
    ClientInfo,
    HeaderOverrideError,
    TemplateRenderError,
    build_context,
    header_overrides,
    render_request,
)

__all__ = [
    "DirectDelivery",
    "IncomingMessage",
    "Plan",
    "RecipientOutcome",
    "aggregate",
    "message_key",
    "plan_recipient",
]

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


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    rcpt: str
    state: RecipientState
    reply: Reply
    route: str = ""
    template_id: str = ""
    api_code: int | None = None


def message_key(parsed: ParsedMessage, raw: bytes) -> str:
    """The dedup identity of a message: Idempotency-Key, else Message-ID, else content."""
    idem = parsed.headers.get("Idempotency-Key", "").strip()
    if idem:
        return "idem:" + hashlib.sha256(idem.encode("utf-8", "surrogateescape")).hexdigest()
    if parsed.message_id:
        digest = hashlib.sha256(parsed.message_id.encode("utf-8", "surrogateescape")).hexdigest()
        return "mid:" + digest
    return "sha:" + content_hash(raw)


def aggregate(outcomes: Sequence[RecipientOutcome]) -> Reply:
    """One SMTP reply for a multi-recipient message (DESIGN 2, direct mode)."""
    transient = [o for o in outcomes if o.reply.is_transient]
    if transient:
        return transient[0].reply
    if outcomes and all(o.state is RecipientState.DROPPED for o in outcomes):
        return replies.DROPPED  # the truth: nothing was sent, and no retry is wanted
    delivered = [o for o in outcomes if o.reply.is_success]
    if delivered or not outcomes:
        # The reply of a call the API accepted, so a `replies: {"200": ...}` override shows.
        return next((o.reply for o in delivered if o.api_code == 200), replies.OK)
    return outcomes[0].reply


def _state_for(result: ApiResult, reply: Reply) -> RecipientState:
    if reply.is_success:
        return RecipientState.DELIVERED
    if result.kind is ResultKind.UNKNOWN:
        return RecipientState.UNKNOWN
    if reply.is_permanent:
        return RecipientState.FAILED
    return RecipientState.RETRYING


@dataclass(slots=True)
class Plan:
    """What to do for one recipient: send ``request``, or report ``outcome``."""

    rcpt: str
    route: RouteConfig | None = None
    request: ApiRequest | None = None
    outcome: RecipientOutcome | None = None  # decided without an API call


def plan_recipient(
    parsed: ParsedMessage,
    rcpt: str,
    *,
    config: Config,
    router: Router,
    mail_from: str,
    user: str = "",
    client: ClientInfo | None = None,
    previous: RecipientState | None = None,
    queue_id: str = "",
) -> Plan:
    """Decide one recipient without IO: an API request to send, or an outcome.

    Shared by the daemon and ``smtp-bridge route`` so the dry run shows
    exactly what the daemon would send.
    """
    client = client or ClientInfo("")
    envelope = Envelope(mail_from, rcpt, user, _ip(client.ip))
    found = router.match(envelope, parsed)
    if found is None:
        return Plan(
            rcpt, outcome=RecipientOutcome(rcpt, RecipientState.FAILED, replies.NO_ROUTE_DATA)
        )
    route = found.route
    if route.action == "reject":
        reply = route.reply or replies.REJECTED
        state = RecipientState.FAILED if reply.is_permanent else RecipientState.RETRYING
        return Plan(rcpt, route, outcome=RecipientOutcome(rcpt, state, reply, route.name))
    if route.action == "drop":
        return Plan(
            rcpt,
            route,
            outcome=RecipientOutcome(rcpt, RecipientState.DROPPED, replies.DROPPED, route.name),
        )
    if previous is RecipientState.DELIVERED:
        log_event(log, "duplicate_skipped", queue_id=queue_id, rcpt=rcpt, route=route.name)
        return Plan(
            rcpt,
            route,
            outcome=RecipientOutcome(rcpt, RecipientState.DELIVERED, replies.OK, route.name),
        )
    if previous is RecipientState.UNKNOWN:
        log_event(
            log,
            "possible_duplicate",
            level=logging.WARNING,
            queue_id=queue_id,
            rcpt=rcpt,
            route=route.name,
        )
    context = build_context(
        parsed, mail_from=mail_from, rcpt=rcpt, user=user, client=client, match=found.groups
    )
    try:
        overrides = header_overrides(parsed) if route.allow_header_overrides else None
        assert route.template_id is not None  # relay routes have one (config check)
        request = render_request(
            template_id=route.template_id,
            to=route.to,
            alias=route.alias,
            reply_to=route.reply_to,
            is_random=route.is_random,
            data=route.data,
            context=context,
            overrides=overrides,
        )
    except HeaderOverrideError as exc:
        log_event(
            log,
            "bad_override_header",
            level=logging.WARNING,
            queue_id=queue_id,
            rcpt=rcpt,
            route=route.name,
            reason=str(exc),
        )
        return Plan(
            rcpt,
            route,
            outcome=RecipientOutcome(rcpt, RecipientState.FAILED, replies.DATA_FORMAT, route.name),
        )
    except TemplateRenderError as exc:
        log_event(
            log,
            "template_failed",
            level=logging.ERROR,
            queue_id=queue_id,
            rcpt=rcpt,
            route=route.name,
            field=exc.field,
            reason=exc.reason,
        )
        return Plan(
            rcpt,
            route,
            outcome=RecipientOutcome(
                rcpt, RecipientState.RETRYING, replies.TEMPLATE_FAILED, route.name
            ),
        )
    return Plan(rcpt, route, request=request)


class DirectDelivery:
    """Delivers while the client waits; the client owns retries (DESIGN 2)."""

    def __init__(self, api: ApiClient, store: Store, metrics: Metrics | None = None) -> None:
        self.api = api
        self.store = store
        self.metrics = metrics or Metrics()
        # (message key, lower-cased rcpt) -> done when its delivery is recorded.
        self._in_flight: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def deliver(
        self, message: IncomingMessage, config: Config, router: Router
    ) -> list[RecipientOutcome]:
        """Deliver ``message``; each recipient once, however often it is listed or retried.

        A recipient listed twice (in any letter case) gets one API call. A client
        that gave up and retries while the first attempt's calls are still in
        flight waits for their recorded outcome instead of sending again (DESIGN 2).
        """
        rcpts: list[str] = []
        for rcpt in message.rcpts:
            if all(rcpt.lower() != seen.lower() for seen in rcpts):
                rcpts.append(rcpt)
        if len(rcpts) != len(message.rcpts):
            message = dataclasses.replace(message, rcpts=rcpts)
        key = message_key(message.parsed, message.raw)
        pairs = [(key, rcpt.lower()) for rcpt in message.rcpts]
        while busy := {self._in_flight[p] for p in pairs if p in self._in_flight}:
            await asyncio.wait(busy)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight.update(dict.fromkeys(pairs, done))
        try:
            return await self._deliver(message, config, router)
        finally:
            for pair in pairs:
                if self._in_flight.get(pair) is done:
                    del self._in_flight[pair]
            done.set_result(None)

    async def _deliver(
        self, message: IncomingMessage, config: Config, router: Router
    ) -> list[RecipientOutcome]:
        key = message_key(message.parsed, message.raw)
        try:
            previous = await self.store.previous_outcomes(key, message.rcpts)
        except StoreError:
            log_event(log, "store_error", level=logging.ERROR, queue_id=message.queue_id)
            return [
                RecipientOutcome(r, RecipientState.RETRYING, replies.INTERNAL)
                for r in message.rcpts
            ]
        plans = [
            plan_recipient(
                message.parsed,
                rcpt,
                config=config,
                router=router,
                mail_from=message.mail_from,
                user=message.user,
                client=message.client,
                previous=previous.get(rcpt.lower()),
                queue_id=message.queue_id,
            )
            for rcpt in message.rcpts
        ]
        now = time.time()
        record = MessageRecord(
            queue_id=message.queue_id,
            message_key=key,
            mail_from=message.mail_from,
            client=message.client.ip,
            user=message.user,
            subject=message.parsed.subject[:200],
            size=len(message.raw),
            received_at=now,
            mode="direct",
        )
        try:
            await self.store.add_message(record, [self._record(message, p, now) for p in plans])
        except StoreError:
            # No ledger, no dedup guarantee: keep the mail with the client.
            log_event(log, "store_error", level=logging.ERROR, queue_id=message.queue_id)
            return [
                RecipientOutcome(p.rcpt, RecipientState.RETRYING, replies.INTERNAL) for p in plans
            ]
        outcomes = await asyncio.gather(*(self._run(message, p, key, config) for p in plans))
        if any(o.reply.is_success for o in outcomes):
            # Permanent failures beside deliveries: the reply will be 250, so
            # these are dead letters the operator must see (DESIGN 2).
            outcomes = [
                await self._bury(message, o, key) if o.state is RecipientState.FAILED else o
                for o in outcomes
            ]
        for outcome in outcomes:
            self.metrics.messages.labels(
                route=outcome.route or "-", outcome=outcome.state.value
            ).inc()
        return outcomes

    def _record(self, message: IncomingMessage, plan: Plan, now: float) -> RecipientRecord:
        outcome = plan.outcome
        return RecipientRecord(
            queue_id=message.queue_id,
            rcpt=plan.rcpt,
            state=outcome.state if outcome else RecipientState.RETRYING,
            route=plan.route.name if plan.route else "",
            template_id=plan.request.template_id if plan.request else "",
            reply=str(outcome.reply) if outcome else "",
            updated_at=now,
        )

    async def _run(
        self, message: IncomingMessage, plan: Plan, key: str, config: Config
    ) -> RecipientOutcome:
        if plan.outcome is not None:
            return plan.outcome
        assert plan.request is not None and plan.route is not None
        request = plan.request
        app_key = message.app_key or config.app_key()
        result = await self.api.send(request, app_key)
        self.metrics.observe_api(result)
        attempts = 1
        if result.kind is ResultKind.API and result.code == 40006 and request.reply_to:
            # An optional header must not lose the mail: resend without it.
            log_event(
                log,
                "reply_to_rejected",
                level=logging.WARNING,
                queue_id=message.queue_id,
                rcpt=plan.rcpt,
                route=plan.route.name,
            )
            result = await self.api.send(request.without_reply_to(), app_key)
            self.metrics.observe_api(result)
            attempts = 2
        overrides = config.replies
        reply = replies.reply_for(result, overrides)
        state = _state_for(result, reply)
        outcome = RecipientOutcome(
            plan.rcpt, state, reply, plan.route.name, request.template_id, result.code
        )
        log_event(
            log,
            "api_call",
            level=logging.INFO if reply.is_success else logging.WARNING,
            queue_id=message.queue_id,
            rcpt=plan.rcpt,
            route=plan.route.name,
            template=request.template_id,
            result=result.kind.value,
            api_code=result.code,
            http_status=result.http_status,
            latency_ms=round(result.latency * 1000, 1),
            state=state.value,
            reply=str(reply),
        )
        record = RecipientRecord(
            queue_id=message.queue_id,
            rcpt=plan.rcpt,
            state=state,
            route=plan.route.name,
            template_id=request.template_id,
            api_code=result.code,
            reply=str(reply),
            attempts=attempts,
            updated_at=time.time(),
            error=result.message[:200],
        )
        try:
            await self.store.update_recipient(record, message_key=key)
        except StoreError:
            log_event(
                log, "store_error", level=logging.ERROR, queue_id=message.queue_id, rcpt=plan.rcpt
            )
        return outcome

    async def _bury(
        self, message: IncomingMessage, outcome: RecipientOutcome, key: str
    ) -> RecipientOutcome:
        dead = RecipientOutcome(
            outcome.rcpt,
            RecipientState.DEAD,
            outcome.reply,
            outcome.route,
            outcome.template_id,
            outcome.api_code,
        )
        log_event(
            log,
            "dead_letter",
            level=logging.WARNING,
            queue_id=message.queue_id,
            rcpt=outcome.rcpt,
            route=outcome.route,
            reply=str(outcome.reply),
        )
        record = RecipientRecord(
            queue_id=message.queue_id,
            rcpt=outcome.rcpt,
            state=RecipientState.DEAD,
            route=outcome.route,
            template_id=outcome.template_id,
            api_code=outcome.api_code,
            reply=str(outcome.reply),
            updated_at=time.time(),
        )
        try:
            await self.store.update_recipient(record, message_key=key)
        except StoreError:
            log_event(log, "store_error", level=logging.ERROR, queue_id=message.queue_id)
        return dead


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None
