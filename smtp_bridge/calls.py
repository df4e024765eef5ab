"""One recipient's API call, reported the same way by sessions and queue workers.

Direct and hybrid sessions (:mod:`smtp_bridge.delivery`) and the queue workers
(:mod:`smtp_bridge.spool_attempt`) make their calls through the same
:class:`~smtp_bridge.gate.ApiGate`. What they make of a call that went out is
written here once: the recipient's outcome (:func:`~smtp_bridge.policy.attempted`),
the error text its record keeps, the one ``api_call`` line, and the console's
history row, which says what that line says (:class:`Answer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypedDict

from . import history
from .gate import Attempt
from .logs import log_event
from .outcomes import ApiRequest, ApiResult
from .policy import RecipientOutcome, attempted

__all__ = ["Answer", "Call", "answer"]

log = logging.getLogger("smtp_bridge.delivery")


class Answer(TypedDict):
    """What became of a call, as the ``api_call`` line and the console's history both say it."""

    result: str
    api_code: int | None
    http_status: int | None
    latency_ms: float
    state: str
    reply: str


def answer(result: ApiResult, outcome: RecipientOutcome) -> Answer:
    """The API's ``result`` and the recipient's ``outcome``, as the line and history say them."""
    return {
        "result": result.kind.value,
        "api_code": result.code,
        "http_status": result.http_status,
        "latency_ms": round(result.latency * 1000, 1),
        "state": outcome.state.value,
        "reply": str(outcome.reply),
    }


@dataclass(frozen=True, slots=True)
class Call:
    """One recipient's API call: the request, for whom, by which route."""

    queue_id: str
    rcpt: str
    route: str
    request: ApiRequest

    @property
    def fields(self) -> dict[str, Any]:
        """The context every line about this call carries (the gate's included)."""
        return {"queue_id": self.queue_id, "rcpt": self.rcpt, "route": self.route}

    def answered(self, attempt: Attempt, /, **extra: Any) -> tuple[RecipientOutcome, str]:
        """The outcome of the call the gate made (``attempt.result`` set), and the error
        text its record keeps; logged as the one ``api_call`` line (``extra`` added to
        it) and kept for the console's history."""
        result = attempt.result
        assert result is not None, "the gate held this call back: it has no answer"
        outcome = attempted(
            self.rcpt, self.route, self.request, result, attempt.reply, attempt.calls
        )
        said = answer(result, outcome)
        log_event(
            log,
            "api_call",
            level=logging.INFO if outcome.reply.is_success else logging.WARNING,
            **self.fields,
            template=self.request.template_id,
            **said,
            **extra,
        )
        history.record_attempt(self, result, said)  # the console's
        return outcome, result.message[:200]
