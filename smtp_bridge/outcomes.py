"""Pure value types shared by templating, the API client, replies and the store.

An :class:`ApiRequest` is what one route renders for one recipient; an
:class:`ApiResult` is what became of one attempt to send it. Keeping both free of
IO lets the reply table and the delivery policy be tested without a network.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ApiRequest", "ApiResult", "ResultKind", "RecipientState"]


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One AOTsend call: one template, one bare recipient address (docs/upstream-api.md)."""

    template_id: str
    to: str
    data: dict[str, Any] = field(default_factory=dict)
    alias: str | None = None
    reply_to: str | None = None
    is_random: bool | None = None

    def without_reply_to(self) -> ApiRequest:
        """The same request minus ``reply_to``: the 40006 resend (docs/replies.md)."""
        return ApiRequest(self.template_id, self.to, self.data, self.alias, None, self.is_random)


class ResultKind(enum.StrEnum):
    """How far one API attempt got; decides the reply together with the code."""

    #: The API answered JSON ``{code, message}``; see :attr:`ApiResult.code`.
    API = "api"
    #: HTTP answered with a status other than 200 (429, 502, 401, ...).
    HTTP = "http"
    #: HTTP 200 but the body is not the API's JSON (a proxy page, say).
    BAD_BODY = "bad_body"
    #: Connection refused, DNS or TLS failure: the request never left. Safe to retry.
    NEVER_SENT = "never_sent"
    #: Timeout or reset after the request was sent: the outcome is unknown.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ApiResult:
    """The outcome of one API attempt. Never carries the API key."""

    kind: ResultKind
    code: int | None = None
    http_status: int | None = None
    message: str = ""
    retry_after: float | None = None
    latency: float = 0.0

    @property
    def delivered(self) -> bool:
        return self.kind is ResultKind.API and self.code == 200


class RecipientState(enum.StrEnum):
    """Recorded state of one (message, recipient) pair (docs/guarantees.md)."""

    DELIVERED = "delivered"
    RETRYING = "retrying"
    UNKNOWN = "unknown"
    FAILED = "failed"
    DEAD = "dead"
    DROPPED = "dropped"
    #: Not sent by this copy: the same message (same dedup key) was already
    #: delivered or is already queued under another queue id, named in ``error``.
    DUPLICATE = "duplicate"
