"""What the daemon would do with a message, sending nothing: ``smtp-bridge route`` and the
console's "Try a message" share this one code path (and ``plan_recipient`` with the daemon).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import NoRecipients
from .history import REDACTED

__all__ = ["DryRun", "NoRecipients", "dry_run"]


@dataclass(frozen=True, slots=True)
class DryRun:
    """One recipient's decision: the route and the request, or the reply without a call."""

    rcpt: str
    route: str | None
    #: The request fields as they would be sent, ``app_key`` as ``***``; None without a call.
    request: dict[str, Any] | None
    url: str
    encoding: str
    #: The reply the client would get when no call is made ("" when the API decides).
    reply: str = ""
    #: True when that reply is a success (dropped, already delivered).
    success: bool = True


def dry_run(
    raw: bytes,
    config: Config,
    *,
    rcpts: Sequence[str] | None = None,
    mail_from: str | None = None,
    user: str = "",
    client: str = "127.0.0.1",
) -> list[DryRun]:
    """Each recipient's route and API request for message ``raw``; raises NoRecipients."""
    from .api import request_fields
    from .message import parse_message
    from .policy import plan_recipient
    from .rules import Router
    from .templating import ClientInfo

    parsed = parse_message(raw)
    wanted = list(rcpts or []) or [a.address for a in (*parsed.to, *parsed.cc) if a.address]
    if not wanted:
        raise NoRecipients("no recipients: give one")
    router = Router(config.routes)
    sender = mail_from if mail_from is not None else parsed.sender.address
    results = []
    for rcpt in wanted:
        plan = plan_recipient(
            parsed,
            rcpt,
            config=config,
            router=router,
            mail_from=sender,
            user=user,
            client=ClientInfo(client),
        )
        request = (
            request_fields(plan.request, REDACTED, config.api.encoding)
            if plan.request is not None
            else None
        )
        reply = plan.outcome.reply if plan.outcome is not None else None
        results.append(
            DryRun(
                rcpt=rcpt,
                route=plan.route.name if plan.route else None,
                request=request,
                url=config.api.url,
                encoding=config.api.encoding,
                reply=str(reply) if reply is not None else "",
                success=reply.is_success if reply is not None else True,
            )
        )
    return results
