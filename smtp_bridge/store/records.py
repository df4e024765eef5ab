"""The rows every state-store backend reads and writes, and its one error type."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from ..outcomes import RecipientState

__all__ = [
    "CLAIMABLE_STATES",
    "CONTENT_DONE_STATES",
    "DEDUP_STATES",
    "FINAL_STATES",
    "MessageRecord",
    "Notice",
    "RecipientRecord",
    "SpoolStats",
    "StoreError",
]

#: Recipients in these states will never be attempted again.
FINAL_STATES: Final = frozenset(
    {RecipientState.DELIVERED, RecipientState.FAILED, RecipientState.DEAD, RecipientState.DROPPED}
)
#: States remembered per (message key, recipient) so a client retry does not resend
#: (docs/guarantees.md, "No duplicates on client retry").
DEDUP_STATES: Final = frozenset({RecipientState.DELIVERED, RecipientState.UNKNOWN})
#: States a queue worker picks up (given spooled content and a due ``next_attempt``).
CLAIMABLE_STATES: Final = (RecipientState.RETRYING.value, RecipientState.UNKNOWN.value)
#: Final states after which a message's content is no longer needed. DEAD is not
#: one: a dead letter keeps its content so `smtp-bridge queue retry` can resend it.
CONTENT_DONE_STATES: Final = (
    RecipientState.DELIVERED.value,
    RecipientState.DROPPED.value,
    RecipientState.FAILED.value,
)


class StoreError(Exception):
    """A state-store failure (cannot open or reach, disk full, read-only, locked, closed).

    The message names the store (a file, or a database URL without its password)
    and the engine's error, never message content.
    """

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One accepted message; ``content`` is set only when it is spooled (queue/hybrid)."""

    queue_id: str
    message_key: str
    mail_from: str
    client: str
    user: str
    subject: str
    size: int
    received_at: float
    mode: str
    content: bytes | None = None


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    """The recorded outcome of one envelope recipient of one message.

    ``updated_at`` 0.0 means "now" (the store's clock) when written.
    """

    queue_id: str
    rcpt: str
    state: RecipientState
    route: str = ""
    template_id: str = ""
    api_code: int | None = None
    reply: str = ""
    attempts: int = 0
    next_attempt: float | None = None
    updated_at: float = 0.0
    error: str = ""
    #: When it entered the spool (None: never spooled; kept as is when updating).
    spooled_at: float | None = None


class SpoolStats(NamedTuple):
    """Recipients waiting in the spool, and when the oldest of them was spooled."""

    depth: int
    oldest: float | None


#: A message and its recipients to spool along with another write (a failure notice).
Notice = tuple[MessageRecord, Sequence[RecipientRecord]]
