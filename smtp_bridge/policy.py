"""Pure: the delivery policy every mode shares, sessions' and queue workers' alike.

What an attempt's answer makes of a recipient (:func:`attempted`, :func:`state_for`),
the one reply of a message (:func:`aggregate`), when to try again
(:func:`next_delay`), what to do for one recipient without IO
(:func:`plan_recipient`, which ``smtp-bridge route`` shows as its dry run), the
dead letter and its failure notice (:func:`dead_letter`, :func:`failure_notice`).
:mod:`smtp_bridge.delivery` (direct, hybrid and queue sessions) and
:mod:`smtp_bridge.spool_attempt` (the spool's attempts) do the IO around them,
with :mod:`smtp_bridge.calls` and :mod:`smtp_bridge.settle`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import replies
from .config import Config, RouteConfig
from .ids import new_queue_id
from .logs import log_event
from .message import ParsedMessage
from .outcomes import ApiRequest, ApiResult, RecipientState, ResultKind
from .replies import Reply
from .rules import Envelope, Router
from .store import GuardState, MessageRecord, Notice, RecipientRecord
from .templating import (
    ClientInfo,
    HeaderOverrideError,
    TemplateRenderError,
    build_context,
    header_overrides,
    render_request,
)

__all__ = [
    "GUARD_MARGIN",
    "JITTER",
    "NOTICE_MODE",
    "NOTICE_ROUTE",
    "Origin",
    "Plan",
    "RecipientOutcome",
    "aggregate",
    "attempted",
    "dead_letter",
    "duplicate_outcome",
    "failure_notice",
    "next_delay",
    "plan_recipient",
    "session_lease",
    "state_for",
]

log = logging.getLogger("smtp_bridge.delivery")

#: ``messages.mode`` of a spooled failure notice; its content is the API request.
NOTICE_MODE = "notice"
#: The route name failure notices are logged and counted under.
NOTICE_ROUTE = "failure-notice"
#: Seconds a session's guard outlives its longest possible calls.
GUARD_MARGIN = 10.0
#: Jitter: each retry delay is the ``delivery.backoff`` step times a factor in this range.
JITTER = (0.8, 1.2)


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """What became of one recipient, and the reply that tells it (LMTP sends each)."""

    rcpt: str
    state: RecipientState
    reply: Reply
    route: str = ""
    template_id: str = ""
    api_code: int | None = None
    #: API calls made for it (2 after a 40006 resend); what the record's ``attempts`` counts.
    attempts: int = 0
    #: The API's Retry-After, when it gave one.
    retry_after: float | None = None
    #: Committed to the spool: a worker will deliver it (queue and hybrid modes).
    spooled: bool = False

    def record(self, queue_id: str, *, now: float, **fields: Any) -> RecipientRecord:
        """This outcome as the store's row; ``fields`` add or override columns."""
        values: dict[str, Any] = {
            "queue_id": queue_id,
            "rcpt": self.rcpt,
            "state": self.state,
            "route": self.route,
            "template_id": self.template_id,
            "api_code": self.api_code,
            "reply": str(self.reply),
            "attempts": self.attempts,
            "updated_at": now,
        }
        values.update(fields)
        return RecipientRecord(**values)


def aggregate(outcomes: Sequence[RecipientOutcome]) -> Reply:
    """One SMTP reply for a multi-recipient message (docs/guarantees.md), in every mode.

    Any transient failure left with the client -> that 4xx. Otherwise anything
    delivered or spooled -> 250 (hybrid and queue modes spool their transient
    failures, so those count as accepted). Only permanent failures -> the first
    one's 5xx.
    """
    transient = [o for o in outcomes if o.reply.is_transient]
    if transient:
        return transient[0].reply
    if outcomes and all(o.state is RecipientState.DROPPED for o in outcomes):
        return replies.DROPPED  # the truth: nothing was sent, and no retry is wanted
    delivered = [o for o in outcomes if o.reply.is_success]
    if delivered or not outcomes:
        # The reply of a call the API accepted, so a `replies: {"200": ...}` override shows.
        accepted = next((o.reply for o in delivered if o.api_code == 200), None)
        if accepted is not None:
            return accepted
        if any(o.spooled for o in delivered):
            return replies.QUEUED
        # Every recipient was another copy's: say which (already queued wins, since
        # something is still to be sent).
        copies = [o.reply for o in delivered if o.state is RecipientState.DUPLICATE]
        if copies:
            return replies.ALREADY_QUEUED if replies.ALREADY_QUEUED in copies else copies[0]
        return replies.OK
    return outcomes[0].reply


def state_for(result: ApiResult, reply: Reply) -> RecipientState:
    """The recorded state of a recipient after one API result and its reply."""
    if reply.is_success:
        return RecipientState.DELIVERED
    if result.kind is ResultKind.UNKNOWN:
        return RecipientState.UNKNOWN
    if reply.is_permanent:
        return RecipientState.FAILED
    return RecipientState.RETRYING


def next_delay(
    attempts: int,
    backoff: Sequence[float],
    *,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds before the next try after ``attempts`` failed ones (docs/guarantees.md).

    The ``attempts``-th step of ``delivery.backoff`` (the last one repeats), times
    a jitter factor so retries of many recipients spread out; never sooner than the
    API's Retry-After.
    """
    if not backoff:
        raise ValueError("backoff must not be empty")
    step = backoff[min(max(attempts, 1), len(backoff)) - 1]
    low, high = JITTER
    delay = step * (low + (high - low) * rand())
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


@dataclass(slots=True)
class Plan:
    """What to do for one recipient: send ``request``, or report ``outcome``."""

    rcpt: str
    route: RouteConfig | None = None
    request: ApiRequest | None = None
    outcome: RecipientOutcome | None = None  # decided without an API call

    @property
    def spoolable(self) -> bool:
        """A worker could deliver it later: an API request, or a template to retry.

        Refusals by policy (reject routes, whatever their reply), drops, and
        recipients already delivered are decided for good.
        """
        if self.request is not None:
            return True
        return (
            self.outcome is not None
            and self.route is not None
            and self.route.action == "relay"
            and self.outcome.state is RecipientState.RETRYING
        )


def duplicate_outcome(rcpt: str, held: GuardState | None, route: str = "") -> RecipientOutcome:
    """A recipient another copy of the message has: delivered already, or queued."""
    reply = replies.ALREADY_DELIVERED if held is GuardState.DELIVERED else replies.ALREADY_QUEUED
    return RecipientOutcome(rcpt, RecipientState.DUPLICATE, reply, route)


def session_lease(config: Config) -> float:
    """How long a session's guard holds: longer than its calls can take (a 40006
    resend included), so only a session that died loses it."""
    return max(config.delivery.claim_lease, 2 * config.api.timeout + GUARD_MARGIN)


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
    previous_holder: str = "",
) -> Plan:
    """Decide one recipient without IO: an API request to send, or an outcome.

    Shared by the daemon, the queue workers and ``smtp-bridge route`` so the
    dry run shows exactly what the daemon would send. ``previous`` UNKNOWN: the
    last call (by ``previous_holder``, a queue id) may have been sent, so this one
    is logged as a possible duplicate.
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
        return Plan(rcpt, route, outcome=duplicate_outcome(rcpt, GuardState.DELIVERED, route.name))
    if previous is RecipientState.UNKNOWN:
        log_event(
            log,
            "possible_duplicate",
            level=logging.WARNING,
            queue_id=queue_id,
            previous_queue_id=previous_holder or queue_id,
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


# --- what an attempt makes of a recipient -------------------------------------------------


def attempted(
    rcpt: str, route: str, request: ApiRequest, result: ApiResult, reply: Reply, calls: int
) -> RecipientOutcome:
    """The outcome of one recipient's call (``calls``: 2 after a 40006 resend)."""
    return RecipientOutcome(
        rcpt,
        state_for(result, reply),
        reply,
        route,
        request.template_id,
        result.code,
        attempts=calls,
        retry_after=result.retry_after,
    )


@dataclass(frozen=True, slots=True)
class Origin:
    """The message a dead letter came from: whom its failure notice goes back to."""

    queue_id: str
    #: The envelope sender: the notice's recipient ("" for ``<>``, which gets none).
    mail_from: str
    subject: str
    #: The sender's login ("" if none) and client IP, kept on the notice as on any message.
    user: str
    client: str


def dead_letter(
    outcome: RecipientOutcome,
    origin: Origin,
    *,
    config: Config,
    reason: str,
    now: float,
    **fields: Any,
) -> tuple[RecipientOutcome, Notice | None]:
    """Give up on a recipient: its DEAD outcome, the failure notice to spool with it,
    and the ``dead_letter`` line. The caller writes both in one transaction
    (:func:`smtp_bridge.settle.bury`)."""
    dead = dataclasses.replace(outcome, state=RecipientState.DEAD)
    log_event(
        log,
        "dead_letter",
        level=logging.WARNING,
        queue_id=origin.queue_id,
        rcpt=outcome.rcpt,
        route=outcome.route,
        template=outcome.template_id,
        api_code=outcome.api_code,
        reply=str(outcome.reply),
        reason=reason,
        **fields,
    )
    return dead, failure_notice(origin, outcome.rcpt, config=config, reason=reason, now=now)


def failure_notice(
    origin: Origin, rcpt: str, *, config: Config, reason: str, now: float | None = None
) -> Notice | None:
    """The failure notice to the envelope sender, as a message to spool (docs/guarantees.md).

    None when ``delivery.bounce_template_id`` is unset or the sender is null (a
    notice is never sent for ``<>``, so notices never beget notices). The notice is
    spooled in the transaction that makes the recipient dead, and a worker sends
    it with retries like any spooled mail; its content is the API request.
    """
    template_id = config.delivery.bounce_template_id
    if not template_id or not origin.mail_from:
        return None
    now = time.time() if now is None else now
    notice_id = new_queue_id()
    data = {"recipient": rcpt, "subject": origin.subject, "reason": reason}
    content = json.dumps(
        {"template_id": template_id, "data": data, "origin": origin.queue_id}, ensure_ascii=False
    ).encode()
    message = MessageRecord(
        queue_id=notice_id,
        message_key=f"notice:{origin.queue_id}:{rcpt.lower()}",
        mail_from="",
        client=origin.client,
        user=origin.user,
        subject=f"Failure notice: {origin.subject}"[:200],
        size=len(content),
        received_at=now,
        mode=NOTICE_MODE,
        content=content,
    )
    record = RecipientRecord(
        queue_id=notice_id,
        rcpt=origin.mail_from,
        state=RecipientState.RETRYING,
        route=NOTICE_ROUTE,
        template_id=template_id,
        next_attempt=now,
        updated_at=now,
        spooled_at=now,
    )
    return message, [record]


@functools.lru_cache(maxsize=1024)
def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # Cached: every recipient of every message parses its client's address, and the
    # clients of a bridge are few (ipaddress objects are immutable).
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None
