"""Records and a hand-moved clock for the state-store tests (every backend's)."""

from __future__ import annotations

from typing import Any

from smtp_bridge.outcomes import RecipientState
from smtp_bridge.store import MessageRecord, RecipientRecord

__all__ = ["SECRET", "T0", "TTL", "Clock", "message", "rcpt"]

T0 = 1_700_000_000.0
TTL = 3600.0
SECRET = b"Subject: hi\r\n\r\nthe very secret body\r\n"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def message(
    queue_id: str = "Q1",
    *,
    key: str = "key-1",
    content: bytes | None = None,
    received_at: float = T0,
) -> MessageRecord:
    return MessageRecord(
        queue_id=queue_id,
        message_key=key,
        mail_from="app@example.com",
        client="192.0.2.1",
        user="crm",
        subject="Reset your password",
        size=len(content or b""),
        received_at=received_at,
        mode="queue" if content is not None else "direct",
        content=content,
    )


def rcpt(
    rcpt: str,
    state: RecipientState = RecipientState.RETRYING,
    *,
    queue_id: str = "Q1",
    **fields: Any,
) -> RecipientRecord:
    return RecipientRecord(queue_id=queue_id, rcpt=rcpt, state=state, **fields)
